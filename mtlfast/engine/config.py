"""The engine's options (:class:`EngineConfig`) and what a step reports (:class:`StepInfo`)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

import torch

from .vjp import Strategy

__all__ = [
    "DEFAULT_BUCKET_CAP_MB",
    "DEFAULT_JACOBIAN_BUDGET",
    "DistributedMode",
    "EngineConfig",
    "Mode",
    "NonFinite",
    "StepInfo",
]

Mode = Literal["auto", "jacobian", "gramian", "features"]
NonFinite = Literal["raise", "skip"]
DistributedMode = Literal["exact", "local"]

#: Default budget for mode="auto": a (T, P) Jacobian up to this many bytes runs in jacobian mode.
DEFAULT_JACOBIAN_BUDGET = 2 << 30
#: DDP's default bucket size (MiB of the (T, P) Jacobian per all-reduce in exact mode).
DEFAULT_BUCKET_CAP_MB = 25.0


def _choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """The engine's options, checked once (see ``MTLBackward`` for what each means)."""

    mode: Mode = "auto"
    chunk_size: int | None = None
    jacobian_dtype: torch.dtype | None = None
    jacobian_budget: int = DEFAULT_JACOBIAN_BUDGET
    on_nonfinite: NonFinite = "raise"
    process_group: object = None
    distributed_mode: DistributedMode = "exact"
    bucket_cap_mb: float | None = DEFAULT_BUCKET_CAP_MB
    vjp: Strategy = "auto"
    accumulate: int = 1

    def __post_init__(self) -> None:
        _choice("mode", self.mode, typing.get_args(Mode))
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or not isinstance(
                self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")
        if self.jacobian_dtype is not None and not (
                isinstance(self.jacobian_dtype, torch.dtype)
                and self.jacobian_dtype.is_floating_point):
            raise TypeError(f"jacobian_dtype must be a floating torch.dtype, got "
                            f"{self.jacobian_dtype!r}")
        if isinstance(self.jacobian_budget, bool) or not isinstance(self.jacobian_budget, int) \
                or self.jacobian_budget < 0:
            raise ValueError(f"jacobian_budget must be a non-negative int (bytes), got "
                             f"{self.jacobian_budget!r}")
        _choice("on_nonfinite", self.on_nonfinite, typing.get_args(NonFinite))
        _choice("distributed_mode", self.distributed_mode, typing.get_args(DistributedMode))
        cap = self.bucket_cap_mb
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float))
                                or not cap > 0):
            raise ValueError(f"bucket_cap_mb must be a positive number (MiB) or None, got "
                             f"{cap!r}")
        _choice("vjp", self.vjp, typing.get_args(Strategy))
        if isinstance(self.accumulate, bool) or not isinstance(self.accumulate, int) \
                or self.accumulate < 1:
            raise ValueError(f"accumulate must be a positive int (micro-batches per step), got "
                             f"{self.accumulate!r}")

    def key(self) -> tuple:
        """Identity of the options (the process group by object)."""
        return (self.mode, self.chunk_size, self.jacobian_dtype, self.jacobian_budget,
                self.on_nonfinite, id(self.process_group), self.distributed_mode,
                self.bucket_cap_mb, self.vjp, self.accumulate)


@dataclass
class StepInfo:
    """What one step computed. All tensors stay on the device: the derived views
    (:meth:`grad_norms`, :meth:`cosines`, :meth:`conflicting_pairs`) are computed there too, and
    only :meth:`as_dict` reads anything back (one synchronization, when asked)."""

    #: (T,) combination weights (layer-wise methods: (L, T)); zeros for a skipped step; None
    #: for whole-Jacobian methods (their update is not a weighted sum of the rows).
    weights: torch.Tensor | None
    #: (T, T) Gram of the per-task gradients (layer-wise: (L, T, T); features mode: of dL/dZ);
    #: None for methods that never form it (loss-based, whole-Jacobian).
    gram: torch.Tensor | None
    #: (T,) the losses, detached.
    losses: torch.Tensor
    #: 0-d bool: True when the step was non-finite and zeroed (or left to the grad scaler).
    skipped: torch.Tensor
    #: The mode that ran: "jacobian", "gramian", "features" or "losses"; "accumulating" for a
    #: micro-batch that was added to the accumulated gradients (nothing written yet).
    mode: str
    #: The task names, in order (the keys of a dict of losses, else "task 0", "task 1", ...).
    tasks: list[str] = field(default_factory=list)

    def _total_gram(self) -> torch.Tensor | None:
        if self.gram is None:
            return None
        return self.gram.sum(0) if self.gram.dim() == 3 else self.gram  # layers add up

    def grad_norms(self) -> torch.Tensor | None:
        """(T,) per-task gradient norms ``sqrt(K_tt)`` (of dL/dZ in features mode)."""
        K = self._total_gram()
        return None if K is None else K.diagonal().clamp_min(0).sqrt()

    def cosines(self) -> torch.Tensor | None:
        """(T, T) cosine similarities of the per-task gradients (0 for a zero gradient)."""
        K = self._total_gram()
        if K is None:
            return None
        n = K.diagonal().clamp_min(0).sqrt()
        inv = torch.where(n > 0, 1 / torch.where(n > 0, n, 1), 0)
        return K * inv[:, None] * inv[None, :]

    def conflicting_pairs(self) -> torch.Tensor | None:
        """0-d: the number of task pairs whose gradients conflict (negative cosine)."""
        cos = self.cosines()
        return None if cos is None else (torch.triu(cos, 1) < 0).sum()

    def as_dict(self) -> dict[str, object]:
        """Plain Python values for a logger (reads the device once): losses, weights and
        gradient norms per task, the cosine matrix, the number of conflicting pairs."""
        def per_task(t: torch.Tensor | None) -> dict[str, object] | None:
            return None if t is None else dict(zip(self.tasks, t.tolist(), strict=True))

        weights = self.weights
        cos = self.cosines()
        conflicts = self.conflicting_pairs()
        return {
            "mode": self.mode,
            "skipped": bool(self.skipped),
            "losses": per_task(self.losses.float()),
            "weights": per_task(weights.float()) if weights is not None and weights.dim() == 1
            else None if weights is None else weights.float().tolist(),
            "grad_norms": per_task(None if cos is None else self.grad_norms().float()),
            "cosine": None if cos is None else cos.float().tolist(),
            "conflicting_pairs": None if conflicts is None else int(conflicts),
        }
