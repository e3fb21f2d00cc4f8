"""CPU: ``methods.UPGrad`` weights (T non-negative QPs on one Gram, ``ops.solvers.nnqp``) at
growing T, and the active-set steps the solves take.

    PYTHONPATH=. python benchmarks/bench_upgrad_large_t.py [--reps 5] [--T 8 32 64 128 200 256]

Prints one markdown row per T: median milliseconds of ``UPGrad().weights(K)`` for the Gram of
a random ``(T, 1000)`` matrix (float64), one thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtlfast.methods import UPGrad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--T", type=int, nargs="+", default=[8, 32, 64, 128, 200, 256])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread")
    print("| T | UPGrad.weights ms (median) |")
    print("|---|---|")
    for T in args.T:
        G = torch.randn(T, 1000, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
        K = G @ G.T
        method = UPGrad()
        method.weights(K)
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            method.weights(K)
            times.append(time.perf_counter() - t0)
        print(f"| {T} | {1e3 * statistics.median(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
