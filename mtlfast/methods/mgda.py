"""MGDA: the min-norm point of the convex hull of the task gradients (Desideri, 2012;
Sener & Koltun, NeurIPS 2018)."""

from __future__ import annotations

import torch

from ..ops import solvers
from .base import GramMethod

__all__ = ["MGDA"]


class MGDA(GramMethod):
    """``w = argmin_{w in simplex} |w @ G|^2``, ``d = w @ G`` (exact).

    T = 2: the closed form ``w_1 = clip((K_22 - K_12) / (K_11 + K_22 - 2 K_12), 0, 1)``
    (``1/2`` for identical gradients). T > 2: the exact active-set solve of
    ``ops.solvers.nnqp`` on the simplex, the optimum to rounding error (torchjd's and the
    paper's Frank-Wolfe stop at a tolerance instead). The solve rounds relative to the
    largest gradient: with norms spanning 1e8 and more, ``(w @ G) . g_i >= 0`` holds to about
    ``1e-8 |g_i| max_j |g_j|`` (tests/methods/test_adversarial.py).
    """

    non_conflicting = True

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        K, _ = solvers.normalize_gram(gram)
        T = K.shape[-1]
        if T == 2:
            k11, k22, k12 = K[..., 0, 0], K[..., 1, 1], K[..., 0, 1]
            den = k11 + k22 - 2 * k12
            w1 = torch.where(den > 0, (k22 - k12) / torch.where(den > 0, den, 1.0), 0.5)
            w1 = w1.clamp(0.0, 1.0)
            w = torch.stack([w1, 1 - w1], -1)
        else:
            b = torch.zeros(*K.shape[:-2], 1, T, dtype=K.dtype, device=K.device)
            w = solvers.nnqp(K, b, simplex=True).squeeze(-2)
        return w.to(gram.dtype)
