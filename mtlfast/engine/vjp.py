"""Per-task vector-Jacobian products of the shared parameters, streamed parameter by parameter.

One backward with ``autograd.grad(..., is_grads_batched=True)`` pushes all T cotangents at once
(a chunk of them with ``chunk_size``). A hook on every shared parameter receives that parameter's
``(T, *shape)`` per-task gradient the moment autograd produces it, hands it to a *sink* (copy into
the flat Jacobian, add to the Gram, ...) and returns a zero-strided zero, so autograd never holds
the per-task gradients itself. Where batching rules are missing (RNNs on some backends, compiled
graphs, custom Functions without vmap support) the same hooks run under a loop of ordinary
``autograd.grad`` calls, one task at a time, after ONE warning per engine.

Batched is not always faster. On a GPU it replaces T launch-bound passes with one, but on a CPU
both do the same arithmetic, and ops whose batching rule loops over T and stacks (max-pool and
convolution backward) or that allocate T-times larger buffers can make it slower than the loop
(the demo's conv trunk: 40 ms batched vs 27 ms looped per step). So the strategy ``"auto"``
times both on the first CPU steps (alternating, one warm-up and :data:`AUTO_TRIALS` timed calls
of each, real training steps, no extra work) and keeps the faster; the per-task gradients are
the same either way.
"""

from __future__ import annotations

import time
import typing
import warnings
from collections.abc import Callable, Sequence

import torch
from torch._C._functorch import is_legacy_batchedtensor

__all__ = ["AUTO_TRIALS", "Batching", "Sink", "Strategy", "per_task_grads", "per_task_vjp"]

#: How the T per-task backward passes run: one batched pass, a loop, or the faster of the two.
Strategy = typing.Literal["auto", "batched", "loop"]
#: Timed steps of each strategy before ``"auto"`` decides on a CPU.
AUTO_TRIALS = 3

#: ``sink(i, grads, tasks)``: parameter i's per-task gradients ``(len(tasks), *shape)``.
Sink = Callable[[int, torch.Tensor, slice], None]


