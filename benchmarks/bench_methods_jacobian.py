"""Whole-matrix methods (GradDrop, MoCo, DB-MTL): one step on a (T, P) float32 matrix, one
thread, against torchjd 0.18's GradDrop and against the floor of one read of G (``G.sum(0)``).

Run: python -m pytest benchmarks/bench_methods_jacobian.py --benchmark-columns=median
"""

import pytest
import torch
from torchjd.aggregation import GradDrop as TorchJDGradDrop

import mtlfast.methods as M

SHAPES = [(8, 100_000), (32, 100_000), (8, 1_000_000), (32, 1_000_000)]


pytestmark = pytest.mark.usefixtures("one_thread")  # benchmarks/conftest.py


def _inputs(T, P):
    g = torch.Generator().manual_seed(0)
    return torch.randn(T, P, generator=g), torch.rand(T, generator=g) + 0.5


def _torchjd_graddrop():
    aggregator = TorchJDGradDrop()
    return lambda G, L: aggregator(G)


CANDIDATES = {
    "floor_G.sum": lambda: (lambda G, L: G.sum(0)),
    "mtlfast_GradDrop": lambda: M.GradDrop(seed=0),
    "torchjd_GradDrop": _torchjd_graddrop,
    "mtlfast_MoCo": lambda: M.MoCo(),
    "mtlfast_DBMTL": lambda: M.DBMTL(),
}


@pytest.mark.parametrize("T,P", SHAPES, ids=[f"T{T}-P{P:.0e}" for T, P in SHAPES])
@pytest.mark.parametrize("name", CANDIDATES)
def test_step(benchmark, name, T, P):
    G, L = _inputs(T, P)
    method = CANDIDATES[name]()
    method(G, L)  # allocate state outside the timing
    benchmark.pedantic(method, args=(G, L), rounds=5, iterations=1, warmup_rounds=1)
