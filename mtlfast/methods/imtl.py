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

    Independent gradients: ``v = D^-1 C^-1 1`` on the cosine matrix ``C = D^-1 K D^-1``
    (``D = diag(sqrt K_ii)``), the paper's closed form, exact whatever the spread of the norms.
    Linearly dependent gradients (C singular to ``T eps``): torchjd's generalization
    (Quinton & Rey, 2024) ``K^+``, whose eigenvalue cutoff (``T eps`` times the largest) is
    relative to the largest norm; the condition then holds only where it has a solution
    (duplicated directions), and with norms spanning ``1 / sqrt(T eps)`` or more a small task
    is dropped (:func:`mtlfast.ops.solvers_nonlinear.imtl_weights`). Zero gradients get
    weight 0; ``w = 0`` when ``|sum v|`` vanishes (``g, -g``).
    """

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        K, _ = solvers.normalize_gram(gram)
        return imtl_weights(K).to(gram.dtype)
