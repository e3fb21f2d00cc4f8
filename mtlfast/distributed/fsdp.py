"""FSDP2 (``torch.distributed.fsdp.fully_shard``): exact per-task gradient methods, sharded.

The same pipeline as every other step (``mtlfast.engine``) with an FSDP2 reducer: each rank
computes its per-task gradients w.r.t. the all-gathered (unsharded) parameters; the moment a
parameter's ``(T, *shape)`` block comes out of the batched backward it is reduce-scattered
(asynchronously, overlapping the rest of the backward) along FSDP2's dim-0 shards, so rank r
only ever keeps ``G[:, shard_r]`` of the global ``G = (1/W) sum_s G_s`` in a ``(T, P / W)``
buffer. The Gram is exact from the all-reduce of the shards' partial Grams:
``K = sum_r G[:, shard_r] G[:, shard_r]^T`` (T x T floats; layer-wise methods: one per
parameter), the method runs on K identically on every rank, and each rank writes
``w @ G[:, shard_r]`` into its sharded ``.grad``. No full gradient is ever gathered. Head
parameters get the mean of their ordinary gradients. Loss-based methods run the losses path
with the single cotangent ``w``. The non-finite policy is the engine's (raise, skip, GradScaler)
and ``StepInfo`` is the same. Whole-Jacobian methods need every column at once: they raise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from .. import methods as _methods
from ..engine import (
    Engine,
    EngineConfig,
    JacobianSink,
    Reducer,
    SharedParams,
    StepInfo,
    per_task_vjp,
)
from .data_parallel import Collectives

__all__ = ["FSDPBackward"]


def _fsdp_params(model: nn.Module) -> list:
    found = []
    for m in model.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        group = get_state()._fsdp_param_group if get_state is not None else None
        if group is not None:
            found.extend(group.fsdp_params)
    return found


class _Shards:
    """Where each sharded parameter's local rows sit in this rank's flat ``(T, P_local)``."""

    def __init__(self, fsdp_params: list, dp: Collectives) -> None:
        self.fsdp_params, self.group, self.world = fsdp_params, dp.group, dp.world
        rank = dp.rank
        self.offsets, self.rows = [0], []
        for fp in fsdp_params:
            p = fp.sharded_param
            if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),):
                raise ValueError("FSDPBackward supports fully_shard's default Shard(0) "
                                 f"placement only, got {getattr(p, 'placements', None)}")
            n = fp._unsharded_param.shape[0] if fp._unsharded_param.dim() else 1
            per = -(-n // self.world)
            lo, hi = min(rank * per, n), min((rank + 1) * per, n)
            self.rows.append((per, lo, hi))
            self.offsets.append(self.offsets[-1] + p.to_local().numel())
        self.size = self.offsets[-1]

    def reduce_scatter(self, i: int, block: torch.Tensor) -> tuple[dist.Work, torch.Tensor]:
        """Start the sum over ranks of ``block (k, *shape)``, scattered to (k, local numel)."""
        per, lo, hi = self.rows[i]
        k = block.shape[0]
        rows = block.reshape(k, block.shape[1] if block.dim() > 1 else 1, -1)
        pad = per * self.world - rows.shape[1]
        if pad:
            rows = torch.cat([rows, rows.new_zeros(k, pad, rows.shape[2])], 1)
        chunks = rows.reshape(k, self.world, -1).transpose(0, 1).contiguous()  # (W, k, m)
        out = chunks.new_empty(chunks.shape[1:])
        work = dist.reduce_scatter_tensor(out.view(-1), chunks.view(-1), group=self.group,
                                          async_op=True)
        return work, out[:, :(hi - lo) * rows.shape[2]]


class _ShardedLayout(SharedParams):
    """The shared parameters of one FSDP2 step: hooks on the unsharded parameters, this rank's
    shards as the flat index space, updates written into the sharded ``.grad``."""

    def __init__(self, fsdp_params: list, comm: Collectives) -> None:
        super().__init__([fp._unsharded_param for fp in fsdp_params])
        self.fsdp_params = fsdp_params
        self.shards = _Shards(fsdp_params, comm)
        self.offsets = self.shards.offsets
        self.numels = [b - a for a, b in zip(self.offsets, self.offsets[1:], strict=False)]
        self.size = self.offsets[-1]

    def add_flat(self, write) -> None:
        tmp = torch.empty(self.size, dtype=self.work_dtype, device=self.device)
        write(tmp, False)
        self.add_list([tmp[self.slice(i)] for i in range(len(self.params))])

    def add_list(self, grads: Sequence[torch.Tensor | None]) -> None:
        for fp, g in zip(self.fsdp_params, grads, strict=True):
            if g is not None:
                _add_sharded(fp.sharded_param, g.reshape(-1))

    def local_rows(self, i: int, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of parameter i's full-size tensor, flat."""
        per, lo, hi = self.shards.rows[i]
        rows = full.reshape(full.shape[0] if full.dim() else 1, -1)
        return rows[lo:hi].reshape(-1)


