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
    scipy's SLSQP, torchjd cvxpy/Clarabel). ``c = 0.4`` is the paper's setting for NYUv2 and
    CityScapes.

    Pareto-stationary points (``0`` in the convex hull of the gradients, e.g. ``g, -g``):
    for ``c >= 1`` the update is exactly 0, the paper's optimum there (``d = 0`` is in the
    ball and no ``d`` does better than ``min_i g_i . d = 0``), decided scale-free by
    :func:`mtlfast.ops.solvers.zero_in_hull`. For ``c < 1`` the formula applies as long as the
    inner optimum has ``g_w != 0``; where it is ``g_w = 0`` (``0`` on the boundary of the hull
    with ``c`` large enough, e.g. ``g, -g, h`` with ``c >= |cos(g, h)|``) the update is 0 when
    ``|g_w|`` is rounding noise (as torchjd: no conflict, but outside the ball) and otherwise
    follows the solver's residual ``g_w``, whose direction is not meaningful.
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
        gw_sq = (w * (K @ w.unsqueeze(-1)).squeeze(-1)).sum(-1).clamp_min(0)
        # |g_w|^2 within the rounding of w^T K w (relative to the unsigned sum_i w_i |g_i|):
        # g_w is noise, its direction arbitrary.
        scale = (w * K.diagonal(dim1=-2, dim2=-1).sqrt()).sum(-1)
        moving = gw_sq > T * torch.finfo(gram.dtype).eps * scale * scale
        gw_norm = gw_sq.sqrt()
        coef = torch.where(moving, r / torch.where(moving, gw_norm, 1.0), 0.0)
        out = torch.where(moving.unsqueeze(-1) | (r == 0).unsqueeze(-1),
                          p + coef.unsqueeze(-1) * w, 0.0)
        if self.c >= 1:
            # 0 in the hull: min_w g_w . g_0 + c |g_0| |g_w| >= (c - 1) |g_0| |g_w| >= 0 is
            # attained at g_w = 0, and d = 0 is in the ball |d - g_0| <= c |g_0| with the
            # optimal value 0. Decided on the unit vectors, exactly, whatever the norms.
            out = torch.where(solvers.zero_in_hull(K, gram.dtype).unsqueeze(-1), 0.0, out)
        if self.rescale == 1:
            out = out / (1 + self.c**2)
        elif self.rescale == 2:
            out = out / (1 + self.c)
        return out.to(gram.dtype)

    def extra_repr(self) -> str:
        return f"c={self.c}, rescale={self.rescale}, {super().extra_repr()}"
