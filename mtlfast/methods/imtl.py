"""IMTL-G: Towards Impartial Multi-task Learning (Liu et al., ICLR 2021), gradient part."""

from __future__ import annotations

import torch

from ..ops import solvers
from ..ops.solvers_nonlinear import imtl_weights
from .base import GramMethod

__all__ = ["IMTLG"]


class IMTLG(GramMethod):
    """``w = v / sum(v)``, ``v = K^+ sqrt(diag K)``: the combination whose projections on every
    unit task gradient are equal, ``d . g_i / |g_i| = const`` (IMTL-G's condition), with
    ``sum w = 1``.

    The pseudo-inverse form is torchjd's generalization (Quinton & Rey, 2024) to linearly
    dependent gradients; it equals the paper's closed form when the gradients are independent.
    The pseudo-inverse comes from the eigendecomposition of the scaled Gram, dropping
    eigenvalues below ``T eps`` times the largest (torch.linalg.pinv's default)
    (:func:`mtlfast.ops.solvers_nonlinear.imtl_weights`: one kernel on CUDA).
    """

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        K, _ = solvers.normalize_gram(gram)
        return imtl_weights(K).to(gram.dtype)
