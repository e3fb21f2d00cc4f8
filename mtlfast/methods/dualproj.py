"""DualProj: the mean gradient projected onto the dual cone of the task gradients (the
projection of GEM, Lopez-Paz & Ranzato, NeurIPS 2017; as an aggregator in Quinton & Rey, 2024)."""

from __future__ import annotations

import torch

from ..ops import solvers
from ._state import pref_weights
from .upgrad import PreferenceProjection

__all__ = ["DualProj"]


class DualProj(PreferenceProjection):
    """``d = argmin_{G d >= 0} |d - p @ G|^2`` (``p = 1/T`` each by default).

    Dual: ``d = v @ G`` with ``v = argmin_{v >= p} v^T K v``, solved exactly by
    ``ops.solvers.nnqp`` on ``x = v - p >= 0`` (``b = K p``).
    """

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        K, _ = solvers.normalize_gram(gram)
        p = pref_weights(self.pref_vector, K)
        b = (K @ p.unsqueeze(-1)).transpose(-1, -2)
        x = solvers.nnqp(K, b).squeeze(-2)
        return (p + x).to(gram.dtype)
