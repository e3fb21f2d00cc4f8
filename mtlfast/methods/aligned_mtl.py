"""Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning",
CVPR 2023)."""

from __future__ import annotations

import torch

from ..ops.solvers_nonlinear import SCALE_MODES, aligned_mtl_weights
from ._state import as_pref_vector, pref_on_device
from .base import GramMethod

__all__ = ["AlignedMTL"]


class AlignedMTL(GramMethod):
    """Aligned update ``w = sqrt(s) V diag(lambda^-1/2) V^T pref`` from ``K = V diag(lambda) V^T``.

    ``G^T V diag(lambda^-1/2)`` are the orthonormal principal directions of the task
    gradients; rescaling them all to ``sqrt(s)`` makes the system's condition number 1.
    ``s`` (``scale_mode``): the smallest non-null eigenvalue ("min", the paper), their lower
    median ("median") or their mean ("rmse", as the original code). Eigenvalues at most
    ``lambda_max T eps`` are the null space and dropped (so with task-gradient norms spanning
    ``1 / sqrt(T eps)`` or more, about 1e7, the small tasks' directions count as null); a
    zero Gram gives ``w = pref``.
    ``pref`` defaults to ``1/T`` per task (as torchjd; the original code sums, i.e. ``1``).
    """

    def __init__(
        self,
        *,
        pref_vector: torch.Tensor | None = None,
        scale_mode: str = "min",
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
        self.pref_vector = as_pref_vector(pref_vector)
        self.scale_mode = scale_mode

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        return aligned_mtl_weights(gram, pref_on_device(self.pref_vector, gram), self.scale_mode)

    def extra_repr(self) -> str:
        return f"scale_mode={self.scale_mode!r}, {super().extra_repr()}"
