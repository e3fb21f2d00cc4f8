"""Jacobian mode: the per-task gradients of the shared parameters in ONE flat (T, P) buffer.

Each parameter's ``(T, *shape)`` block is copied into its columns of the buffer by the hook that
receives it (see vjp.py), so the buffer is written once per step and never concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .flat import SharedParams
from .vjp import Batching, per_task_vjp

__all__ = ["jacobian"]


class _JacobianSink:
    def __init__(self, shared: SharedParams, J: torch.Tensor) -> None:
        self.shared, self.J = shared, J
        self.written = [False] * len(shared.params)

    def __call__(self, i: int, grads: torch.Tensor, tasks: slice) -> None:
        self.J[tasks, self.shared.slice(i)].copy_(grads.reshape(grads.shape[0], -1))
        self.written[i] = True

    def restart(self) -> None:
        self.written = [False] * len(self.written)

    def finish(self) -> None:
        # Parameters that no task reaches have zero per-task gradients.
        for i, done in enumerate(self.written):
            if not done:
                self.J[:, self.shared.slice(i)].zero_()


def jacobian(
    shared: SharedParams,
    outputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    *,
    batching: Batching,
    dtype: torch.dtype,
    chunk_size: int | None,
    retain_graph: bool,
) -> torch.Tensor:
    """The (T, P) matrix of per-task gradients, ``G[t] = d<cotangent_t, outputs>/d shared``."""
    J = shared.jacobian(cotangents[0].shape[0], dtype)
    sink = _JacobianSink(shared, J)
    per_task_vjp(outputs, cotangents, shared.params, sink, batching=batching,
                 chunk_size=chunk_size, retain_graph=retain_graph, on_restart=sink.restart)
    sink.finish()
    return J
