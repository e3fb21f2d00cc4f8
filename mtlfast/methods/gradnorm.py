"""GradNorm (Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
Multitask Networks", ICML 2018)."""

from __future__ import annotations

import torch

from ..ops.solvers_nonlinear import gradnorm_update
from .base import GramMethod

__all__ = ["GradNorm"]


class GradNorm(GramMethod):
    """Learned task weights ``w`` pulled toward ``w_i |g_i| = mean_j(w_j |g_j|) r_i^alpha``.

    Each call returns the current weights ``w`` (the update is ``w @ G``), then takes one step
    on the paper's loss ``L_grad = sum_i |w_i |g_i| - mean(w |g|) r_i^alpha|`` (target held
    constant), ``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))``:

    ``w_i <- w_i - lr |g_i| sign(w_i |g_i| - target_i) / mean_j |g_j|``, then
    ``w <- T max(w, 0) / sum(max(w, 0))`` (the paper's renormalization to sum T), see
    :func:`mtlfast.ops.solvers_nonlinear.gradnorm_update`.

    The division by the mean gradient norm makes ``lr`` scale-free (the paper feeds the raw
    gradient to the network's optimizer). ``|g_i| = sqrt(K_ii)`` comes from the Gram the
    engine gives: by default all shared parameters (the paper uses the last shared layer;
    pass that layer's Gram to match it). ``L_i(0)`` are the first losses seen; without
    losses ``r_i = 1`` (pure gradient-norm equalization).

    State (buffers, created on first use): ``task_weights`` (ones at start), ``initial_losses``
    and ``has_initial``.
    """

    state_names = ("task_weights", "initial_losses", "has_initial")
    deterministic = False

    def __init__(self, *, alpha: float = 1.5, lr: float = 0.025, on_nonfinite: str = "raise"):
        super().__init__(on_nonfinite=on_nonfinite)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.alpha = float(alpha)
        self.lr = float(lr)

    def _initial_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        shape = like.shape[:-1]
        return {"task_weights": torch.ones(shape, dtype=like.dtype, device=like.device),
                "initial_losses": torch.ones(shape, dtype=like.dtype, device=like.device),
                "has_initial": torch.zeros(shape[:-1] + (1,), dtype=torch.bool,
                                           device=like.device)}

    def _step(self, gram, losses, state):
        w = state["task_weights"]
        if w.shape != gram.shape[:-1]:
            raise ValueError(f"GradNorm keeps task weights of shape {tuple(w.shape)}; got a "
                             f"Gram of shape {tuple(gram.shape)}")
        w = w.to(gram.dtype)
        new, initial, has_initial = gradnorm_update(
            gram, w, losses, state["initial_losses"].to(gram.dtype), state["has_initial"],
            self.alpha, self.lr)
        # The weights are returned as a copy: the state is committed in place.
        return w.clone(), {"task_weights": new, "initial_losses": initial,
                           "has_initial": has_initial}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, lr={self.lr}, {super().extra_repr()}"
