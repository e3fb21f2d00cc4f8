"""Gram methods: ``weights()`` from a given Gram, and the whole ``method(G)``, vs torchjd 0.18.

Run: ``pytest benchmarks/bench_methods.py --benchmark-only`` (not part of the default test
run). One thread, float32 G. Every GramMethod exported by ``mtlfast.methods`` is discovered;
the torchjd aggregator of the same name runs in the same session when torchjd has it. The
floor is ``ops.gram(G)`` plus one ``w @ G`` (``ops.combine``).

``run_solver_gpu_bench(device)`` is the plain-function entry for the GPU script: it times
``weights()`` of every Gram method at T = 8 and 32 with CUDA events.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import mtlfast.methods as M
from mtlfast import ops

GRAM_METHODS = sorted(
    (getattr(M, n) for n in M.__all__
     if isinstance(getattr(M, n), type) and issubclass(getattr(M, n), M.GramMethod)
     and getattr(M, n) is not M.GramMethod),
    key=lambda c: c.__name__,
)
NAMES = [c.__name__ for c in GRAM_METHODS]
TASKS = [2, 8, 32]
PARAMS = [100_000, 1_000_000]
#: Hyper-parameters torchjd requires where mtlfast has a paper default (kept equal).
TORCHJD_KWARGS = {"CAGrad": {"c": 0.4}}


def _torchjd(name: str):
    """The torchjd aggregator of the same name, or None (absent, or its extras missing)."""
    if importlib.util.find_spec("torchjd") is None:
        return None
    import torchjd.aggregation as jd

    cls = getattr(jd, name, None)
    if cls is None:
        return None
    try:
        return cls(**TORCHJD_KWARGS.get(name, {}))
    except (TypeError, ImportError):
        return None


def _torchjd_weights(agg, K: torch.Tensor) -> torch.Tensor:
    # torchjd >= 0.17: a Gramian-weighted aggregator holds its weighting on the Gram.
    return agg.gramian_weighting(K)


def _inputs(T: int, P: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(T, P, generator=g)
    G[0] = -0.5 * G[1] + 0.5 * G[0]  # one conflicting pair, so the solvers have work to do
    return G


pytestmark = pytest.mark.usefixtures("one_thread")  # benchmarks/conftest.py


@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("impl", ["mtlfast", "torchjd"])
@pytest.mark.parametrize("name", NAMES)
def test_weights(benchmark, name, impl, T):
    benchmark.group = f"weights T={T}"
    K = ops.gram(_inputs(T, 4096))
    if impl == "mtlfast":
        method = getattr(M, name)()
        fn = method.weights
    else:
        agg = _torchjd(name)
        if agg is None or not hasattr(agg, "gramian_weighting"):
            pytest.skip(f"torchjd has no Gram weighting named {name}")
        fn = lambda K: _torchjd_weights(agg, K)  # noqa: E731
    benchmark.pedantic(fn, args=(K,), rounds=20, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("P", PARAMS)
@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("impl", ["mtlfast", "torchjd"])
@pytest.mark.parametrize("name", NAMES)
def test_aggregate(benchmark, name, impl, T, P):
    benchmark.group = f"method(G) T={T} P={P:.0e}"
    G = _inputs(T, P)
    if impl == "mtlfast":
        fn = getattr(M, name)()
    else:
        fn = _torchjd(name)
        if fn is None:
            pytest.skip(f"torchjd has no aggregator named {name}")
    benchmark.pedantic(fn, args=(G,), rounds=5 if P >= 1_000_000 else 10, iterations=1,
                       warmup_rounds=1)


@pytest.mark.parametrize("P", PARAMS)
@pytest.mark.parametrize("T", TASKS)
def test_floor_gram_plus_combine(benchmark, T, P):
    benchmark.group = f"method(G) T={T} P={P:.0e}"
    G = _inputs(T, P)
    w = torch.full((T,), 1.0 / T)

    def floor():
        K = ops.gram(G)
        return ops.combine(w + 0 * K[0], G)

    benchmark.pedantic(floor, rounds=5 if P >= 1_000_000 else 10, iterations=1, warmup_rounds=1)


def run_solver_gpu_bench(device: str | torch.device = "cuda", repeats: int = 50) -> list[dict]:
    """Median time of ``weights()`` for each Gram method at T = 8 and 32 on ``device`` (CUDA
    events; the Gram is built once from a random float32 G with P = 65536)."""
    device = torch.device(device)
    rows = []
    for T in (8, 32):
        K = ops.gram(_inputs(T, 65536).to(device))
        for cls in GRAM_METHODS:
            method = cls().to(device)
            for _ in range(3):
                method.weights(K)
            times = []
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                method.weights(K)
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            times.sort()
            rows.append({"method": cls.__name__, "T": T, "device": str(device),
                         "median_ms": times[len(times) // 2], "min_ms": times[0]})
    return rows
