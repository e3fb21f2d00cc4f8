"""The bucket layout and the launch order of the bucketed Jacobian all-reduce, in one process
(a fake collective); the 2-process checks are in test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from mtlfast.distributed.buckets import BucketedJacobian, bucket_ranges
from mtlfast.engine import SharedParams


@pytest.mark.parametrize("cap", [None, 1, 50, 100, 300, 10**9])
def test_buckets_partition_the_parameters_last_first_within_the_cap(cap):
    numels = [10, 20, 5, 7, 1, 30]
    ranges = bucket_ranges(numels, 4, cap)
    assert ranges[0][1] == len(numels) and ranges[-1][0] == 0  # bucket 0 holds the last ones
    assert all(a[0] == b[1] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous
    for lo, hi in ranges:
        assert lo < hi
        size = 4 * sum(numels[lo:hi])
        assert cap is None or size <= cap or hi - lo == 1  # only a lone parameter exceeds it
    if cap is None or cap >= 4 * sum(numels):
        assert ranges == [(0, len(numels))]
    if cap == 1:
        assert len(ranges) == len(numels)


class FakeWork:
    """An all-reduce over ``world`` ranks holding the same values: the sum is world * x."""

    def __init__(self, flat: torch.Tensor, world: int, log: list) -> None:
        self.flat, self.world = flat, world
        log.append(flat.numel())

    def wait(self) -> None:
        self.flat.mul_(self.world)


def _sink(cap: int, *, overlap: bool):
    params = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2), torch.randn(6)]
    shared = SharedParams(params)
    T = 3
    J = torch.full((T, shared.size), float("nan"))
    ranges = bucket_ranges(shared.numels, T * 4, cap)
    log: list = []
    sink = BucketedJacobian(shared, J, ranges, torch.empty(T * shared.size),
                            lambda flat: FakeWork(flat, 2, log), 2, overlap=overlap)
    blocks = [torch.randn(T, p.numel()) for p in params]
    return sink, blocks, log, ranges


def test_buckets_start_in_index_order_whatever_order_they_complete():
    sink, blocks, log, ranges = _sink(60, overlap=True)
    assert ranges == [(3, 4), (2, 3), (1, 2), (0, 1)]  # 72, 48, 60, 144 bytes
    sink(2, blocks[2], slice(0, 3))  # bucket 1 complete first: must wait for bucket 0
    assert log == []
    sink(3, blocks[3][:2], slice(0, 2))  # two of three task rows: not complete yet
    assert log == []
    sink(3, blocks[3][2:], slice(2, 3))
    assert log == [18, 12]  # buckets 0 and 1, in order
    sink(0, blocks[0], slice(0, 3))  # bucket 3 waits for bucket 2 (parameter 1, unused)
    assert log == [18, 12]
    sink.finish()
    assert log == [18, 12, 15, 36]
    J = sink.wait()
    expected = torch.cat([blocks[0], torch.zeros(3, 5), blocks[2], blocks[3]], dim=1)
    assert torch.equal(J, expected)  # (world * G) / world, the unused parameter's zeros


def test_without_overlap_every_bucket_starts_at_finish():
    sink, blocks, log, _ = _sink(60, overlap=False)
    for i, b in enumerate(blocks):
        sink(i, b, slice(0, 3))
    assert log == []
    sink.finish()
    assert log == [18, 12, 15, 36]
    assert torch.equal(sink.wait(), torch.cat(blocks, dim=1))


def test_restart_forgets_partial_writes():
    sink, blocks, log, _ = _sink(60, overlap=False)
    sink(3, blocks[3] * 7, slice(0, 3))
    sink.restart()
    for i, b in enumerate(blocks[:3]):
        sink(i, b, slice(0, 3))
    sink.finish()  # parameter 3 was not written again: zeros, not the stale block
    assert torch.equal(sink.wait()[:, -6:], torch.zeros(3, 6))
