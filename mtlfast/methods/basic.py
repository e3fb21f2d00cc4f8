"""Linear scalarizations expressed as Gram methods (the baselines every method is compared to)."""

from __future__ import annotations

import torch

from .base import GramMethod

__all__ = ["Mean", "Sum"]


class Mean(GramMethod):
    """Equal weights: ``d = (1/T) sum_t g_t`` (the gradient of the mean loss)."""

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        T = gram.shape[-1]
        return torch.full(gram.shape[:-1], 1.0 / T, dtype=gram.dtype, device=gram.device)


class Sum(GramMethod):
    """Unit weights: ``d = sum_t g_t`` (the gradient of the summed loss)."""

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        return torch.ones(gram.shape[:-1], dtype=gram.dtype, device=gram.device)