class Batching:
    """Batched or looped per-task backward for one graph; the loop fallback warns once.

    ``strategy="auto"`` is batched on accelerators; on a CPU it alternates the two over the first
    ``2 * (AUTO_TRIALS + 1)`` calls, timing each, and then keeps the one with the lower best time
    (the first call of each not counted).
    Only a single process may time: ranks that time separately could pick different strategies
    and issue their gradient collectives in different orders, so distributed engines pass
    ``"batched"`` or ``"loop"``.
    """

    def __init__(self, what: str, strategy: Strategy = "batched") -> None:
        if strategy not in typing.get_args(Strategy):
            raise ValueError(
                f"strategy must be one of {typing.get_args(Strategy)}, got {strategy!r}")
        self.what = what
        self.strategy = strategy
        self.enabled = True
        self.verified = False  # a batched pass succeeded: no need to retain the graph for a retry
        self.times: dict[str, list[float]] = {"batched": [], "loop": []}
        self.choice: str | None = None if strategy == "auto" else strategy

    def snapshot(self) -> tuple:
        """The decision state, to restore after a call that failed."""
        return (self.enabled, self.verified, {k: list(v) for k, v in self.times.items()},
                self.choice)

    def restore(self, state: tuple) -> None:
        self.enabled, self.verified, self.times, self.choice = state

    def use_batched(self, device: torch.device) -> bool:
        """Whether the next per-task backward runs batched."""
        if not self.enabled:
            return False
        if self.choice is None and device.type != "cpu":
            self.choice = "batched"
        if self.choice is not None:
            return self.choice == "batched"
        return len(self.times["batched"]) <= len(self.times["loop"])  # batched first: verifies it

    def may_replay(self, device: torch.device) -> bool:
        """Whether the next per-task backward may fail part-way and be replayed by the loop (a
        batched attempt not yet known to work for this graph): its sink must not act early."""
        return not self.verified and self.use_batched(device)

    def record(self, batched: bool, seconds: float) -> None:
        """One timed call of ``"auto"`` on a CPU; decides once both have a warm-up + AUTO_TRIALS."""
        if self.choice is not None:
            return
        self.times["batched" if batched else "loop"].append(seconds)
        # The first call of each is a warm-up (allocations, first-touch page faults): not timed.
        if min(len(v) for v in self.times.values()) > AUTO_TRIALS:
            self.choice = min(self.times, key=lambda k: min(self.times[k][1:]))

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
    not part of the state autograd propagates) reads 0 there, and unbatching at that level
    would leave the gradient wrapped (a sink's ``copy_`` or a later read would then fail).
    """
    if is_legacy_batchedtensor(g):
        g = torch._remove_batch_dim(g, level, batch, 0)
        if is_legacy_batchedtensor(g):  # never hand a wrapped tensor to a sink
            raise RuntimeError("mtlfast: per-task gradient still batched after unwrapping")
        return g
    return g.unsqueeze(0).expand(batch, *g.shape)


def _run(
    outputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
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
            grad_outputs=list(grad_outputs),
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
    task_outputs: Sequence[torch.Tensor] | None = None,
) -> None:
    """Feed ``sink`` the per-task gradients of ``params`` for cotangents ``(T, *output.shape)``.

    Parameters no task reaches never reach the sink. ``on_restart`` is called before the loop
    fallback replays a failed batched attempt (the sink may have seen part of it).
    ``task_outputs``: T scalars with ``grad(task_outputs[t]) = grad(<cotangents[t], outputs>)``
    (the tasks' own losses when the cotangents are the identity on the stacked losses): the
    loop then back-propagates each from its own root, never through the other tasks' heads.
    """
    num_tasks = cotangents[0].shape[0]
    start = time.perf_counter()
    if batching.use_batched(cotangents[0].device):
        chunks = _chunks(num_tasks, chunk_size)
        try:
            for k, tasks in enumerate(chunks):
                last = k == len(chunks) - 1
                _run(outputs, [c[tasks] for c in cotangents], params, sink, tasks, batched=True,
                     retain_graph=retain_graph or not last or not batching.verified)
                batching.verified = True
            batching.record(True, time.perf_counter() - start)
            return
        except (RuntimeError, NotImplementedError) as exc:
            if batching.verified:
                raise  # batched passes worked for this graph before: a real error
            if on_restart is not None:
                on_restart()
            # The loop's error, if any, is the user's: batching stays as it was.
            _loop(outputs, cotangents, params, sink, retain_graph, task_outputs)
            batching.fall_back(exc)  # the loop works where batching did not: keep the loop
            return
    _loop(outputs, cotangents, params, sink, retain_graph, task_outputs)
    if batching.enabled:  # a fallback's time says nothing about the loop's speed
        batching.record(False, time.perf_counter() - start)


def _task_pass(outputs, cotangents, task_outputs, t: int):
    """(outputs, grad_outputs) of task t's ordinary backward pass."""
    if task_outputs is not None:
        return [task_outputs[t]], [torch.ones_like(task_outputs[t])]
    return outputs, [c[t] for c in cotangents]


def _loop(outputs, cotangents, params, sink, retain_graph: bool, task_outputs=None) -> None:
    num_tasks = cotangents[0].shape[0]
    for t in range(num_tasks):
        outs, grads = _task_pass(outputs, cotangents, task_outputs, t)
        _run(outs, grads, params, sink, slice(t, t + 1), batched=False,
             retain_graph=retain_graph or t < num_tasks - 1)


def per_task_grads(
    outputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    *,
    batching: Batching,
    task_outputs: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``(T, *input.shape)`` per-task gradients of non-leaf ``inputs`` (the features).

    Always retains the graph: the trunk pass that follows needs it. ``task_outputs``: as for
    :func:`per_task_vjp`.
    """
    start = time.perf_counter()
    if batching.use_batched(cotangents[0].device):
        try:
            grads = torch.autograd.grad(outputs, inputs, grad_outputs=list(cotangents),
                                        retain_graph=True, is_grads_batched=True)
            batching.verified = True
            batching.record(True, time.perf_counter() - start)
            return list(grads)
        except (RuntimeError, NotImplementedError) as exc:
            if batching.verified:
                raise
            grads = _grads_loop(outputs, cotangents, inputs, task_outputs)  # the user's error
            batching.fall_back(exc)
            return grads
    grads = _grads_loop(outputs, cotangents, inputs, task_outputs)
    if batching.enabled:
        batching.record(False, time.perf_counter() - start)
    return grads


def _grads_loop(outputs, cotangents, inputs, task_outputs=None) -> list[torch.Tensor]:
    rows = []
    for t in range(cotangents[0].shape[0]):
        outs, grads = _task_pass(outputs, cotangents, task_outputs, t)
        rows.append(torch.autograd.grad(outs, inputs, grad_outputs=grads, retain_graph=True,
                                        allow_unused=True))
    return [torch.stack([torch.zeros_like(x) if r[j] is None else r[j] for r in rows])
            for j, x in enumerate(inputs)]
