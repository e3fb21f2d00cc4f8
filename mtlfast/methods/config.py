"""ConFIG (Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural
Networks", ICLR 2025; arXiv 2024), expressed through the Gram matrix."""

from __future__ import annotations

import torch

from ..ops.solvers_nonlinear import config_weights
from ._state import as_pref_vector, pref_on_device
from .base import GramMethod

__all__ = ["ConFIG"]


class ConFIG(GramMethod):
    """Conflict-free update ``d = (sum_i g_i . v) v``, ``v = unit(pinv(U) pref)``, ``U`` unit rows.

    Through the Gram: ``pinv(U) pref = G^T c`` with ``c = D^-1/2 C^+ pref`` (``D = diag K``,
    ``C = D^-1/2 K D^-1/2``), hence ``w = c (1^T K c) / (c^T K c)``. ``pref`` defaults to
    ones (the paper's equal weighting). Zero gradients get weight 0; the pseudo-inverse drops
    eigenvalues of ``C`` at most ``lambda_max T eps`` (eps of the Gram's dtype), which is
    rounding noise of a Gram (the explicit ``pinv(U)`` resolves finer, to ``sqrt`` of that).

    Non-conflicting (``u_i . d = pref_i > 0`` up to the length) when the unit gradients are
    linearly independent. Dependent ones (T > P, duplicated or antiparallel directions, 0 in
    the hull): the paper's least-squares ``pinv(U) pref``, whose projections
    ``(C C^+ pref)_i`` and length ``sum_i g_i . v`` may be negative, so the update may
    conflict with some tasks; where ``C C^+ pref`` is rounding noise (``g, -g``) it is 0.
    """

    non_conflicting = True

    def __init__(
        self, *, pref_vector: torch.Tensor | None = None, on_nonfinite: str = "raise"
    ) -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        self.pref_vector = as_pref_vector(pref_vector)

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        return config_weights(gram, pref_on_device(self.pref_vector, gram))
