"""UPGrad: Jacobian Descent for Multi-Objective Optimization (Quinton & Rey, 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ops import solvers
from ._state import as_pref_vector, pref_weights
from .base import GramMethod, NonFinitePolicy

__all__ = ["UPGrad"]


class PreferenceProjection(GramMethod):
    """Shared by UPGrad and DualProj: projections onto the dual cone ``{d : G d >= 0}``,
    weighted by a preference vector ``p`` (``1/T`` each by default)."""

    non_conflicting = True

    def __init__(
        self,
        pref_vector: Sequence[float] | torch.Tensor | None = None,
        *,
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        self.pref_vector = as_pref_vector(pref_vector)


class UPGrad(PreferenceProjection):
    """``d = sum_i p_i pi(g_i)``: each gradient projected onto the dual cone
    ``{d : G d >= 0}``, weighted by the preference ``p`` (``1/T`` each by default).

    Through the dual (Proposition 1 of the paper): ``pi(p_i g_i) = v_i @ G`` with
    ``v_i = argmin_{v >= p_i e_i} v^T K v``; ``w = sum_i v_i``. Each QP is solved exactly by
    ``ops.solvers.nnqp`` on ``x = v - p_i e_i >= 0`` (``b = p_i K e_i``), T QPs per Gram.
    torchjd adds ``1e-4`` to the diagonal of the trace-normalized Gram; here it is exact.
    """

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        K, _ = solvers.normalize_gram(gram)
        p = pref_weights(self.pref_vector, K)
        b = p.unsqueeze(-1) * K  # row i: K (p_i e_i), K symmetric
        x = solvers.nnqp(K, b)
        return (p + x.sum(-2)).to(gram.dtype)
