"""Data parallelism (DDP) for ``mtlfast.backward``: exact or local, over ``torch.distributed``.

Each rank holds the same parameters and its own slice of the global batch; a loss is the mean
over the local slice, so the global loss is the mean of the ranks' losses and, linearly, the
global per-task gradients are the mean of the ranks' ``(T, P)`` Jacobians:
``G = (1/W) sum_r G_r``. Hence:

- ``"exact"``: the flat ``(T, P)`` buffer is all-reduced in buckets (``bucket_cap_mb``) whose
  asynchronous all-reduces start during the batched backward, as soon as autograd has written
  them (see buckets.py), beside a small all-reduce of the losses and the heads' gradients
  started before it; then the method runs on the global Gram ``K = G G^T`` identically on every
  rank: the step equals one process on the global batch.
  The sum of per-rank Grams is NOT the global Gram (cross terms ``G_r G_s^T`` are missing),
  which is why the Jacobian itself travels: ``T * P`` floats per step.
- ``"local"``: each rank runs the method on its own ``G_r``, then the combined update
  ``w_r @ G_r`` (P floats, plus the heads) is averaged: the volume of ordinary DDP, and a
  documented approximation (``mean_r w_r @ G_r`` is not ``w @ G``).

The model's forward must run under ``no_sync()`` (see :func:`mtlfast.distributed.no_sync`):
the engine differentiates with ``torch.autograd.grad``, which never fires DDP's reducer, and an
armed reducer would fail the next forward. Every collective here is issued in the same order on
every rank (configuration check, losses and heads, Jacobian buckets in index order), and each
step starts with a small all-reduce of the configuration (T, P, the number of head parameters,
the method, the bucket cap), so a mismatched rank raises ``ValueError`` on every rank instead
of hanging in a collective of the wrong size.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..engine import (
    DEFAULT_BUCKET_CAP_MB,
    DistributedMode,
    JacobianSink,
    Reducer,
    SharedParams,
)
from .buckets import BucketedJacobian, bucket_ranges

__all__ = ["Collectives", "DataParallel", "DistributedMode"]


def _crc(text: str) -> int:
    # zlib.crc32 is the same in every process (str hash() is salted per process).
    return zlib.crc32(text.encode())


class Collectives:
    """The collectives every distributed reducer shares: the per-step configuration check, the
    method's state broadcast, and one-all-reduce means; counts the bytes it reduces."""

    def __init__(self, group: dist.ProcessGroup, timeout: timedelta | None = None) -> None:
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError("process_group must be a torch.distributed.ProcessGroup (e.g. "
                            f"torch.distributed.group.WORLD), got {type(group).__name__}")
        if timeout is not None and not isinstance(timeout, timedelta):
            raise TypeError(f"timeout must be a datetime.timedelta or None, got {timeout!r}")
        self.group, self.timeout = group, timeout
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._synced_method: nn.Module | None = None
        #: bytes this reducer sent into collectives (all-reduce payloads), for benchmarks.
        self.bytes_reduced = 0

    def check_config(self, fields: dict[str, object], device: torch.device) -> None:
        """Raise ``ValueError`` on every rank when the ranks disagree on any field."""
        sig = torch.tensor([v if isinstance(v, int) else _crc(str(v)) for v in fields.values()],
                           dtype=torch.int64, device=device)
        both = torch.cat([sig, -sig])
        work = dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        if self.timeout is None:
            work.wait()
        elif not work.wait(self.timeout):
            raise RuntimeError(f"mtlfast.backward: the ranks did not all reach the step within "
                               f"{self.timeout} (a rank skipped mtlfast.backward?)")
        high, neg_low = both.tolist()[: len(sig)], both.tolist()[len(sig):]
        if all(h == -n for h, n in zip(high, neg_low, strict=True)):
            return
        everyone: list[dict | None] = [None] * self.world
        dist.all_gather_object(everyone, fields, group=self.group)
        bad = [k for k in fields if len({str(c[k]) for c in everyone}) > 1]  # type: ignore[index]
        per_rank = "; ".join(f"rank {r}: " + ", ".join(f"{k}={c[k]}" for k in bad)  # type: ignore[index]
                             for r, c in enumerate(everyone))
        raise ValueError(f"mtlfast.backward: the ranks of the process group disagree on "
                         f"{', '.join(bad)} ({per_rank}); every rank must run the same tasks, "
                         "shared parameters and method")

    def sync_method(self, method: nn.Module) -> None:
        """Broadcast a randomized or stateful method's state from rank 0 once, so every rank
        draws the same weights from the same global Gram."""
        if self._synced_method is method:
            return
        self._synced_method = method
        if getattr(method, "deterministic", True):
            return
        box = [method.state_dict() if self.rank == 0 else None]
        src = dist.get_global_rank(self.group, 0)
        dist.broadcast_object_list(box, src=src, group=self.group)
        if self.rank != 0:
            method.load_state_dict(box[0])

    def start(self, flat: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> dist.Work:
        self.bytes_reduced += flat.numel() * flat.element_size()
        return dist.all_reduce(flat, op=op, group=self.group, async_op=True)

    def start_mean(self, losses: torch.Tensor, params: Sequence[torch.Tensor],
                   grads: Sequence[torch.Tensor | None],
                   ) -> Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Start the mean over ranks of the losses and of ``grads`` (None: zeros), in ONE
        asynchronous all-reduce; the returned function waits and returns both."""
        parts = [losses.detach().reshape(-1)] + [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for p, g in zip(params, grads, strict=True)]
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in parts) else torch.float32
        flat = torch.cat([t.to(dtype) for t in parts])
        work = self.start(flat)

        def result() -> tuple[torch.Tensor, list[torch.Tensor]]:
            work.wait()
            flat.div_(self.world)
            out = list(flat.split([t.numel() for t in parts]))
            mean_losses = out[0].to(losses.dtype)
            return mean_losses, [o.view(p.shape).to(p.dtype if g is None else g.dtype)
                                 for o, p, g in zip(out[1:], params, grads, strict=True)]

        return result

    def mean(self, params: Sequence[torch.Tensor],
             grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """Mean over ranks of per-parameter gradients (None: zeros), in ONE all-reduce."""
        empty = torch.empty(0, dtype=torch.float32, device=params[0].device)
        return self.start_mean(empty, params, grads)()[1]

    def all_true(self, ok: torch.Tensor) -> torch.Tensor:
        """The AND of a flag over ranks, on the device (no host read)."""
        flag = ok.to(torch.int32).reshape(1)
        self.start(flag, dist.ReduceOp.MIN).wait()
        return flag[0].bool()

    def explain(self, local: str | None) -> str:
        """Each rank's description of what it found non-finite (every rank calls this)."""
        everyone: list[str | None] = [None] * self.world
        dist.all_gather_object(everyone, local, group=self.group)
        return "; ".join(f"on rank {r}, {d}" for r, d in enumerate(everyone) if d) \
            or "the gradients"


class DataParallel(Reducer):
    """DDP for ``mtlfast.backward``: ``"exact"`` (the global batch's step) or ``"local"``.

    Args:
        shared: the shared parameters (replicated on every rank).
        group: the process group the model is replicated over.
        mode: ``"exact"`` or ``"local"`` (see module doc).
        timeout: how long the per-step configuration check waits for the other ranks before
            raising (None: the group's own timeout).
        bucket_cap_mb: exact mode: MiB of Jacobian per all-reduce bucket, each started during
            the backward as soon as it is written (None: one all-reduce of the whole buffer,
            in place, after the backward: no staging copy, no overlap).
    """

    vjp_auto = False

    def __init__(self, shared: Sequence[torch.Tensor], group: dist.ProcessGroup,
                 mode: DistributedMode = "exact", timeout: timedelta | None = None,
                 bucket_cap_mb: float | None = DEFAULT_BUCKET_CAP_MB) -> None:
        super().__init__(shared)
        self.comm = Collectives(group, timeout)
        if mode not in ("exact", "local"):
            raise ValueError(f"distributed_mode must be 'exact' or 'local', got {mode!r}")
        if bucket_cap_mb is not None and (isinstance(bucket_cap_mb, bool) or not isinstance(
                bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0):
            raise ValueError(f"bucket_cap_mb must be a positive number (MiB) or None, got "
                             f"{bucket_cap_mb!r}")
        self.mode = mode
        self.exact = self.needs_jacobian = mode == "exact"
        self.bucket_cap = None if bucket_cap_mb is None else max(1, int(bucket_cap_mb * 2**20))
        self._staging: torch.Tensor | None = None

    @property
    def bytes_reduced(self) -> int:
        return self.comm.bytes_reduced

    def check_mode(self, mode: str, method: object) -> None:
        if self.exact and mode in ("gramian", "features"):  # K of the global batch needs G
            raise ValueError(f"mode={mode!r} cannot run with process_group in distributed_mode"
                             "='exact' (it all-reduces the (T, P) Jacobian): use mode="
                             "'jacobian' or distributed_mode='local'")

    def begin(self, *, num_tasks: int, layout: SharedParams, heads: int, method: object,
              mode: str) -> None:
        self.comm.check_config({"T (tasks)": num_tasks, "P (shared parameters)": layout.size,
                                "head parameters": heads, "method": type(method).__name__,
                                "mode": f"{mode}/{self.mode}",
                                "bucket cap (bytes)": self.bucket_cap or 0}, layout.device)
        if self.exact:
            self.comm.sync_method(method)

    def mean_losses(self, losses: torch.Tensor) -> torch.Tensor:
        return self.comm.start_mean(losses, [], [])()[0]

    def start_inputs(self, losses, others, head_grads):
        if not self.exact:
            return super().start_inputs(losses, others, head_grads)
        return self.comm.start_mean(losses, others, head_grads)

    def sink(self, layout: SharedParams, J: torch.Tensor, *, overlap: bool) -> JacobianSink:
        if not self.exact:
            return super().sink(layout, J, overlap=overlap)
        ranges = bucket_ranges(layout.numels, J.shape[0] * J.element_size(), self.bucket_cap)
        staging = None
        if len(ranges) > 1:  # the buckets' contiguous blocks, kept across steps like DDP's
            if self._staging is None or self._staging.numel() != J.numel() or \
                    self._staging.dtype != J.dtype or self._staging.device != J.device:
                self._staging = None  # free the old one before allocating
                self._staging = torch.empty(J.numel(), dtype=J.dtype, device=J.device)
            staging = self._staging
        return BucketedJacobian(layout, J, ranges, staging, self.comm.start, self.comm.world,
                                overlap=overlap)

    def finish_jacobian(self, sink: JacobianSink) -> torch.Tensor:
        return sink.wait() if self.exact else sink.J

    def agree(self, ok: torch.Tensor, *, per_rank: bool = False) -> torch.Tensor:
        # Exact: computed from reduced values, identical on every rank.
        return ok if self.exact and not per_rank else self.comm.all_true(ok)

    def explain(self, local: str | None, *, per_rank: bool = False) -> str:
        if self.exact and not per_rank:
            return local or "the gradients"
        return self.comm.explain(local)

    def reduce_jacobian(self, G: torch.Tensor) -> torch.Tensor:
        if self.exact:
            self.comm.start(G).wait()
            G.div_(self.comm.world)
        return G

    def average(self, layout, grads, others, head_grads):
        both = self.comm.mean([*layout.params, *others], [*grads, *head_grads])
        n = len(grads)
        return list(both[:n]), list(both[n:])
