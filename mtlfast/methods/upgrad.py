"""UPGrad: Jacobian Descent for Multi-Objective Optimization (Quinton & Rey, 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ops import solvers
from ._common import host_to_device
from .base import GramMethod, NonFinitePolicy

__all__ = ["UPGrad"]


def pref_weights(pref_vector: torch.Tensor | None, K: torch.Tensor) -> torch.Tensor:
    """The preference vector broadcast to ``K``'s batch (``1/T`` each when None)."""
    T = K.shape[-1]
    if pref_vector is None:
        return torch.full(K.shape[:-1], 1.0 / T, dtype=K.dtype, device=K.device)
    if pref_vector.shape != (T,):
        raise ValueError(f"pref_vector has shape {tuple(pref_vector.shape)}, the Gram T={T}")
    return host_to_device(pref_vector.to(K.dtype), K.device).expand(K.shape[:-1])


def as_pref_vector(pref_vector: Sequence[float] | torch.Tensor | None) -> torch.Tensor | None:
    if pref_vector is None:
        return None
    p = torch.as_tensor(pref_vector, dtype=torch.float64)
    if p.dim() != 1 or not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError("pref_vector must be a 1-D sequence of finite non-negative numbers")
    return p


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
