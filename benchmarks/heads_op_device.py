"""FusedHeads with its C++ heads op forced on another device (a GPU), against its default path
there, the loop of heads and concat + bmm: the measurement that decides whether the op's CPU
dispatch rule (``mtlfast.ops._dispatch``, "mlp_heads") should also take CUDA tensors.

    python benchmarks/heads_op_device.py [--device cuda] [--rounds 11] [--out DIR]

Each call is the heads grid's step (forward, a weighted sum of all outputs, backward of every
parameter and of z), timed with a synchronizing wall clock, contenders alternating within each
round; every contender is first checked to compute what the default FusedHeads computes. The
op is forced by sending the module's first call through the C++ op's rule: FusedHeads keeps
the route it chose for later calls of the same shape.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from heads_grid import contenders, measure, widths_of  # noqa: E402

from mtlfast import fuse_heads  # noqa: E402
from mtlfast.bench.heads_suite import _step, make_heads  # noqa: E402
from mtlfast.ops import _dispatch  # noqa: E402

#: (T, hidden, widths, B): few and many heads, width 1 and ragged, small and large batches
CASES = [(2, 16, "ragged", 32), (2, 64, "ones", 1024), (8, 16, "ones", 256),
         (8, 64, "ragged", 256), (40, 16, "ones", 32), (40, 64, "ragged", 1024)]


@contextlib.contextmanager
def _op_rule():
    rule = _dispatch.RULES["mlp_heads"]
    _dispatch.RULES["mlp_heads"] = (("cpu", lambda op, t, f: f["eager"]),)
    try:
        yield
    finally:
        _dispatch.RULES["mlp_heads"] = rule


def _clock(device: str):
    if device.startswith("cuda"):
        return lambda: (torch.cuda.synchronize(), time.perf_counter())[1]
    return time.perf_counter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--min-ms", type=float, default=5.0)
    p.add_argument("--quick", action="store_true", help="two cases, three rounds")
    p.add_argument("--out", help="write heads_op.json and heads_op.md here")
    args = p.parse_args()
    cases = CASES[:2] if args.quick else CASES
    rounds = 3 if args.quick else args.rounds
    rows = []
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    lines = [f"FusedHeads' C++ heads op on {args.device} ({name}), ms per forward + backward:",
             "", "| T | hidden | widths | B | default | C++ op | loop | concat+bmm | op / best |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for T, hidden, kind, B in cases:
        widths = widths_of(kind, T)
        runs = contenders(64, hidden, widths, B, torch.float32, args.device)
        heads = make_heads(64, hidden, widths, torch.device("cpu")).to(args.device)
        forced = fuse_heads(copy.deepcopy(heads))
        gen = torch.Generator().manual_seed(1)
        z = torch.randn(B, 64, generator=gen).to(args.device).requires_grad_()
        cot = torch.randn(B, sum(widths), generator=gen).to(args.device)
        with _op_rule():
            out = forced(z)  # chooses and keeps the op's route for this shape
        if not all("MLPHeads" in y.grad_fn.name() for y in out.values()):
            raise RuntimeError(f"the heads op did not serve T={T} hidden={hidden} B={B}")
        runs = {"fused": _step(forced, list(forced.parameters()), z, cot),
                "default": runs["fused"], "loop": runs["loop"],
                "concat+bmm": runs["concat+bmm"]}
        ms, ratio = measure(runs, rounds, args.min_ms, _clock(args.device))
        rows.append({"T": T, "hidden": hidden, "widths": kind, "B": B, "ms": ms,
                     "op_over_best": ratio})
        lines.append(f"| {T} | {hidden} | {kind} | {B} | {ms['default']:.3f} | "
                     f"{ms['fused']:.3f} | {ms['loop']:.3f} | {ms['concat+bmm']:.3f} | "
                     f"{ratio:.2f} |")
        print(lines[-1], flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "heads_op.json"), "w") as f:
            json.dump({"device": args.device, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "heads_op.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
