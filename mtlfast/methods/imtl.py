"""IMTL-G: Towards Impartial Multi-task Learning (Liu et al., ICLR 2021), gradient part."""

from __future__ import annotations

import torch

from ..ops import solvers
from .base import GramMethod

__all__ = ["IMTLG"]

#: Relative threshold below which |sum v| counts as zero (the weights are then 0, as torchjd).
SUM_TOL = 1e-12


class IMTLG(GramMethod):
    """``w = v / sum(v)``, ``v = K^+ sqrt(diag K)``: the combination whose projections on every
    unit task gradient are equal, ``d . g_i / |g_i| = const`` (IMTL-G's condition), with
    ``sum w = 1``.

    The pseudo-inverse form is torchjd's generalization (Quinton & Rey, 2024) to linearly
    dependent gradients; it equals the paper's closed form when the gradients are independent.
    The pseudo-inverse comes from ``eigh`` of the scaled Gram, dropping eigenvalues below
    ``T eps`` times the largest (torch.linalg.pinv's default).
    """

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        K, _ = solvers.normalize_gram(gram)
        d = K.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
        evals, evecs = torch.linalg.eigh(K)
        cutoff = K.shape[-1] * torch.finfo(K.dtype).eps * evals.abs().amax(-1, keepdim=True)
        keep = evals > cutoff
        inv = torch.where(keep, 1.0 / torch.where(keep, evals, 1.0), 0.0)
        v = (evecs * inv.unsqueeze(-2)) @ (evecs.transpose(-1, -2) @ d.unsqueeze(-1))
        v = v.squeeze(-1)
        total = v.sum(-1, keepdim=True)
        ok = total.abs() > SUM_TOL * v.abs().sum(-1, keepdim=True)
        return torch.where(ok, v / torch.where(ok, total, 1.0), 0.0).to(gram.dtype)
