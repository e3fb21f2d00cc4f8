"""Jacobian mode: the per-task gradients of the shared parameters in ONE flat (T, P) buffer.

Each parameter's ``(T, *shape)`` block is copied into its columns of the buffer by the hook that
receives it (see vjp.py), so the buffer is written once per step and never concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .flat import SharedParams
from .vjp import Batching, per_task_vjp

__all__ = ["JacobianSink", "jacobian"]


class JacobianSink:
    """Writes parameter i's per-task block into its columns of ``J``; zeros for the rest.

    Subclasses (the bucketed all-reduce of ``mtlfast.distributed``) redirect the write with
    :meth:`columns` and act on :meth:`restart` / :meth:`finish`.
    """

    def __init__(self, shared: SharedParams, J: torch.Tensor) -> None:
        self.shared, self.J = shared, J
        self.written = [False] * len(shared.params)

    def columns(self, i: int) -> torch.Tensor:
        """The ``(T, numel_i)`` view parameter i's per-task gradients are written to."""
        return self.J[:, self.shared.slice(i)]

    def __call__(self, i: int, grads: torch.Tensor, tasks: slice) -> None:
        self.columns(i)[tasks].copy_(grads.reshape(grads.shape[0], -1))
        self.written[i] = True

    def restart(self) -> None:
        self.written = [False] * len(self.written)

    def finish(self) -> None:
        # Parameters that no task reaches have zero per-task gradients.
        for i, done in enumerate(self.written):
            if not done:
                self.columns(i).zero_()


def jacobian(
    shared: SharedParams,
    outputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    *,
    batching: Batching,
    dtype: torch.dtype,
    chunk_size: int | None,
    retain_graph: bool,
    sink: JacobianSink | None = None,
    task_outputs: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The (T, P) matrix of per-task gradients, ``G[t] = d<cotangent_t, outputs>/d shared``.

    ``sink`` (default: a plain :class:`JacobianSink` on the shared buffer) receives the blocks;
    ``task_outputs``: see :func:`~mtlfast.engine.vjp.per_task_vjp`.
    """
    if sink is None:
        sink = JacobianSink(shared, shared.jacobian(cotangents[0].shape[0], dtype))
    per_task_vjp(outputs, cotangents, shared.params, sink, batching=batching,
                 chunk_size=chunk_size, retain_graph=retain_graph, on_restart=sink.restart,
                 task_outputs=task_outputs)
    sink.finish()
    return sink.J