class _ReduceScatterSink(JacobianSink):
    """Each parameter's per-task block reduce-scattered into this rank's columns of J."""

    def __init__(self, layout: _ShardedLayout, J: torch.Tensor, comm: Collectives, *,
                 overlap: bool) -> None:
        super().__init__(layout, J)
        self.comm, self.overlap = comm, overlap
        self.pending: list = []
        self.held: list = []  # blocks kept until finish() while a replay is possible

    def __call__(self, i: int, grads: torch.Tensor, tasks: slice) -> None:
        block = grads.to(self.J.dtype)
        self.written[i] = True
        if self.overlap:
            self._start(i, block, tasks)
        else:
            self.held.append((i, block.clone(), tasks))

    def _start(self, i: int, block: torch.Tensor, tasks: slice) -> None:
        work, out = self.shared.shards.reduce_scatter(i, block)
        self.comm.bytes_reduced += block.numel() * block.element_size()
        self.pending.append((work, out, i, tasks))

    def restart(self) -> None:
        super().restart()
        self.held.clear()

    def finish(self) -> None:
        for i, block, tasks in self.held:
            self._start(i, block, tasks)
        self.held.clear()
        for work, out, i, tasks in self.pending:
            work.wait()
            self.columns(i)[tasks] = out
        self.pending.clear()
        super().finish()  # zeros for parameters no task reached
        self.J.div_(self.comm.world)


class FSDP2(Reducer):
    """The FSDP2 reducer: sharded layout per step, reduce-scattered Jacobian, all-reduced Gram."""

    needs_jacobian = True
    vjp_auto = False

    def __init__(self, model: nn.Module, shared_ids: set[int], group: dist.ProcessGroup) -> None:
        self.model, self.shared_ids = model, shared_ids
        self.comm = Collectives(group)
        self._layout_cache: tuple[tuple[int, ...], _ShardedLayout] | None = None
        self._heads: dict[int, _ShardedLayout] = {}  # sharded heads, by unsharded parameter

    def layout(self) -> _ShardedLayout:
        every = _fsdp_params(self.model)
        shared = [fp for fp in every if id(fp.sharded_param) in self.shared_ids]
        if len(shared) != len(self.shared_ids):
            raise ValueError("shared: every shared parameter must be a fully_shard-ed parameter "
                             "of model")
        key = tuple(id(fp._unsharded_param) for fp in every)
        if self._layout_cache is None or self._layout_cache[0] != key:
            layout = _ShardedLayout(shared, self.comm)
            heads = [fp for fp in every if id(fp.sharded_param) not in self.shared_ids]
            self._heads = {id(fp._unsharded_param): _ShardedLayout([fp], self.comm)
                           for fp in heads}
            self._layout_cache = (key, layout)
        return self._layout_cache[1]

    def check_mode(self, mode: str, method: object) -> None:
        if mode not in ("jacobian", "losses"):
            raise ValueError(f"FSDPBackward runs Gram methods in mode 'jacobian' (the per-task "
                             f"gradients are sharded already), got mode {mode!r}")
        if getattr(method, "needs", None) == "jacobian":
            raise ValueError(f"FSDPBackward runs Gram methods and loss-based methods; "
                             f"{type(method).__name__} needs the whole (T, P) Jacobian at once, "
                             "which no rank holds")

    def begin(self, *, num_tasks, layout, heads, method, mode) -> None:
        self.comm.check_config({"T (tasks)": num_tasks,
                                "P (shared parameters)": sum(p.numel() for p in layout.params),
                                "head parameters": heads, "method": type(method).__name__,
                                "mode": f"{mode}/fsdp2"}, layout.device)
        self.comm.sync_method(method)

    def mean_losses(self, losses: torch.Tensor) -> torch.Tensor:
        return self.comm.start_mean(losses, [], [])()[0]

    def start_inputs(self, losses, others, head_grads):
        return self.comm.start_mean(losses, others, head_grads)

    def sink(self, layout, J, *, overlap):
        return _ReduceScatterSink(layout, J, self.comm, overlap=overlap)

    def finish_jacobian(self, sink):
        return sink.J

    def gram(self, K: torch.Tensor) -> torch.Tensor:
        self.comm.start(K).wait()
        return K

    def shared_grads(self, layout, outputs, cotangents, others, *, retain_graph):
        """The weighted backward: the shared part reduce-scattered through the sink."""
        J = torch.zeros(1, layout.size, dtype=layout.work_dtype, device=layout.device)
        sink = _ReduceScatterSink(layout, J, self.comm, overlap=True)
        heads = list(torch.autograd.grad(outputs, others, grad_outputs=list(cotangents),
                                         retain_graph=True, allow_unused=True)) if others else []
        per_task_vjp(outputs, [c[None] for c in cotangents], layout.params, sink,
                     batching=_ONE_PASS, retain_graph=retain_graph, on_restart=sink.restart)
        sink.finish()
        return [J[0, layout.slice(i)] for i in range(len(layout.params))], heads

    def average(self, layout, grads, others, head_grads):
        return grads, (self.comm.mean(others, head_grads) if others else [])

    def write_heads(self, others, grads) -> None:
        for p, g in zip(others, grads, strict=True):
            if g is None:
                continue
            sharded = self._heads.get(id(p))
            if sharded is None:
                p.grad = g if p.grad is None else p.grad.add_(g)
            else:
                _add_sharded(sharded.fsdp_params[0].sharded_param, sharded.local_rows(0, g))


