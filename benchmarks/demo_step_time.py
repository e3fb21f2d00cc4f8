"""Step time of the demo's own models: mtlfast (each vjp strategy) vs the slow way vs LS.

    python benchmarks/demo_step_time.py --data digits qm9 speech --method upgrad --rounds 5

The steps of ``python -m mtlfast bench --suite demo`` (``mtlfast.bench.demo_suite``: the
demo's model and batch size per data set, FusedHeads for mtlfast and LS, a Python loop of
``nn.Linear`` heads for the slow way, same initial weights; forward + losses + backward, no
optimizer step), here for any method and timed in interleaved rounds of ``--steps`` steps each
(the bench timer, ``mtlfast.bench.harness.measure``), so machine load hits every variant
alike; the table gives the median over all timed steps. Before timing, each mtlfast strategy's
update is checked against the slow way's (relative error printed).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from mtlfast.bench.demo_suite import VARIANTS, step_functions
from mtlfast.bench.harness import Config, measure


def run(data_name: str, method_name: str, rounds: int, steps: int) -> dict[str, float]:
    """Median milliseconds per step of each variant; ``"choice"``: what vjp=auto chose."""
    fns, choice = step_functions(data_name, method_name, torch.device("cpu"))
    slow = fns["slow"]()
    for v in ("batched", "loop"):
        err = float((fns[v]() - slow).norm() / slow.norm())
        print(f"{data_name}: update of mtlfast vjp={v} vs slow way: rel err {err:.1e}",
              file=sys.stderr)
    cfg = Config(torch.device("cpu"), "quick", warmup=1, min_reps=steps, max_reps=steps,
                 budget_s=0.0)
    times: dict[str, list[float]] = {v: [] for v in fns}
    for _ in range(rounds):
        for v, fn in fns.items():
            times[v] += measure(fn, cfg)
    return {**{v: statistics.median(t) * 1e3 for v, t in times.items()}, "choice": choice}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["digits", "qm9", "speech"],
                   help="bundled data sets to run")
    p.add_argument("--method", default="upgrad", help="a mtlfast.methods class, any case")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| data | variant | ms/step | slow / variant |")
    print("|---|---|---:|---:|")
    for name in args.data:
        res = run(name, args.method, args.rounds, args.steps)
        for v, label in VARIANTS.items():
            if v == "slow":
                label = f"{label} ({args.method})"
            if v == "auto":
                label = f"{label} (chose {res['choice']})"
            print(f"| {name} | {label} | {res[v]:.2f} | {res['slow'] / res[v]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
