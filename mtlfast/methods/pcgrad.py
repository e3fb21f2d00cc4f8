"""PCGrad: Gradient Surgery for Multi-Task Learning (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import Any, Literal

import torch

from ..ops import solvers
from ._common import host_to_device
from .base import GramMethod, NonFinitePolicy

__all__ = ["PCGrad"]


class PCGrad(GramMethod):
    """``g_i^PC = g_i - sum_j [g_i^PC . g_j < 0] (g_i^PC . g_j / |g_j|^2) g_j`` over a random
    order of the other tasks, ``d = sum_i g_i^PC`` (``reduction="sum"``, the paper) or the mean.

    Solved on the Gram (``ops.solvers.pcgrad_weights``). Each task gets its own random order
    per call, drawn from the method's ``torch.Generator`` (seeded by ``seed``, or from torch's
    global RNG when ``seed`` is None; saved in ``state_dict()``). The orders of the last call
    are kept in ``last_orders`` (``(..., T, T)``, row i the order for task i).
    """

    deterministic = False

    def __init__(
        self,
        reduction: Literal["sum", "mean"] = "sum",
        *,
        seed: int | None = None,
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__(on_nonfinite=on_nonfinite)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator().manual_seed(seed)
        self.last_orders: torch.Tensor | None = None

    def get_extra_state(self) -> Any:
        return {**super().get_extra_state(), "generator": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.generator.set_state(state["generator"])

    def draw_orders(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Random task orders ``(*shape, T)`` (T = shape[-1]): one permutation per row, drawn on
        the host and copied without a host sync (a CUDA graph replays the captured orders)."""
        keys = torch.rand(tuple(shape) + (shape[-1],), generator=self.generator)
        return host_to_device(keys.argsort(-1), device)

    def _weights(self, gram: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        K, _ = solvers.normalize_gram(gram)
        orders = self.draw_orders(gram.shape[:-1], gram.device)
        self.last_orders = orders
        w = solvers.pcgrad_weights(K, orders).sum(-2)
        if self.reduction == "mean":
            w = w / gram.shape[-1]
        return w.to(gram.dtype)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, {super().extra_repr()}"
