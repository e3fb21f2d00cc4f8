"""CAGrad: Conflict-Averse Gradient Descent for Multi-task Learning (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

from typing import Literal

import torch

from ..ops import solvers
from .base import GramMethod, NonFinitePolicy

__all__ = ["CAGrad"]

_RESCALE_MODES = (0, 1, 2)
#: Relative slack of the test |d - g_0|^2 <= r^2 (the nearest point of the cone is exact).
_BALL_TOL = 1e-9


class CAGrad(GramMethod):
    """``d = g_0 + (c |g_0| / |g_w|) g_w``, ``w = argmin_{w in simplex} g_w . g_0 + c |g_0| |g_w|``
    (``g_0`` the mean gradient), divided by ``1 + c^2`` (``rescale=1``, the official code's
    default), ``1 + c`` (``rescale=2``) or not at all (``rescale=0``).

    The inner problem is solved exactly (``ops.solvers.cagrad_weights``; the paper uses
    scipy's SLSQP, torchjd cvxpy/Clarabel). ``c = 0.4`` is the paper's setting for NYUv2 and
    CityScapes.

    Pareto-stationary points (``0`` in the convex hull of the gradients, e.g. ``g, -g``),
    decided scale-free by :func:`mtlfast.ops.solvers.zero_in_hull`: no ``d`` does better
    than ``min_i g_i . d = 0``. For ``c >= 1`` the update is exactly 0 (in the ball, optimal).
    For ``c < 1``, where the ball meets the cone ``{G d >= 0}`` (the inner optimum is
    ``g_w = 0``, e.g. ``g, -g, h`` with ``c >= |cos(g, h)|``), the formula has no direction and
    the update is the cone's point nearest ``g_0`` (optimal, in the ball); elsewhere the
    formula applies. Limit: the inner solve runs on K, so with norms spanning more than about
    1e4 the direction of a tiny ``g_w`` is resolved only to the rounding of the largest
    gradients (measured: ``min_i g_i . d`` short of the optimum by up to 1e-5 at a 1e8 span,
    2e-3 at 1e16, in units of the largest norm squared).
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
        # 0 in the hull (decided on the unit vectors, whatever the norms): no d beats
        # min_i g_i . d = 0, so every d of the ball |d - g_0| <= r with G d >= 0 is optimal.
        stationary = solvers.zero_in_hull(K, gram.dtype).unsqueeze(-1)
        if self.c >= 1:
            # d = 0 is in the ball (min_w g_w . g_0 + r |g_w| >= (c - 1) |g_0| |g_w| >= 0).
            out = torch.where(stationary, 0.0, out)
        else:
            # Where the ball meets the cone {G d >= 0} the inner optimum is g_w = 0 and the
            # formula has no direction; the cone's point nearest g_0 (DualProj of g_0,
            # d = (p + x) @ G, x = argmin_{x >= 0} |(p + x) @ G|^2) is then in the ball.
            x = solvers.nnqp(K, (K @ p.unsqueeze(-1)).transpose(-1, -2)).squeeze(-2)
            dist_sq = (x * (K @ x.unsqueeze(-1)).squeeze(-1)).sum(-1, keepdim=True)
            meets = dist_sq <= (r * r).unsqueeze(-1) * (1 + _BALL_TOL)
            out = torch.where(stationary & meets, p + x, out)
        if self.rescale == 1:
            out = out / (1 + self.c**2)
        elif self.rescale == 2:
            out = out / (1 + self.c)
        return out.to(gram.dtype)

    def extra_repr(self) -> str:
        return f"c={self.c}, rescale={self.rescale}, {super().extra_repr()}"
