"""GradVac (Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization
in Massively Multilingual Models", ICLR 2021)."""

from __future__ import annotations

import torch

from ..ops.solvers_nonlinear import gradvac_sweep
from ._state import RandomStream, host_to_device
from .base import GramMethod

__all__ = ["GradVac"]

GRANULARITIES = ("model", "parameter")


class GradVac(GramMethod):
    """Gradient vaccine: raise each pair's cosine to its EMA target ``phi_hat`` (``w @ G``).

    For each task i, the others j in a random order: ``cos = g_i^PC . g_j / (|g_i^PC| |g_j|)``;
    if ``cos < phi_hat_ij``, ``g_i^PC += |g_i^PC| (phi_hat sqrt(1-cos^2) - cos sqrt(1-phi_hat^2))
    / (|g_j| sqrt(1-phi_hat^2)) g_j``; then ``phi_hat_ij <- (1-beta) phi_hat_ij + beta cos``.
    The update is ``sum_i g_i^PC``; every dot product comes from the Gram
    (:func:`mtlfast.ops.solvers_nonlinear.gradvac_sweep`). ``beta = 0.5`` and ``eps = 1e-8``
    as LibMTL and torchjd; ``eps`` is absolute, so the weights are not scale-homogeneous for
    gradient norms near ``sqrt(eps)``.

    Granularity (read by the engine from ``method.granularity``):

    - ``"model"``: one ``(T, T)`` Gram of all shared parameters, weights ``(T,)``.
    - ``"parameter"`` (the paper's per-parameter-block variant): the engine passes a batch of
      Grams ``(L, T, T)``, one per shared parameter tensor in ``shared`` order, and combines
      row ``l`` of the weights ``(L, T)`` with the per-task gradients of parameter ``l``.

    The EMA targets ``phi_hat`` (buffer, zeros at first use) have the Gram's shape, so the
    number of blocks L is fixed by the first call. The visiting orders (one per task i, shared
    by all blocks, as LibMTL) come from the counter-based state ``rng_state = [seed, step]``
    (``seed`` None: drawn from torch's global generator), advanced on the Gram's device: no
    host read, and a skipped step keeps the counter.
    """

    state_names = ("phi_hat",)
    deterministic = False

    def __init__(
        self,
        *,
        beta: float = 0.5,
        eps: float = 1e-8,
        granularity: str = "model",
        seed: int | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.beta = float(beta)
        self.eps = float(eps)
        self.granularity = granularity
        self.rng = RandomStream(seed)
        self.rng.register(self)

    def _current_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        state = super()._current_state(like)
        state["rng_state"] = host_to_device(self.rng_state, like.device)
        return state

    def _initial_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"phi_hat": torch.zeros_like(like)}

    @staticmethod
    def _orders(counter: torch.Tensor, T: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Visiting orders ``(T, T-1)`` and the advanced counter: row i is a random permutation
        of the positions in ``[j for j in range(T) if j != i]`` (task ``j = p + (p >= i)``)."""
        perms, counter = RandomStream.orders(counter, (T,), device)
        own = torch.arange(T, device=perms.device)[:, None]
        # Drop task i from row i (moved last by a stable sort), then tasks -> positions.
        rank = torch.where(perms == own, T, torch.arange(T, device=perms.device))
        others = perms.gather(1, rank.argsort(dim=1, stable=True))[:, : T - 1]
        return others - (others > own).to(others.dtype), counter

    def draw_orders(self, num_tasks: int) -> torch.Tensor:
        """Next visiting orders ``(T, T-1)`` (advances the counter)."""
        orders, self.rng_state = self._orders(self.rng_state, num_tasks, self.rng_state.device)
        return orders

    def _step(self, gram, losses, state):
        phi = state["phi_hat"]
        if phi.shape != gram.shape:
            raise ValueError(f"GradVac keeps EMA targets of shape {tuple(phi.shape)}; "
                             f"got a Gram of shape {tuple(gram.shape)}")
        orders, counter = self._orders(state["rng_state"], gram.shape[-1], gram.device)
        w, new_phi = gradvac_sweep(gram, phi, orders, self.beta, self.eps)
        return w, {"phi_hat": new_phi.to(phi), "rng_state": counter}

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, eps={self.eps}, granularity={self.granularity!r}, "
                f"{super().extra_repr()}")
