"""MoDo (Chen et al., "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
Generalization and Conflict-Avoidance", NeurIPS 2023)."""

from __future__ import annotations

import torch

from ._simplex import check_real, project_simplex
from ._state import state_dtype
from .base import GramMethod, NonFinitePolicy

__all__ = ["MoDo"]


class MoDo(GramMethod):
    """Multi-objective gradient with double sampling: ``d = lambda @ G_3`` after
    ``lambda <- Proj_simplex(lambda - gamma (G_1 G_2^T lambda + rho lambda))``.

    ``lambda`` (buffer ``lambd``, ``1/T`` at the start, shape ``(..., T)`` like the Gram's
    rows) is the state; each step moves it by one projected gradient step on
    ``1/2 |G^T lambda|^2 + rho/2 |lambda|^2`` and returns the new ``lambda`` as the weights
    (on the simplex). ``gamma = 1e-3`` and ``rho = 0.1`` are LibMTL's defaults (``MoDo_gamma``,
    ``MoDo_rho``); LibMTL and the paper's official code also use the new ``lambda`` for the
    update of the same step.

    Deviation (the one-step protocol gives one ``G`` per step): the paper and LibMTL draw three
    independent mini-batches per step, ``G_1 G_2^T lambda`` (an unbiased estimate of the
    gradient of ``1/2 |E[G]^T lambda|^2``) from the first two and the update ``lambda @ G_3``
    from the third. Here all three are the step's one batch: ``lambda`` moves along
    ``K lambda = G G^T lambda``, which estimates ``E[G] E[G]^T lambda`` plus the batch's
    gradient covariance (a bias the double sampling removes), and the update uses the same
    batch. The projection is exact (the threshold of LibMTL's sort-based rule), on the device.

    Not scale-homogeneous (as in the paper): ``gamma`` is absolute, so ``K -> s K`` changes
    how far ``lambda`` moves.
    """

    state_names = ("lambd",)
    deterministic = False

    def __init__(self, *, gamma: float = 1e-3, rho: float = 0.1,
                 on_nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        self.gamma = check_real("gamma", gamma, low=0.0, low_open=True)
        self.rho = check_real("rho", rho, low=0.0)

    def _initial_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        T = like.shape[-1]
        return {"lambd": torch.full(like.shape[:-1], 1.0 / T, dtype=state_dtype(like.dtype),
                                    device=like.device)}

    def _step(self, gram, losses, state):
        lam = state["lambd"]
        if lam.shape != gram.shape[:-1]:
            raise ValueError(f"MoDo keeps weights of shape {tuple(lam.shape)}; got a Gram of "
                             f"shape {tuple(gram.shape)}")
        K = gram.to(torch.float64)
        K = (K + K.transpose(-1, -2)) / 2
        x = lam.to(torch.float64)
        grad = (K @ x.unsqueeze(-1)).squeeze(-1) + self.rho * x
        new = project_simplex(x - self.gamma * grad)
        return new.to(gram.dtype), {"lambd": new.to(lam.dtype)}

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, rho={self.rho}, {super().extra_repr()}"
