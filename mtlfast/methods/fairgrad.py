"""FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024)."""

from __future__ import annotations

import torch

from ..ops.solvers_nonlinear import power_fixed_point
from .base import GramMethod

__all__ = ["FairGrad"]


class FairGrad(GramMethod):
    """alpha-fair update: ``w > 0`` with ``K w = w^(-1/alpha)``; ``alpha = 0`` gives ``w = 1/T``.

    The paper's step (its Eq. 4, solved in the official code by ``scipy.least_squares`` on the
    CPU) is found here on the Gram's device as the minimizer of the convex
    ``1/2 w^T K w - sum_i h(w_i)``, ``h'(w) = w^(-1/alpha)``, by ``iters`` damped Newton steps
    on ``K / ||K||_F`` and an exact rescaling (the root scales as ``||K||_F^(-alpha/(alpha+1))``),
    see :func:`mtlfast.ops.solvers_nonlinear.power_fixed_point`. ``alpha = 1`` is
    proportional fairness, Nash-MTL's equation (without its clip). ``K -> s K`` scales ``w``
    by ``s^(-alpha/(alpha+1))``. Where no finite root exists (a zero gradient, or 0 in the
    convex hull of the gradients, e.g. ``g, -g``) the weights along that direction grow at
    most 2x per Newton step and stay finite (their update is 0 there).
    """

    def __init__(self, *, alpha: float = 1.0, iters: int = 25, on_nonfinite: str = "raise") -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if iters < 1:
            raise ValueError(f"iters must be >= 1, got {iters}")
        self.alpha = float(alpha)
        self.iters = int(iters)

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        if self.alpha == 0:
            T = gram.shape[-1]
            return torch.full(gram.shape[:-1], 1.0 / T, dtype=gram.dtype, device=gram.device)
        return power_fixed_point(gram, self.alpha, self.iters)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, iters={self.iters}, {super().extra_repr()}"
