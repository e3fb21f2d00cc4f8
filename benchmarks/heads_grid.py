"""FusedHeads vs the best of its alternatives on a grid of head shapes (CPU, forward + backward).

    PYTHONPATH=. python benchmarks/heads_grid.py [--T 2 4 8 40] [--hidden 8 16 64 256]
        [--widths ones ragged] [--B 32 256 1024] [--dtype fp32 bf16] [--rounds 11] [--out f.json]

Per case, on the same weights: ``FusedHeads`` (``fuse_heads`` of the loop's heads), the
``nn.ModuleDict`` loop (``baselines.heads_loop``) and the hand fusion ``concat Linear + bmm``
(``baselines.ConcatBmmHeads``). Each call is the heads suite's step
(``mtlfast.bench.heads_suite``): forward, loss = sum of all outputs times fixed random weights,
backward of every parameter and of z. Contenders alternate within each round (machine load
hits all alike); a round times enough calls of each to last ``--min-ms`` of thread CPU time,
with one torch thread. The table gives the median time per call of each contender and the
ratio fused / best alternative (<= 1: fused is at least as fast), the median of the ratios
within each round.

Widths: ``ones`` = T binary heads (width 1); ``ragged`` = widths cycling through
1, 200, 5, 50, 2, 100, 10, 20 (T=2 gets 1 and 200).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time
from collections.abc import Callable

import torch

from mtlfast import baselines, fuse_heads
from mtlfast.bench.heads_suite import _step, make_heads

RAGGED = (1, 200, 5, 50, 2, 100, 10, 20)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def widths_of(kind: str, T: int) -> tuple[int, ...]:
    return (1,) * T if kind == "ones" else tuple(RAGGED[i % len(RAGGED)] for i in range(T))


def contenders(D: int, hidden: int, widths: tuple[int, ...], B: int, dtype: torch.dtype,
               device: str = "cpu") -> dict[str, Callable[[], tuple[torch.Tensor, ...]]]:
    heads = make_heads(D, hidden, widths, torch.device("cpu")).to(device, dtype)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(B, D, generator=gen).to(device, dtype).requires_grad_()
    cotangent = torch.randn(B, sum(widths), generator=gen).to(device, dtype)
    fused = fuse_heads(copy.deepcopy(heads))
    cat = baselines.ConcatBmmHeads(heads)
    return {
        "fused": _step(fused, list(fused.parameters()), z, cotangent),
        "loop": _step(lambda x: baselines.heads_loop(heads, x), list(heads.parameters()), z,
                      cotangent),
        "concat+bmm": _step(cat, list(cat.parameters()), z, cotangent),
    }


def _calls_for(fn: Callable[[], object], min_ms: float, clock: Callable[[], float]) -> int:
    t0 = clock()
    fn()
    once = max(clock() - t0, 1e-6)
    return max(1, round(min_ms * 1e-3 / once))


def measure(runs: dict[str, Callable[[], object]], rounds: int, min_ms: float,
            clock: Callable[[], float] = time.thread_time) -> tuple[dict[str, float], float]:
    """Median milliseconds per call of each contender (contenders alternating; ``clock``:
    thread CPU time by default, a synchronizing wall clock on a GPU), and the ratio fused /
    best alternative: the median over rounds of the ratio within a round, the best alternative
    being the one with the lowest median (each round's pair ran side by side, so load from
    other processes on the machine hits both alike)."""
    ref_out = None
    for name, fn in runs.items():  # warm-up, and every contender computes the same thing
        out, gz = fn()
        if ref_out is None:
            ref_out, ref_gz = out, gz
            continue
        tol = 1e-3 if out.dtype == torch.float32 else 5e-2
        for a, b in ((out, ref_out), (gz, ref_gz)):
            err = (a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)
            if err > tol:
                raise AssertionError(f"{name} differs from fused: relative error {err:.2e}")
    calls = {name: _calls_for(fn, min_ms, clock) for name, fn in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            fn, n = runs[name], calls[name]
            t0 = clock()
            for _ in range(n):
                fn()
            times[name].append((clock() - t0) * 1e3 / n)
    ms = {name: statistics.median(t) for name, t in times.items()}
    best = min((k for k in ms if k != "fused"), key=ms.__getitem__)
    return ms, statistics.median(f / b for f, b in zip(times["fused"], times[best], strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--D", type=int, default=64, help="in_features of the heads")
    p.add_argument("--T", type=int, nargs="+", default=[2, 4, 8, 40])
    p.add_argument("--hidden", type=int, nargs="+", default=[8, 16, 64, 256])
    p.add_argument("--widths", nargs="+", choices=["ones", "ragged"], default=["ones", "ragged"])
    p.add_argument("--B", type=int, nargs="+", default=[32, 256, 1024])
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--min-ms", type=float, default=3.0,
                   help="thread CPU time each contender runs per round")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)

    rows = []
    print("| dtype | T | hidden | widths | B | fused ms | loop ms | concat+bmm ms | ratio |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for dt, T, hidden, kind, B in itertools.product(args.dtype, args.T, args.hidden,
                                                    args.widths, args.B):
        runs = contenders(args.D, hidden, widths_of(kind, T), B, DTYPES[dt])
        ms, ratio = measure(runs, args.rounds, args.min_ms)
        row = {"dtype": dt, "T": T, "hidden": hidden, "widths": kind, "B": B, "D": args.D,
               "ms": ms, "ratio": ratio}
        rows.append(row)
        print(f"| {dt} | {T} | {hidden} | {kind} | {B} | {ms['fused']:.3f} | {ms['loop']:.3f} "
              f"| {ms['concat+bmm']:.3f} | {row['ratio']:.2f} |", flush=True)
    ratios = [r["ratio"] for r in rows]
    print(f"\n{len(rows)} cases: ratio median {statistics.median(ratios):.2f}, max "
          f"{max(ratios):.2f}; {sum(x > 1.02 for x in ratios)} above 1.02")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
