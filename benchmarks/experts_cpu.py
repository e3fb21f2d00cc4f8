"""Expert blocks on the CPU, forward + backward, side by side in one process: the fused block
with the C++ expert kernel (``mtlfast::expert_mlp``), the same block on its torch (bmm) path,
the LibMTL-style loop (``unfuse()``) and the GEMM floor of ``bench --suite arch``.

    python benchmarks/experts_cpu.py [--batches 32 256 2048] [--hidden 256 128] [--input 256]
        [--repeats 15] [--threads 1]

Prints a markdown table of medians (contenders alternated, one torch thread by default).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch

import mtlfast.arch.experts as experts
from mtlfast.bench.arch_suite import NAMED, _gemm_floor, _step, make_block

CASES = ("MMoE 8 experts x 8 tasks", "PLE 2 levels (1+1/task)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 256, 2048])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 128],
                    help="the experts' layer widths (the suite's: DeepCTR's default 256 128)")
    ap.add_argument("--input", type=int, default=256, help="the input width K")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, input {args.input}, experts {args.hidden}, medians of "
          f"{args.repeats}\n")
    print("| case | B | kernel ms | torch path ms | loop ms | floor ms | loop / kernel | "
          "torch path / kernel |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label in CASES:
        for B in args.batches:
            cfg = dict(NAMED["quick"][label], B=B, K=args.input, hidden=tuple(args.hidden))
            block = make_block(cfg, torch.device("cpu"))
            loop = block.unfuse()
            x = torch.randn(B, cfg["K"])
            c = torch.randn(cfg["T"], B, cfg["hidden"][-1])
            fused = _step(block, x, c)
            torch_path = _step(block, x, c)
            runs = {"kernel": fused, "torch": torch_path, "loop": _step(loop, x, c),
                    "floor": _gemm_floor(block, B, torch.device("cpu")).run}
            times: dict[str, list[float]] = {k: [] for k in runs}
            for rep in range(args.repeats + 2):
                for name, run in runs.items():
                    patch = mock.patch.object(experts, "backend", lambda *a, **k: "torch") \
                        if name == "torch" else contextlib.nullcontext()
                    with patch:
                        t0 = time.perf_counter()
                        run()
                        dt = time.perf_counter() - t0
                    if rep >= 2:
                        times[name].append(dt * 1e3)
            m = {k: statistics.median(v) for k, v in times.items()}
            print(f"| {label} | {B} | {m['kernel']:.3g} | {m['torch']:.3g} | {m['loop']:.3g} | "
                  f"{m['floor']:.3g} | {m['loop'] / m['kernel']:.2f}x | "
                  f"{m['torch'] / m['kernel']:.2f}x |")


if __name__ == "__main__":
    main()
