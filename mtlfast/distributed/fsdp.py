"""FSDP2 (``torch.distributed.fsdp.fully_shard``): exact per-task gradient methods, sharded.

Each rank computes its per-task gradients w.r.t. the all-gathered (unsharded) parameters; the
moment a parameter's ``(T, *shape)`` block comes out of the batched backward it is
reduce-scattered (asynchronously, overlapping the rest of the backward) along FSDP2's dim-0
shards, so rank r only ever keeps ``G[:, shard_r]`` of the global ``G = (1/W) sum_s G_s`` in a
``(T, P / W)`` buffer. The Gram is exact from the all-reduce of the shards' partial Grams:
``K = sum_r G[:, shard_r] G[:, shard_r]^T`` (T x T floats), the method runs on K identically on
every rank, and each rank writes ``w @ G[:, shard_r]`` into its sharded ``.grad``. No full
gradient is ever gathered. Head parameters get the mean of their ordinary gradients
(reduce-scattered when they are ``fully_shard``-ed too, all-reduced when replicated).
Loss-based methods run the same path with the single cotangent ``w`` (one backward).

Non-finite policy: ``ValueError`` on every rank (the check reads the all-reduced Gram and
losses, identical everywhere) before anything is written; there is no ``"skip"`` mode here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from .. import methods as _methods
from .. import ops
from ..engine import Batching, as_losses, per_task_vjp, scan_graph
from .data_parallel import DataParallel

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

    def __init__(self, fsdp_params: list, dp: DataParallel) -> None:
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


class FSDPBackward:
    """``mtlfast.backward`` for a ``fully_shard``-ed model (FSDP2), exact on the global batch.

    Args:
        model: the ``fully_shard``-ed root module (its forward runs under
            ``mtlfast.distributed.no_sync(model)``).
        shared: the shared (trunk) parameters, sharded DTensors of ``model``.
        method: a Gram method (``needs="gram"``, whole-matrix granularity) or a loss-based one.
        process_group: the group FSDP shards over (default: the world).
    """

    def __init__(self, model: nn.Module, shared: Iterable[torch.Tensor] | nn.Module,
                 method: _methods.Method, *, process_group: object = None) -> None:
        if not isinstance(method, _methods.Method):
            raise TypeError(f"method must be a mtlfast.methods.Method, got {type(method)}")
        layerwise = getattr(method, "granularity", "matrix") == "parameter"
        if method.needs not in ("gram", "losses") or layerwise:
            raise ValueError(f"FSDPBackward runs Gram methods and loss-based methods; "
                             f"{type(method).__name__} needs the whole Jacobian or per-layer "
                             "Grams")
        self.model, self.method = model, method
        params = shared.parameters() if isinstance(shared, nn.Module) else shared
        self._shared_ids = {id(p) for p in params}
        if not self._shared_ids:
            raise ValueError("shared: got no parameters")
        group = dist.group.WORLD if process_group is None else process_group
        self.dp = DataParallel(group, "exact")
        self._batching = Batching("shared parameters (FSDP2)")

    def _layout(self) -> tuple[_Shards, list, dict[int, object]]:
        every = _fsdp_params(self.model)
        shared = [fp for fp in every if id(fp.sharded_param) in self._shared_ids]
        if len(shared) != len(self._shared_ids):
            raise ValueError("shared: every shared parameter must be a fully_shard-ed parameter "
                             "of model")
        shards = _Shards(shared, self.dp)
        head_by_id = {id(fp._unsharded_param): fp for fp in every
                      if id(fp.sharded_param) not in self._shared_ids}
        return shards, shared, head_by_id

    def backward(self, losses: object):
        """Write the step's sharded gradients into ``.grad`` (accumulating); a StepInfo."""
        from ..api import StepInfo  # api imports this package: import at call time

        lv = as_losses(losses)
        T = len(lv.names)
        shards, shared, head_by_id = self._layout()
        unsharded = [fp._unsharded_param for fp in shared]
        others = scan_graph(lv, unsharded, None).others
        self.dp.check_config(num_tasks=T, size=sum(p.numel() for p in unsharded),
                             heads=len(others),
                             method=self.method, mode="fsdp2", device=lv.values.device)
        self.dp.sync_method(self.method)
        self.method.bind_tasks(T)
        L = lv.values
        global_losses = self.dp.average_with_losses(L.detach(), [], [])[0]
        if self.method.needs == "losses":  # one backward of sum_t w_t L_t, heads included
            leaf = global_losses.clone().requires_grad_(True)
            w = torch.autograd.grad(self.method(leaf), leaf)[0].to(L.dtype)
            cot, K, head_cot = w[None], None, w
        else:
            cot, head_cot = torch.eye(T, dtype=L.dtype, device=L.device), torch.ones_like(L)
        head_grads = torch.autograd.grad(L, others, head_cot, retain_graph=True,
                                         allow_unused=True) if others else ()
        plain = [(p, g) for p, g in zip(others, head_grads, strict=True) if id(p) not in head_by_id]
        plain_grads = self.dp.average(*zip(*plain, strict=True)) if plain else []
        J = self._sharded_jacobian(shards, L, cot)
        if self.method.needs != "losses":
            K = ops.gram(J)
            self.dp.bytes_reduced += K.numel() * K.element_size()
            dist.all_reduce(K, group=self.dp.group)
            if not bool(torch.isfinite(K).all() & torch.isfinite(global_losses).all()):
                raise ValueError("mtlfast FSDPBackward: the losses or per-task gradients contain "
                                 "NaN or Inf; nothing was written to .grad")
            w = self.method.weights(K, global_losses)
            update = ops.combine(w.to(J.dtype), J)
        else:
            update = J[0]
        for i, fp in enumerate(shared):
            _add_sharded(fp.sharded_param, update[shards.offsets[i]:shards.offsets[i + 1]])
        for (p, _), g in zip(plain, plain_grads, strict=True):
            p.grad = g if p.grad is None else p.grad.add_(g)
        self._head_grads_sharded(others, head_grads, head_by_id)
        return StepInfo(w, K, global_losses, torch.zeros((), dtype=torch.bool), "fsdp2")

    def _sharded_jacobian(self, shards: _Shards, L: torch.Tensor,
                          cot: torch.Tensor) -> torch.Tensor:
        """This rank's columns of the global ``(k, P)`` VJPs ``cot @ G`` (k = T, or 1)."""
        dtype = torch.float64 if L.dtype == torch.float64 else torch.float32
        J = torch.zeros(cot.shape[0], shards.size, dtype=dtype, device=L.device)
        pending: list = []

        def sink(i: int, grads: torch.Tensor, tasks: slice) -> None:
            work, out = shards.reduce_scatter(i, grads.to(dtype))
            self.dp.bytes_reduced += grads.numel() * dtype.itemsize
            pending.append((work, out, i, tasks))

        unsharded = [fp._unsharded_param for fp in shards.fsdp_params]
        per_task_vjp([L], [cot], unsharded, sink, batching=self._batching,
                     on_restart=pending.clear)
        for work, out, i, tasks in pending:
            work.wait()
            J[tasks, shards.offsets[i]:shards.offsets[i + 1]] = out
        return J.div_(shards.world)

    def _head_grads_sharded(self, others: list, grads: tuple, head_by_id: dict) -> None:
        shards = None
        for p, g in zip(others, grads, strict=True):
            fp = head_by_id.get(id(p))
            if fp is None:
                continue
            if shards is None or fp not in shards.fsdp_params:
                shards = _Shards([fp], self.dp)
            full = torch.zeros_like(p) if g is None else g
            work, out = shards.reduce_scatter(0, full[None])
            self.dp.bytes_reduced += full.numel() * full.element_size()
            work.wait()
            _add_sharded(fp.sharded_param, out[0] / self.dp.world)


def _add_sharded(param: DTensor, local_flat: torch.Tensor) -> None:
    local = local_flat.reshape(param.to_local().shape).to(param.dtype)
    if param.grad is None:
        param.grad = DTensor.from_local(local.clone(), param.device_mesh, param.placements,
                                        shape=param.shape, stride=param.stride())
    else:
        param.grad.to_local().add_(local)
