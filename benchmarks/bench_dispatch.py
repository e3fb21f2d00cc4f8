"""CPU: the C++ kernels against torch's own BLAS ops, side by side in one run (what the CPU
rows of mtlfast/ops/_dispatch.py rest on): ``ops.gram``'s kernel vs ``G @ G.T``, and, while
a build still carries the C++ ``combine_`` CPU kernel, ``ops.combine``'s kernel vs ``addmv``
(the kernel lost and was deleted; benchmarks/RESULTS.md, "ops dispatch, CPU").

    PYTHONPATH=. python benchmarks/bench_dispatch.py [--reps 15]

Prints one markdown row per case: median milliseconds of the kernel and of torch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import mtlfast  # noqa: F401  (loads torch.ops.mtlfast)


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _combine_cases(T: int, P: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(T, P, generator=g, dtype=dtype)
    w = torch.rand(T, generator=g, dtype=dtype)
    out = torch.zeros(P, dtype=dtype)
    kernel = torch.ops.mtlfast.combine_
    return {
        "combine out=None": (lambda: kernel(w, G, torch.empty(P, dtype=dtype), False, 1.0),
                             lambda: w @ G),
        "combine out=": (lambda: kernel(w, G, out, False, 0.5),
                         lambda: out.addmv_(G.t(), w, beta=0.0, alpha=0.5)),
        "combine accumulate": (lambda: kernel(w, G, out, True, 0.5),
                               lambda: out.addmv_(G.t(), w, alpha=0.5)),
    }


def _has_cpu_combine() -> bool:
    return hasattr(torch.ops.mtlfast, "combine_") and \
        torch._C._dispatch_has_kernel_for_dispatch_key("mtlfast::combine_", "CPU")


def _gram_cases(T: int, P: int, dtype: torch.dtype):
    G = torch.randn(T, P, generator=torch.Generator().manual_seed(0), dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return {"gram": (lambda: torch.ops.mtlfast.gram(G),
                     lambda: (lambda Gf: Gf @ Gf.T)(G.to(acc)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| case | dtype | T | P | C++ kernel ms | torch ms | kernel / torch |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for T in (8, 32):
            for P in (100_000, 1_000_000):
                cases = _gram_cases(T, P, dtype)
                # The C++ combine took float32/float64 only.
                if dtype != torch.bfloat16 and _has_cpu_combine():
                    cases.update(_combine_cases(T, P, dtype))
                for name, (kernel, ours) in cases.items():
                    k = _median_ms(kernel, args.reps)
                    t = _median_ms(ours, args.reps)
                    print(f"| {name} | {str(dtype)[6:]} | {T} | {P} | {k:.3f} | {t:.3f} | "
                          f"{k / t:.2f} |", flush=True)


if __name__ == "__main__":
    main()
