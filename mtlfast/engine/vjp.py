"""Per-task vector-Jacobian products of the shared parameters, streamed parameter by parameter.

One backward with ``autograd.grad(..., is_grads_batched=True)`` pushes all T cotangents at once
(a chunk of them with ``chunk_size``). A hook on every shared parameter receives that parameter's
``(T, *shape)`` per-task gradient the moment autograd produces it, hands it to a *sink* (copy into
the flat Jacobian, add to the Gram, ...) and returns a zero-strided zero, so autograd never holds
the per-task gradients itself. Where batching rules are missing (RNNs on some backends, compiled
graphs, custom Functions without vmap support) the same hooks run under a loop of ordinary
``autograd.grad`` calls, one task at a time, after ONE warning per engine.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch._C._functorch import is_legacy_batchedtensor

__all__ = ["Batching", "Sink", "per_task_grads", "per_task_vjp"]

#: ``sink(i, grads, tasks)``: parameter i's per-task gradients ``(len(tasks), *shape)``.
Sink = Callable[[int, torch.Tensor, slice], None]


class Batching:
    """Whether batched backward works for a given graph shape; the loop fallback warns once."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.enabled = True
        self.verified = False  # a batched pass succeeded: no need to retain the graph for a retry

    def fall_back(self, exc: BaseException) -> None:
        self.enabled = False
        warnings.warn(
            f"mtlfast: batched backward through the {self.what} failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); computing the per-task "
            "gradients with a loop of backward passes instead (same result, slower). This "
            "warning is shown once per engine.",
            RuntimeWarning,
            stacklevel=4,
        )


def _current_vmap_level() -> int:
    # autograd.grad(is_grads_batched=True) runs under torch's legacy vmap; its level is the
    # current nesting depth, which torch only exposes through increment/decrement.
    level = torch._C._vmapmode_increment_nesting()
    torch._C._vmapmode_decrement_nesting()
    return level - 1


def _unbatch(g: torch.Tensor, batch: int, level: int) -> torch.Tensor:
    """``(batch, *shape)`` from a gradient of the batched backward at vmap ``level``.

    ``level`` is computed on the calling thread before the backward starts: the hooks of CUDA
    tensors run on autograd's device thread, whose vmap nesting counter (a plain thread-local,
    not part of the state autograd propagates) reads 0 there. Unbatching at that wrong level
    returned the gradient still wrapped, and the sink's ``copy_`` into the flat buffer failed
    with "vmap: aten::copy_ ... other being vmapped over but self wasn't" (jacobian mode) or a
    wrapped Gram escaped the backward (gramian mode), failing later in ``bool(ok)`` with
    "Batching rule not implemented for aten::is_nonzero" (H200, 2026-11-26).
    """
    if is_legacy_batchedtensor(g):
        g = torch._remove_batch_dim(g, level, batch, 0)
        if is_legacy_batchedtensor(g):  # never hand a wrapped tensor to a sink
            raise RuntimeError("mtlfast: per-task gradient still batched after unwrapping")
        return g
    return g.unsqueeze(0).expand(batch, *g.shape)


def _run(
    outputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    sink: Sink,
    tasks: slice,
    *,
    batched: bool,
    retain_graph: bool,
) -> None:
    batch = tasks.stop - tasks.start
    level = _current_vmap_level() + 1  # the level autograd.grad's vmap is about to open

    def hook_for(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(g: torch.Tensor) -> torch.Tensor:
            sink(i, _unbatch(g, batch, level) if batched else g.unsqueeze(0), tasks)
            return torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape)

        return hook

    handles = [p.register_hook(hook_for(i)) for i, p in enumerate(params)]
    try:
        torch.autograd.grad(
            outputs,
            params,
            grad_outputs=[c[tasks] if batched else c[tasks.start] for c in cotangents],
            retain_graph=retain_graph,
            allow_unused=True,
            is_grads_batched=batched,
        )
    finally:
        for h in handles:
            h.remove()


def _chunks(num_tasks: int, chunk_size: int | None) -> list[slice]:
    step = num_tasks if chunk_size is None else max(1, min(chunk_size, num_tasks))
    return [slice(s, min(s + step, num_tasks)) for s in range(0, num_tasks, step)]


def per_task_vjp(
    outputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    sink: Sink,
    *,
    batching: Batching,
    chunk_size: int | None = None,
    retain_graph: bool = False,
    on_restart: Callable[[], None] | None = None,
) -> None:
    """Feed ``sink`` the per-task gradients of ``params`` for cotangents ``(T, *output.shape)``.

    Parameters no task reaches never reach the sink. ``on_restart`` is called before the loop
    fallback replays a failed batched attempt (the sink may have seen part of it).
    """
    num_tasks = cotangents[0].shape[0]
    if batching.enabled:
        chunks = _chunks(num_tasks, chunk_size)
        try:
            for k, tasks in enumerate(chunks):
                last = k == len(chunks) - 1
                _run(outputs, cotangents, params, sink, tasks, batched=True,
                     retain_graph=retain_graph or not last or not batching.verified)
                batching.verified = True
            return
        except (RuntimeError, NotImplementedError) as exc:
            if batching.verified:
                raise  # batched passes worked for this graph before: a real error
            batching.fall_back(exc)
            if on_restart is not None:
                on_restart()
    for t in range(num_tasks):
        _run(outputs, cotangents, params, sink, slice(t, t + 1), batched=False,
             retain_graph=retain_graph or t < num_tasks - 1)


def per_task_grads(
    outputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    *,
    batching: Batching,
) -> list[torch.Tensor]:
    """``(T, *input.shape)`` per-task gradients of non-leaf ``inputs`` (the features).

    Always retains the graph: the trunk pass that follows needs it.
    """
    num_tasks = cotangents[0].shape[0]
    if batching.enabled:
        try:
            grads = torch.autograd.grad(outputs, inputs, grad_outputs=list(cotangents),
                                        retain_graph=True, is_grads_batched=True)
            batching.verified = True
            return list(grads)
        except (RuntimeError, NotImplementedError) as exc:
            if batching.verified:
                raise
            batching.fall_back(exc)
    rows = [
        torch.autograd.grad(outputs, inputs, grad_outputs=[c[t] for c in cotangents],
                            retain_graph=True)
        for t in range(num_tasks)
    ]
    return [torch.stack([r[j] for r in rows]) for j in range(len(inputs))]
