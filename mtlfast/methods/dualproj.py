"""DualProj: the mean gradient projected onto the dual cone of the task gradients (the
projection of GEM, Lopez-Paz & Ranzato, NeurIPS 2017; as an aggregator in Quinton & Rey, 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ops import solvers
from .base import GramMethod, NonFinitePolicy
from .upgrad import as_pref_vector, pref_weights

__all__ = ["DualProj"]


class DualProj(GramMethod):
    """``d = argmin_{G d >= 0} |d - p @ G|^2`` (``p = 1/T`` each by default).

    Dual: ``d = v @ G`` with ``v = argmin_{v >= p} v^T K v``, solved exactly by
    ``ops.solvers.nnqp`` on ``x = v - p >= 0`` (``b = K p``).
    """

    non_conflicting = True

    def __init__(
        self,
        pref_vector: Sequence[float] | torch.Tensor | None = None,
        *,
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        self.pref_vector = as_pref_vector(pref_vector)

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        K, _ = solvers.normalize_gram(gram)
        p = pref_weights(self.pref_vector, K)
        b = (K @ p.unsqueeze(-1)).transpose(-1, -2)
        x = solvers.nnqp(K, b).squeeze(-2)
        return (p + x).to(gram.dtype)
