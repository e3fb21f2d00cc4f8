"""GradVac (Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization
in Massively Multilingual Models", ICLR 2021)."""

from __future__ import annotations

from typing import Any

import torch

from ..ops.solvers_nonlinear import gradvac_sweep
from ._common import host_to_device
from ._stateful import StatefulGramMethod

__all__ = ["GradVac"]

GRANULARITIES = ("model", "parameter")


class GradVac(StatefulGramMethod):
    """Gradient vaccine: raise each pair's cosine to its EMA target ``phi_hat`` (``w @ G``).

    For each task i, the others j in a random order: ``cos = g_i^PC . g_j / (|g_i^PC| |g_j|)``;
    if ``cos < phi_hat_ij``, ``g_i^PC += |g_i^PC| (phi_hat sqrt(1-cos^2) - cos sqrt(1-phi_hat^2))
    / (|g_j| sqrt(1-phi_hat^2)) g_j``; then ``phi_hat_ij <- (1-beta) phi_hat_ij + beta cos``.
    The update is ``sum_i g_i^PC``; every dot product comes from the Gram
    (:func:`mtlfast.ops.solvers_nonlinear.gradvac_sweep`). ``beta = 0.5`` and ``eps = 1e-8``
    as LibMTL and torchjd.

    Granularity (read by the engine from ``method.granularity``):

    - ``"model"``: one ``(T, T)`` Gram of all shared parameters, weights ``(T,)``.
    - ``"parameter"`` (the paper's per-parameter-block variant): the engine passes a batch of
      Grams ``(L, T, T)``, one per shared parameter tensor in ``shared`` order, and combines
      row ``l`` of the weights ``(L, T)`` with the per-task gradients of parameter ``l``.

    The EMA targets ``phi_hat`` (buffer, zeros at first use) have the Gram's shape, so the
    number of blocks L is fixed by the first call. The visiting orders (one per task i, shared
    by all blocks, as LibMTL) come from the method's own ``torch.Generator`` (seed ``seed``),
    whose state is saved in ``state_dict``; they are drawn on the host, so no device read.
    """

    lazy_buffers = ("phi_hat",)

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
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.phi_hat: torch.Tensor | None

    def get_extra_state(self) -> Any:
        return {**super().get_extra_state(), "generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.generator.set_state(state["generator"])

    def draw_orders(self, num_tasks: int) -> torch.Tensor:
        """Next visiting orders ``(T, T-1)`` (CPU int64): row i is a random permutation of the
        positions in ``[j for j in range(T) if j != i]`` (task ``j = p + (p >= i)``)."""
        return torch.rand(num_tasks, num_tasks - 1, generator=self.generator).argsort(-1)

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        if self.phi_hat is None:
            self.phi_hat = torch.zeros_like(gram)
        elif self.phi_hat.shape != gram.shape:
            raise ValueError(f"GradVac keeps EMA targets of shape {tuple(self.phi_hat.shape)}; "
                             f"got a Gram of shape {tuple(gram.shape)}")
        orders = self.draw_orders(gram.shape[-1])
        if gram.device.type != "cpu":  # the torch reference reads them on the Gram's device
            orders = host_to_device(orders, gram.device)
        w, phi = gradvac_sweep(gram, self.phi_hat, orders, self.beta, self.eps)
        self.phi_hat = self._keep_if_skipped(phi.to(self.phi_hat), self.phi_hat)
        return w

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, eps={self.eps}, granularity={self.granularity!r}, "
                f"{super().extra_repr()}")
