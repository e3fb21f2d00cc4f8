"""ops.gram vs G @ G.T on the CPU (pytest-benchmark).

Run: pytest benchmarks/bench_gram.py --benchmark-only --benchmark-group-by=param:shape,param:threads
The C++ kernel does T(T+1)/2 * P multiply-adds (upper triangle), G @ G.T does T^2 * P.
"""

import pytest
import torch

from mtlfast.ops import gram

SHAPES = [(8, 100_000), (8, 1_000_000), (32, 100_000), (32, 1_000_000)]


@pytest.fixture(params=[1, torch.get_num_threads()], ids=lambda n: f"{n}thr")
def threads(request):
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}_P{s[1]:.0e}")
@pytest.mark.parametrize("impl", ["mtlfast", "matmul"])
def test_gram(benchmark, shape, impl, threads):
    G = torch.randn(*shape)
    fn = (lambda: gram(G)) if impl == "mtlfast" else (lambda: G @ G.T)
    benchmark.group = f"gram T={shape[0]} P={shape[1]:.0e} threads={threads}"
    T, P = shape
    benchmark.extra_info["useful_fma"] = T * (T + 1) // 2 * P
    benchmark.pedantic(fn, rounds=15, warmup_rounds=2)
