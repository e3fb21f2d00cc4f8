"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022)."""

from __future__ import annotations

import torch

from ..ops.solvers_nonlinear import clip_update_norm, power_fixed_point
from .base import GramMethod

__all__ = ["NashMTL"]


class NashMTL(GramMethod):
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
    Not scale-homogeneous: the clip to ``max_norm`` is absolute (``max_norm=0`` removes it).

    State (buffers, in ``state_dict``): the step counter ``calls`` and the cached ``alpha``
    (``cached_alpha``). Both live on the Gram's device and the reuse is selected there, so a
    step never reads the device (with ``update_weights_every > 1`` the root is computed every
    step and the cached one kept where due).
    """

    state_names = ("cached_alpha", "calls")
    deterministic = False

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

    @property
    def _calls(self) -> int:
        """Steps taken so far (reads the device)."""
        return 0 if self.calls is None else int(self.calls)

    def _initial_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cached_alpha": torch.ones(like.shape[:-1], dtype=like.dtype, device=like.device),
                "calls": torch.zeros((), dtype=torch.int64, device=like.device)}

    def _step(self, gram, losses, state):
        alpha = power_fixed_point(gram, 1.0, self.optim_niter)
        calls = state["calls"]
        if self.update_weights_every > 1:
            due = calls % self.update_weights_every == 0
            alpha = torch.where(due, alpha, state["cached_alpha"].to(alpha))
        new = {"cached_alpha": alpha, "calls": calls + 1}
        w = alpha.to(gram.dtype)
        if self.max_norm > 0:
            w = clip_update_norm(w, gram, self.max_norm)
        return w, new

    def extra_repr(self) -> str:
        return (f"max_norm={self.max_norm}, update_weights_every={self.update_weights_every}, "
                f"optim_niter={self.optim_niter}, {super().extra_repr()}")
