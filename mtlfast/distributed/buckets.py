"""DDP exact: the (T, P) Jacobian all-reduced in buckets, overlapped with the batched backward.

The shared parameters are grouped, in REVERSE order (autograd reaches the last layers first),
into runs of consecutive parameters of at most ``cap`` bytes of Jacobian each (a parameter
larger than the cap is a bucket of its own), as DDP buckets its gradients. Each bucket's
columns ``G[:, a:b]`` of the row-major ``(T, P)`` buffer are not contiguous, so a bucket has its
own contiguous ``(T, b - a)`` staging block: the backward hooks write a parameter's per-task
block straight into it (instead of into G), and the moment every parameter of bucket ``k`` (and
of all buckets before it) is written, its asynchronous all-reduce starts while autograd goes on
with the earlier layers. :meth:`BucketedJacobian.wait` then writes ``sum_r / W`` of each bucket
into its columns of G: the same memory traffic as one in-place all-reduce followed by
``G /= W``, plus a ``(T, P)`` staging buffer (kept across steps, like DDP's buckets). With one
bucket (the cap is None, or G fits in it) G itself is all-reduced in place after the backward.

Deadlock freedom: collectives are matched by their order on each rank, so buckets are launched
strictly in index order, ``0, 1, ..., n-1`` on every rank: bucket ``k`` starts only once buckets
``0..k`` are all complete, even when autograd completes them in another order, and the buckets
holding parameters that no task reaches on a rank (never written during the backward, zeros)
start from :meth:`finish`, after the backward, in the same index order. The layout depends only
on the shapes, T, the dtype and the cap, which the per-step configuration check compares across
ranks before any of these collectives. Values: an element's all-reduce does not depend on which
bucket carries it for two ranks (``a + b``); with more ranks the reduction order inside a
collective may differ, so results agree with one all-reduce to rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..engine import JacobianSink, SharedParams

__all__ = ["BucketedJacobian", "bucket_ranges"]


def bucket_ranges(numels: list[int], row_bytes: int, cap: int | None) -> list[tuple[int, int]]:
    """Parameter index ranges ``[lo, hi)`` of the buckets, bucket 0 holding the LAST parameters.

    ``row_bytes``: Jacobian bytes per parameter element (T * itemsize); ``cap``: bytes per bucket
    (None: one bucket).
    """
    n = len(numels)
    if cap is None:
        return [(0, n)]
    ranges, hi, size = [], n, 0
    for i in range(n - 1, -1, -1):
        add = numels[i] * row_bytes
        if hi != i + 1 and size + add > cap:  # close the current (non-empty) bucket
            ranges.append((i + 1, hi))
            hi, size = i + 1, 0
        size += add
    ranges.append((0, hi))
    return ranges


class BucketedJacobian(JacobianSink):
    """A :class:`JacobianSink` that all-reduces the buckets of G as soon as they are written.

    Args:
        shared: the shared parameters' flat layout.
        J: the ``(T, P)`` Jacobian buffer; holds ``mean_r G_r`` after :meth:`wait`.
        ranges: :func:`bucket_ranges` for this T and dtype.
        staging: a ``(T * P,)`` buffer of J's dtype (None for a single bucket).
        start: ``start(flat)`` launches an asynchronous all-reduce (sum) and returns its work.
        world: the number of ranks.
        overlap: launch buckets during the backward (False: all of them from :meth:`finish`,
            used while a batched backward may still fail and be replayed by the loop fallback).
    """

    def __init__(self, shared: SharedParams, J: torch.Tensor, ranges: list[tuple[int, int]],
                 staging: torch.Tensor | None, start: Callable[[torch.Tensor], object],
                 world: int, *, overlap: bool) -> None:
        super().__init__(shared, J)
        self.start, self.world, self.overlap = start, world, overlap
        T, off = J.shape[0], shared.offsets
        self.ranges = ranges
        self.blocks: list[torch.Tensor] = []  # bucket k's (T, cols) buffer, contiguous
        self.bucket_of = [0] * len(shared.params)
        for k, (lo, hi) in enumerate(ranges):
            cols = off[hi] - off[lo]
            block = J if staging is None else staging[T * off[lo]:T * off[hi]].view(T, cols)
            self.blocks.append(block)
            for i in range(lo, hi):
                self.bucket_of[i] = k
        self.rows = [0] * len(shared.params)
        self.missing = [hi - lo for lo, hi in ranges]  # parameters of bucket k not yet done
        self.launched: list = []

    def columns(self, i: int) -> torch.Tensor:
        k = self.bucket_of[i]
        if self.blocks[k] is self.J:
            return self.J[:, self.shared.slice(i)]
        base = self.shared.offsets[self.ranges[k][0]]
        return self.blocks[k][:, self.shared.offsets[i] - base:self.shared.offsets[i + 1] - base]

    def __call__(self, i: int, grads: torch.Tensor, tasks: slice) -> None:
        super().__call__(i, grads, tasks)
        self.rows[i] += tasks.stop - tasks.start
        if self.rows[i] == self.J.shape[0]:  # every task's row of parameter i is written
            self.missing[self.bucket_of[i]] -= 1
            if self.overlap:
                self._launch_ready()

    def _launch_ready(self) -> None:
        k = len(self.launched)
        while k < len(self.blocks) and self.missing[k] == 0:
            self.launched.append(self.start(self.blocks[k].view(-1)))
            k += 1

    def restart(self) -> None:
        # Only reachable before anything was launched (overlap is off until batching is known
        # to work), so resetting the counters is enough.
        super().restart()
        self.rows = [0] * len(self.rows)
        self.missing = [hi - lo for lo, hi in self.ranges]

    def finish(self) -> None:
        super().finish()  # zeros for the parameters no task reached on this rank
        self.missing = [0] * len(self.blocks)
        self._launch_ready()

    def wait(self) -> torch.Tensor:
        """Wait for every bucket; ``J = (sum over ranks) / W``. Returns J."""
        for k, work in enumerate(self.launched):
            work.wait()
            block = self.blocks[k]
            if block is self.J:
                self.J.div_(self.world)
            else:
                lo, hi = self.ranges[k]
                off = self.shared.offsets
                torch.div(block, self.world, out=self.J[:, off[lo]:off[hi]])
        return self.J
