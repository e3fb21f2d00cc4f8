"""CAGrad: Conflict-Averse Gradient Descent for Multi-task Learning (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

from typing import Literal

import torch

from ..ops import solvers
from .base import GramMethod, NonFinitePolicy

__all__ = ["CAGrad"]

_RESCALE_MODES = (0, 1, 2)


class CAGrad(GramMethod):
    """``d = g_0 + (c |g_0| / |g_w|) g_w``, ``w = argmin_{w in simplex} g_w . g_0 + c |g_0| |g_w|``
    (``g_0`` the mean gradient), divided by ``1 + c^2`` (``rescale=1``, the official code's
    default), ``1 + c`` (``rescale=2``) or not at all (``rescale=0``).

    The inner problem is solved exactly (``ops.solvers.cagrad_weights``; the paper uses
    scipy's SLSQP, torchjd cvxpy/Clarabel). When ``0`` is in the convex hull of the gradients
    (``|g_w| = 0``, a Pareto-stationary point) the update is 0, as in torchjd.
    ``c = 0.4`` is the paper's setting for NYUv2 and CityScapes.
    """

    def __init__(
        self,
        c: float = 0.4,
        rescale: Literal[0, 1, 2] = 1,
        *,
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        if not (isinstance(c, (int, float)) and c >= 0):
            raise ValueError(f"c must be a non-negative number, got {c!r}")
        if rescale not in _RESCALE_MODES:
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
        self.c = float(c)
        self.rescale = rescale

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        K, _ = solvers.normalize_gram(gram)
        T = K.shape[-1]
        p = torch.full(K.shape[:-1], 1.0 / T, dtype=K.dtype, device=K.device)
        w = solvers.cagrad_weights(K, p, self.c)
        r = self.c * (p * (K @ p.unsqueeze(-1)).squeeze(-1)).sum(-1).clamp_min(0).sqrt()
        gw_norm = (w * (K @ w.unsqueeze(-1)).squeeze(-1)).sum(-1).clamp_min(0).sqrt()
        moving = gw_norm > solvers.DUAL_TOL
        coef = torch.where(moving, r / torch.where(moving, gw_norm, 1.0), 0.0)
        out = torch.where(moving.unsqueeze(-1) | (r == 0).unsqueeze(-1),
                          p + coef.unsqueeze(-1) * w, 0.0)
        if self.rescale == 1:
            out = out / (1 + self.c**2)
        elif self.rescale == 2:
            out = out / (1 + self.c)
        return out.to(gram.dtype)

    def extra_repr(self) -> str:
        return f"c={self.c}, rescale={self.rescale}, {super().extra_repr()}"
