"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022)."""

from __future__ import annotations

from typing import Any

import torch

from ..ops.solvers_nonlinear import power_fixed_point
from ._stateful import StatefulGramMethod

__all__ = ["NashMTL"]


class NashMTL(StatefulGramMethod):
    """Nash bargaining solution: ``w = alpha`` with ``K alpha = 1 / alpha``, alpha > 0.

    As in the official code, the solution is recomputed every ``update_weights_every`` calls
    and reused in between, and the update is clipped:
    ``w <- w * max_norm / ||w @ G||`` when ``||w @ G|| = sqrt(w^T K w) > max_norm``
    (``max_norm = 0`` disables the clip).

    The official code approximates the root with ``optim_niter`` convex-concave steps in
    cvxpy on the CPU (stopping at ``||K a - 1/a|| < 1e-3``); here the same root is found to
    rounding on the Gram's device as the minimizer of ``1/2 a^T K a - sum_i log a_i`` by
    ``optim_niter`` damped Newton steps on ``K / ||K||_F`` and an exact rescaling
    (:func:`mtlfast.ops.solvers_nonlinear.power_fixed_point`). Unclipped, ``w @ G`` does not
    depend on the gradients' scale (``w`` scales as 1/scale). Where no finite root exists
    (a zero gradient, or tasks with a non-negative combination equal to 0, e.g. g and -g),
    the weights along that direction grow 2x per step and stay finite; their update is 0.

    State (in ``state_dict``): the call counter and the cached ``alpha`` (buffer
    ``cached_alpha``, created on first use).
    """

    lazy_buffers = ("cached_alpha",)

    def __init__(
        self,
        *,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        if max_norm < 0:
            raise ValueError(f"max_norm must be >= 0, got {max_norm}")
        if update_weights_every < 1:
            raise ValueError(f"update_weights_every must be >= 1, got {update_weights_every}")
        if optim_niter < 1:
            raise ValueError(f"optim_niter must be >= 1, got {optim_niter}")
        self.max_norm = float(max_norm)
        self.update_weights_every = int(update_weights_every)
        self.optim_niter = int(optim_niter)
        self.cached_alpha: torch.Tensor | None
        self._calls = 0

    def get_extra_state(self) -> Any:
        return {**super().get_extra_state(), "calls": self._calls}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self._calls = state["calls"]

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        if self.cached_alpha is None or self._calls % self.update_weights_every == 0:
            alpha = power_fixed_point(gram, 1.0, self.optim_niter)
            previous = (torch.ones_like(alpha) if self.cached_alpha is None
                        else self.cached_alpha.to(alpha))
            self.cached_alpha = self._keep_if_skipped(alpha, previous)
        self._calls += 1
        alpha = self.cached_alpha.to(gram.dtype)
        if self.max_norm > 0:
            norm = (alpha * (gram @ alpha[..., None])[..., 0]).sum(-1, keepdim=True)
            norm = norm.clamp_min(0).sqrt()
            alpha = alpha * torch.where(norm > self.max_norm, self.max_norm / norm, 1.0)
        return alpha

    def extra_repr(self) -> str:
        return (f"max_norm={self.max_norm}, update_weights_every={self.update_weights_every}, "
                f"optim_niter={self.optim_niter}, {super().extra_repr()}")
