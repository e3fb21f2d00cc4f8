"""PCGrad's counter-based random orders: Philox4x32-10 reference, C++ and CUDA kernels."""

import collections
import itertools

import pytest
import torch

from mtlfast import _ext
from mtlfast.methods import PCGrad
from mtlfast.ops import solvers
from mtlfast.ops.solvers import _philox4x32_10

from ..conftest import no_host_sync

needs_cpu_kernel = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="extension not built")


def test_philox_known_answers():
    # Random123's known-answer vectors for philox4x32_10 (counter, key) -> output.
    assert _philox4x32_10([0, 0, 0, 0], 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _philox4x32_10([0xFFFFFFFF] * 4, 2**64 - 1) == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    key = 0xA4093822 | (0x299F31D0 << 32)
    assert _philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], key) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@needs_cpu_kernel
@pytest.mark.parametrize("seed, step", [(0, 0), (12345, 7), (2**62 + 3, 2**32 + 5),
                                        (2**63 - 1, 2**40)])
@pytest.mark.parametrize("batch, T", [(1, 1), (1, 2), (3, 5), (2, 17), (1, 64), (2, 70)])
def test_cpu_kernel_matches_reference(seed, step, batch, T):
    a = torch.tensor([seed, step], dtype=torch.int64)
    b = a.clone()
    got = torch.ops.mtlfast.pcgrad_orders(a, batch, T)
    want = solvers.pcgrad_orders_reference(b, batch, T)
    assert torch.equal(got, want)
    assert a.tolist() == b.tolist() == [seed, step + 1]


def test_rows_are_permutations_and_fresh_per_row_problem_and_step():
    state = torch.tensor([99, 0], dtype=torch.int64)
    first = solvers.pcgrad_orders(state, 4, 9)
    second = solvers.pcgrad_orders(state, 4, 9)
    assert state.tolist() == [99, 2]
    for orders in (first, second):
        assert torch.equal(orders.sort(-1).values, torch.arange(9).expand(4, 9, 9))
    rows = {tuple(r) for r in torch.cat([first, second]).reshape(-1, 9).tolist()}
    assert len(rows) == 72  # 9! permutations: distinct rows everywhere (chance of a tie ~1e-3)


def test_orders_are_uniform():
    # All 6 permutations of 3 tasks, 6000 rows: each count within 5 sigma of 1000.
    state = torch.tensor([2024, 0], dtype=torch.int64)
    rows = solvers.pcgrad_orders(state, 2000, 3).reshape(-1, 3).tolist()
    counts = collections.Counter(tuple(r) for r in rows)
    assert set(counts) == set(itertools.permutations(range(3)))
    sigma = (6000 * (1 / 6) * (5 / 6)) ** 0.5
    assert all(abs(c - 1000) < 5 * sigma for c in counts.values()), counts


def test_bad_state_is_a_value_error():
    with pytest.raises(ValueError, match="state must be a contiguous int64"):
        solvers.pcgrad_orders(torch.tensor([1.0, 2.0]), 1, 3)
    with pytest.raises(ValueError, match="positive ints"):
        solvers.pcgrad_orders(torch.tensor([1, 2]), 0, 3)


def test_pcgrad_state_round_trip_continues_the_stream():
    a = PCGrad(seed=5)
    K = torch.eye(4, dtype=torch.float64)
    a.weights(K)
    b = PCGrad(seed=6)
    b.load_state_dict(a.state_dict())
    a.weights(K)
    b.weights(K)
    assert torch.equal(a.last_orders, b.last_orders)
    with pytest.raises(ValueError, match="seed must be an int"):
        PCGrad(seed=-1)


@pytest.mark.cuda
@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="CUDA kernels not built")
@pytest.mark.parametrize("batch, T", [(1, 1), (3, 5), (2, 64), (1, 100)])
def test_cuda_kernel_matches_cpu_and_makes_no_host_sync(batch, T):
    cpu = torch.tensor([77, 2**32 - 1], dtype=torch.int64)
    gpu = cpu.cuda()
    want = solvers.pcgrad_orders(cpu, batch, T)
    with no_host_sync():
        got = solvers.pcgrad_orders(gpu, batch, T)
    assert torch.equal(got.cpu(), want)
    assert gpu.tolist() == cpu.tolist() == [77, 2**32]


@pytest.mark.cuda
@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="CUDA kernels not built")
def test_pcgrad_draws_the_same_orders_on_cpu_and_cuda():
    K = torch.randn(6, 20, dtype=torch.float64)
    K = K @ K.T
    on_cpu, on_gpu = PCGrad(seed=3), PCGrad(seed=3)
    for _ in range(2):
        w_cpu = on_cpu.weights(K)
        w_gpu = on_gpu.weights(K.cuda())
        assert torch.equal(on_cpu.last_orders, on_gpu.last_orders.cpu())
        torch.testing.assert_close(w_gpu.cpu(), w_cpu)
    assert on_gpu.rng_state.device.type == "cuda"
