"""The engine's options (:class:`EngineConfig`) and what a step reports (:class:`StepInfo`)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
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

    def key(self) -> tuple:
        """Identity of the options (the process group by object)."""
        return (self.mode, self.chunk_size, self.jacobian_dtype, self.jacobian_budget,
                self.on_nonfinite, id(self.process_group), self.distributed_mode,
                self.bucket_cap_mb, self.vjp)


@dataclass
class StepInfo:
    """What one step computed. All tensors stay on the device (reading them syncs)."""

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
    #: The mode that ran: "jacobian", "gramian", "features" or "losses".
    mode: str
