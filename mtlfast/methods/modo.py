"""MoDo (Chen et al., "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
Generalization and Conflict-Avoidance", NeurIPS 2023)."""

from __future__ import annotations

import torch

from ._simplex import (
    check_batch_count,
    check_batches,
    check_real,
    cross_gram,
    on_last_batch,
    project_simplex,
)
from ._state import state_dtype
from .base import GramMethod, NonFinitePolicy

__all__ = ["MoDo"]


class MoDo(GramMethod):
    """Multi-objective gradient with double sampling: ``d = lambda @ G_zeta`` after
    ``lambda <- Proj_simplex(lambda - gamma (G_xi1 G_xi2^T lambda + rho lambda))``.

    ``lambda`` (buffer ``lambd``, ``1/T`` at the start, shape ``(..., T)``) is the state; each
    step moves it by one projected gradient step on ``1/2 |E[G]^T lambda|^2 + rho/2 |lambda|^2``
    and returns the new ``lambda`` as the weights (on the simplex). ``gamma = 1e-3`` and
    ``rho = 0.1`` are LibMTL's defaults (``MoDo_gamma``, ``MoDo_rho``); LibMTL and the paper's
    official code also use the new ``lambda`` for the update of the same step. The projection
    is exact (the threshold of LibMTL's sort-based rule), on the device.

    ``batches=3`` is the paper's and LibMTL's step, exactly: each step takes the losses of three
    independent mini-batches ``xi1, xi2, zeta`` stacked batch-major, ``3T`` losses (all tasks
    on ``xi1``, then on ``xi2``, then on ``zeta``), e.g. three forward passes and
    ``mtlfast.backward(torch.cat([losses_xi1, losses_xi2, losses_zeta]), shared, method)``.
    ``lambda`` moves along the block ``G_xi1 G_xi2^T`` of the ``3T x 3T`` Gram (an unbiased
    estimate of ``E[G] E[G]^T``) and the weights are zeros on ``xi1, xi2`` and ``lambda`` on
    ``zeta``, so the update is ``lambda @ G_zeta``. ``num_tasks`` then counts the ``3T`` losses.
    The heads (non-shared parameters) get the ordinary gradient of all ``3T`` losses, the three
    batches' summed (LibMTL's MoDo divides its decoders' by 3: divide the heads' ``.grad`` by 3
    after the call to match). Not with ``mode="features"`` (ValueError, read by the engine
    from ``method.batches``): gradients with respect to different batches' features have zero
    products, so the cross block would be 0.

    ``batches=1`` (default): one mini-batch per step, used three times: ``lambda`` moves along
    ``G G^T lambda``, which estimates ``E[G] E[G]^T lambda`` plus the batch's gradient
    covariance (the bias the double sampling removes), and the update uses the same batch.

    Not scale-homogeneous (as in the paper): ``gamma`` is absolute, so ``K -> s K`` changes
    how far ``lambda`` moves.
    """

    state_names = ("lambd",)
    deterministic = False

    def __init__(self, *, gamma: float = 1e-3, rho: float = 0.1, batches: int = 1,
                 on_nonfinite: NonFinitePolicy = "raise") -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        self.gamma = check_real("gamma", gamma, low=0.0, low_open=True)
        self.rho = check_real("rho", rho, low=0.0)
        self.batches = check_batches(batches)

    def check_tasks(self, num_tasks: int) -> None:
        check_batch_count("MoDo", num_tasks, self.batches)
        super().check_tasks(num_tasks)

    def _initial_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        T = like.shape[-1] // self.batches
        return {"lambd": torch.full((*like.shape[:-2], T), 1.0 / T,
                                    dtype=state_dtype(like.dtype), device=like.device)}

    def _step(self, gram, losses, state):
        K = cross_gram(gram, self.batches, "MoDo")
        lam = state["lambd"]
        if lam.shape != K.shape[:-1]:
            raise ValueError(f"MoDo keeps weights of shape {tuple(lam.shape)}; got a Gram of "
                             f"shape {tuple(gram.shape)} (batches={self.batches})")
        x = lam.to(torch.float64)
        grad = (K @ x.unsqueeze(-1)).squeeze(-1) + self.rho * x
        new = project_simplex(x - self.gamma * grad)
        return on_last_batch(new.to(gram.dtype), self.batches), {"lambd": new.to(lam.dtype)}

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, rho={self.rho}, batches={self.batches}, "
                f"{super().extra_repr()}")
