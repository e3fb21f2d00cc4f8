"""PCGrad: Gradient Surgery for Multi-Task Learning (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import Literal

import torch

from ..ops import solvers
from ._state import RandomStream, host_to_device
from .base import GramMethod, NonFinitePolicy

__all__ = ["PCGrad"]


class PCGrad(GramMethod):
    """``g_i^PC = g_i - sum_j [g_i^PC . g_j < 0] (g_i^PC . g_j / |g_j|^2) g_j`` over a random
    order of the other tasks, ``d = sum_i g_i^PC`` (``reduction="sum"``, the paper) or the mean.

    Solved on the Gram (``ops.solvers.pcgrad_weights``). Each task gets its own random order
    per call from the counter-based state ``rng_state = [seed, step]`` (a buffer, in
    ``state_dict()``; ``seed`` None draws one from torch's global RNG), on the Gram's device:
    the same orders on CPU and CUDA for the same seed and step, no host sync, and a replayed
    CUDA graph draws new orders. The orders of the last step are kept in ``last_orders``
    (``(..., T, T)``, row i the order for task i).
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
        self.rng = RandomStream(seed)
        self.rng.register(self)
        self.last_orders: torch.Tensor | None = None

    def stateful(self) -> bool:
        return False  # the counter does not depend on T

    def _current_state(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"rng_state": host_to_device(self.rng_state, like.device)}

    def draw_orders(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Random task orders ``(*shape, T)`` (T = shape[-1]), advancing the counter."""
        orders, self.rng_state = RandomStream.orders(self.rng_state, shape, device)
        return orders

    def _step(self, gram, losses, state):
        K, _ = solvers.normalize_gram(gram)
        orders, counter = RandomStream.orders(state["rng_state"], gram.shape[:-1], gram.device)
        w = solvers.pcgrad_weights(K, orders).sum(-2)
        if self.reduction == "mean":
            w = w / gram.shape[-1]
        return w.to(gram.dtype), {"rng_state": counter, "last_orders": orders}

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, {super().extra_repr()}"
