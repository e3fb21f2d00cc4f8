"""Gramian mode: the T x T Gram ``K = G G^T`` accumulated parameter by parameter, G never whole.

During the batched backward each shared parameter's ``(T, n)`` block adds its ``g g^T`` to K
(or, for layer-wise methods, becomes its own ``(T, T)`` Gram) and is dropped. The update is then
one ordinary backward of ``sum_t w_t L_t``, done by the pipeline (layer-wise: a second batched
backward in which each parameter's block is combined with its own weights). Peak memory: one
backward with T cotangents plus T x (largest parameter). Under the loop fallback (or with
``chunk_size``) blocks arrive a few tasks at a time, so they are kept per parameter until all T
are in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops
from .flat import SharedParams
from .vjp import Batching, per_task_vjp

__all__ = ["gramian", "layerwise_update"]


class _GramSink:
    def __init__(self, shared: SharedParams, num_tasks: int, layerwise: bool) -> None:
        self.shared, self.num_tasks, self.layerwise = shared, num_tasks, layerwise
        self.restart()

    def restart(self) -> None:
        L = len(self.shared.params)
        self.grams: list[torch.Tensor | None] = [None] * L
        self.partial: dict[int, tuple[torch.Tensor, int]] = {}

    def __call__(self, i: int, grads: torch.Tensor, tasks: slice) -> None:
        block = grads.reshape(grads.shape[0], -1)
        if block.shape[0] < self.num_tasks:  # a chunk: keep it until all tasks are in
            buf, seen = self.partial.get(i, (None, 0))
            if buf is None:
                dtype = torch.float64 if block.dtype == torch.float64 else torch.float32
                buf = torch.empty(self.num_tasks, block.shape[1], dtype=dtype,
                                  device=block.device)
            buf[tasks].copy_(block)
            seen += block.shape[0]
            if seen < self.num_tasks:
                self.partial[i] = (buf, seen)
                return
            self.partial.pop(i, None)
            block = buf
        self.grams[i] = ops.gram(block if block.dtype == torch.float64 else block.float())

    def result(self, device: torch.device) -> torch.Tensor:
        """float32, or float64 when the gradients were float64 (like ``ops.gram``)."""
        wide = any(k is not None and k.dtype == torch.float64 for k in self.grams)
        dtype = torch.float64 if wide else torch.float32
        zero = torch.zeros(self.num_tasks, self.num_tasks, dtype=dtype, device=device)
        grams = [zero if k is None else k.to(dtype) for k in self.grams]
        if self.layerwise:
            return torch.stack(grams)
        return torch.stack(grams).sum(0) if len(grams) > 1 else grams[0]


def gramian(
    shared: SharedParams,
    outputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    *,
    batching: Batching,
    chunk_size: int | None,
    layerwise: bool,
    task_outputs: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """K = G G^T ``(T, T)``, or per-parameter Grams ``(L, T, T)`` when ``layerwise``.

    The graph is retained: the update pass follows.
    """
    num_tasks = cotangents[0].shape[0]
    sink = _GramSink(shared, num_tasks, layerwise)
    per_task_vjp(outputs, cotangents, shared.params, sink, batching=batching,
                 chunk_size=chunk_size, retain_graph=True, on_restart=sink.restart,
                 task_outputs=task_outputs)
    return sink.result(cotangents[0].device)


class _CombineSink:
    def __init__(self, shared: SharedParams, weights: torch.Tensor) -> None:
        self.shared, self.weights = shared, weights
        self.restart()

    def restart(self) -> None:
        self.out: list[torch.Tensor | None] = [None] * len(self.shared.params)

    def __call__(self, i: int, grads: torch.Tensor, tasks: slice) -> None:
        block = grads.reshape(grads.shape[0], -1)
        w = self.weights[i, tasks].to(block.dtype if block.dtype == torch.float64
                                      else torch.float32)
        part = ops.combine(w, block if block.dtype in (torch.float32, torch.float64)
                           else block.float())
        self.out[i] = part if self.out[i] is None else self.out[i] + part


def layerwise_update(
    shared: SharedParams,
    outputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    weights: torch.Tensor,
    *,
    batching: Batching,
    chunk_size: int | None,
    retain_graph: bool,
    task_outputs: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor | None]:
    """Per parameter l: ``weights[l] @ G_l`` from a second batched backward."""
    sink = _CombineSink(shared, weights)
    per_task_vjp(outputs, cotangents, shared.params, sink, batching=batching,
                 chunk_size=chunk_size, retain_graph=retain_graph, on_restart=sink.restart,
                 task_outputs=task_outputs)
    return [None if o is None else o.view(p.shape) for o, p in zip(sink.out, shared.params,
                                                                   strict=True)]