class _OnePass:
    """A single cotangent needs no batching: the plain backward, never timed."""

    def use_batched(self, device: torch.device) -> bool:
        return False

    def record(self, batched: bool, seconds: float) -> None:
        pass

    enabled = False


_ONE_PASS = _OnePass()


class FSDPBackward:
    """``mtlfast.backward`` for a ``fully_shard``-ed model (FSDP2), exact on the global batch.

    Args:
        model: the ``fully_shard``-ed root module (its forward runs under
            ``mtlfast.distributed.no_sync(model)``).
        shared: the shared (trunk) parameters, sharded DTensors of ``model``.
        method: a Gram method (whole-matrix or layer-wise) or a loss-based one.
        process_group: the group FSDP shards over (default: the world).
        on_nonfinite: ``"raise"`` or ``"skip"``, as for ``MTLBackward``.
    """

    def __init__(self, model: nn.Module, shared: Iterable[torch.Tensor] | nn.Module,
                 method: _methods.Method, *, process_group: object = None,
                 on_nonfinite: str = "raise") -> None:
        if not isinstance(method, _methods.Method):
            raise TypeError(f"method must be a mtlfast.methods.Method, got {type(method)}")
        if method.needs == "jacobian":
            raise ValueError(f"FSDPBackward runs Gram methods and loss-based methods; "
                             f"{type(method).__name__} needs the whole (T, P) Jacobian at once, "
                             "which no rank holds")
        params = shared.parameters() if isinstance(shared, nn.Module) else shared
        shared_ids = {id(p) for p in params}
        if not shared_ids:
            raise ValueError("shared: got no parameters")
        group = dist.group.WORLD if process_group is None else process_group
        self.reducer = FSDP2(model, shared_ids, group)
        self.dp = self.reducer.comm
        config = EngineConfig(mode="jacobian" if method.needs == "gram" else "auto",
                              on_nonfinite=on_nonfinite, vjp="batched")
        self._engine = Engine(method, config, self.reducer)

    @property
    def method(self) -> _methods.Method:
        return self._engine.method

    def backward(self, losses: object, *, grad_scaler: torch.amp.GradScaler | None = None
                 ) -> StepInfo:
        """Write the step's sharded gradients into ``.grad`` (accumulating); a StepInfo."""
        return self._engine.backward(losses, grad_scaler=grad_scaler)


def _add_sharded(param: DTensor, local_flat: torch.Tensor) -> None:
    local = local_flat.reshape(param.to_local().shape).to(param.dtype)
    if param.grad is None:
        param.grad = DTensor.from_local(local.clone(), param.device_mesh, param.placements,
                                        shape=param.shape, stride=param.stride())
    else:
        param.grad.to_local().add_(local)
