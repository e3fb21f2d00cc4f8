"""The protocol every method follows.

A method is an ``nn.Module`` (its state lands in ``state_dict()``) that declares what it
needs from the engine:

- ``needs = "gram"``: ``weights(gram, losses=None) -> w`` from the ``(..., T, T)`` Gram
  ``K = G G^T``; the update is ``w @ G``. ``method(G)`` aggregates a ``(T, P)`` matrix.
- ``needs = "jacobian"``: ``aggregate(G, losses=None) -> (P,)`` needs the whole matrix.
- ``needs = "losses"``: ``loss_weights(losses) -> (T,)``; the engine does one backward of
  ``method(losses)``, the weighted (and, for some methods, regularized) total loss.

Non-finite input policy (``on_nonfinite``): ``"raise"`` (default) raises ``ValueError`` when
the Gram or the losses hold NaN/Inf (one host read per call to check); ``"skip"`` never reads
the device: the weights come back as zeros when anything was non-finite, so the step is a
no-op. Randomness comes from a ``torch.Generator`` owned by the method and saved in its state.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .. import ops

__all__ = ["GramMethod", "JacobianMethod", "LossMethod", "Method", "NonFinitePolicy"]

NonFinitePolicy = Literal["raise", "skip"]


class Method(nn.Module):
    """Base of all methods: the non-finite policy and the number of tasks it is bound to."""

    needs: ClassVar[str]
    #: True when the method's output is the same for the same input (no randomness, no state).
    deterministic: ClassVar[bool] = True

    def __init__(self, *, on_nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__()
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        self.num_tasks: int | None = None

    # The number of tasks is plain Python state (no device read to compare), kept in the
    # state_dict through nn.Module's extra-state hooks.
    def get_extra_state(self) -> Any:
        return {"num_tasks": self.num_tasks}

    def set_extra_state(self, state: Any) -> None:
        self.num_tasks = state["num_tasks"]

    def bind_tasks(self, num_tasks: int) -> None:
        """Fix T on first use; a later call with another T is an error for stateful methods."""
        if self.num_tasks is None or not self.stateful():
            self.num_tasks = num_tasks
        elif self.num_tasks != num_tasks:
            raise ValueError(
                f"{type(self).__name__} was used with T={self.num_tasks} tasks and keeps state "
                f"for them; got T={num_tasks} now (build a new method for another task set)"
            )

    def stateful(self) -> bool:
        """True when the method carries state across steps that depends on T."""
        return False

    def _check_losses(self, losses: torch.Tensor | None, num_tasks: int) -> torch.Tensor | None:
        if losses is None:
            return None
        if not isinstance(losses, torch.Tensor):
            raise TypeError(f"losses must be a tensor of shape ({num_tasks},), got {type(losses)}")
        if losses.shape[-1:] != (num_tasks,):
            raise ValueError(
                f"losses must have shape (..., {num_tasks}), got {tuple(losses.shape)}"
            )
        if not losses.is_floating_point():
            raise TypeError(f"losses must be floating point, got {losses.dtype}")
        return losses

    def _raise_if_nonfinite(self, **tensors: torch.Tensor | None) -> None:
        if self.on_nonfinite != "raise":
            return
        for name, t in tensors.items():
            if t is not None and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"{type(self).__name__}: {name} contains NaN or Inf "
                    "(build the method with on_nonfinite='skip' to skip such steps instead)"
                )

    @staticmethod
    def _all_finite(*tensors: torch.Tensor | None) -> torch.Tensor:
        oks = [torch.isfinite(t).all() for t in tensors if t is not None]
        return torch.stack(oks).all()

    def extra_repr(self) -> str:
        return f"on_nonfinite={self.on_nonfinite!r}"


class GramMethod(Method):
    """A method whose weights depend on the per-task gradients only through their Gram."""

    needs: ClassVar[str] = "gram"
    #: True when the paper proves ``(w @ G) . g_i >= 0`` for every task i.
    non_conflicting: ClassVar[bool] = False
    #: False when the weights ignore the Gram (Mean, Sum): ``method(G)`` then never forms it.
    reads_gram: ClassVar[bool] = True
    #: The step's finiteness flag while ``_weights`` runs under the skip policy, else None.
    _step_ok: torch.Tensor | None = None

    def weights(self, gram: torch.Tensor, losses: torch.Tensor | None = None, *,
                finite: torch.Tensor | None = None) -> torch.Tensor:
        """Combination weights ``w`` (``(..., T)``) such that the update is ``w @ G``.

        ``finite``: a device bool the caller already computed for ``gram`` and ``losses`` (the
        engine's skip path). Given, the step follows the skip policy on it whatever this
        method's ``on_nonfinite``, and nothing is read back to the host (CUDA-graph safe).
        """
        if not isinstance(gram, torch.Tensor):
            raise TypeError(f"gram must be a tensor of shape (..., T, T), got {type(gram)}")
        if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2] or gram.shape[-1] == 0:
            raise ValueError(
                f"gram must have shape (..., T, T) with T > 0, got {tuple(gram.shape)}"
            )
        if not gram.is_floating_point():
            raise TypeError(f"gram must be floating point, got {gram.dtype}")
        num_tasks = gram.shape[-1]
        losses = self._check_losses(losses, num_tasks)
        if finite is None:
            self._raise_if_nonfinite(gram=gram, losses=losses)
        self.bind_tasks(num_tasks)
        if finite is not None or self.on_nonfinite == "skip":
            ok = self._all_finite(gram, losses) if finite is None else finite
            safe_gram = torch.where(ok, gram, torch.eye(num_tasks, dtype=gram.dtype,
                                                        device=gram.device))
            safe_losses = None if losses is None else torch.where(ok, losses, 1.0)
            self._step_ok = ok  # on the device, never read: masks state writes in _weights
            try:
                w = self._weights(safe_gram, safe_losses)
            finally:
                self._step_ok = None
            return torch.where(ok & torch.isfinite(w).all(), w, 0.0)
        return self._weights(gram, losses)

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _keep_if_skipped(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """For state written in ``_weights``: ``new``, or ``old`` when this step is skipped for
        non-finite input (skip policy; selected on the device)."""
        if self._step_ok is None:
            return new
        return torch.where(self._step_ok, new, old)

    def forward(self, G: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        """Aggregate a ``(T, P)`` matrix: ``weights(gram(G)) @ G``."""
        if not isinstance(G, torch.Tensor) or G.dim() != 2:
            raise ValueError(f"{type(self).__name__}: G must be a (T, P) tensor")
        if self.reads_gram:
            return ops.combine(self.weights(ops.gram(G), losses), G)
        # Weights that ignore the Gram: skip its pass over G and apply the non-finite policy
        # to the update instead (a NaN/Inf in G reaches it).
        dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
        w = self.weights(torch.eye(G.shape[0], dtype=dtype, device=G.device), losses)
        update = ops.combine(w, G)
        self._raise_if_nonfinite(G=update)
        if self.on_nonfinite == "skip":
            update = torch.where(self._all_finite(update), update, 0.0)
        return update


class JacobianMethod(Method):
    """A method that needs the whole ``(T, P)`` matrix of per-task gradients."""

    needs: ClassVar[str] = "jacobian"

    def aggregate(self, G: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, G: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        return self.aggregate(G, losses)


class LossMethod(Method):
    """A method that only re-weights the losses; the engine does one ordinary backward."""

    needs: ClassVar[str] = "losses"

    def loss_weights(self, losses: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        """The scalar to back-propagate: ``sum_t w_t L_t`` (subclasses may add regularizers)."""
        return (self.loss_weights(losses) * losses).sum()
