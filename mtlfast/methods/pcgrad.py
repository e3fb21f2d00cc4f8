"""PCGrad: Gradient Surgery for Multi-Task Learning (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..ops import solvers
from ._common import host_to_device
from .base import GramMethod, NonFinitePolicy

__all__ = ["PCGrad"]


class PCGrad(GramMethod):
    """``g_i^PC = g_i - sum_j [g_i^PC . g_j < 0] (g_i^PC . g_j / |g_j|^2) g_j`` over a random
    order of the other tasks, ``d = sum_i g_i^PC`` (``reduction="sum"``, the paper) or the mean.

    Solved on the Gram (``ops.solvers.pcgrad_weights``). Each task gets its own random order
    per call, drawn by ``ops.solvers.pcgrad_orders`` from the counter-based state
    ``rng_state = [seed, step]`` (a buffer, in ``state_dict()``; ``seed`` None draws one from
    torch's global RNG). The state moves to the Gram's device on first use and advances there:
    the same orders on CPU and CUDA for the same seed and step, no host sync, and a replayed
    CUDA graph draws new orders. The orders of the last call are kept in ``last_orders``
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
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
        self.register_buffer("rng_state", torch.tensor([seed, 0], dtype=torch.int64))
        self.last_orders: torch.Tensor | None = None

    def _state_on(self, device: torch.device) -> torch.Tensor:
        if self.rng_state.device != device:
            self.rng_state = host_to_device(self.rng_state, device).contiguous()
        return self.rng_state

    def draw_orders(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Random task orders ``(*shape, T)`` (T = shape[-1]): one permutation per row."""
        T = shape[-1]
        device = torch.device(device)
        if device.type == "meta":  # shapes only; the state stays where it is
            return torch.empty((*shape, T), dtype=torch.int64, device=device)
        state = self._state_on(device)
        before = None if self._step_ok is None else state.clone()
        orders = solvers.pcgrad_orders(state, math.prod(shape[:-1]), T).reshape(*shape, T)
        if before is not None:  # a skipped step leaves the counter as it was (on the device)
            state.copy_(self._keep_if_skipped(state, before))
        return orders

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
