"""Step time of the demo's own models: mtlfast (each vjp strategy) vs the slow way vs LS.

    python benchmarks/demo_step_time.py --data digits qm9 speech --method upgrad --rounds 5

One process (``--threads`` torch threads, default 1), the demo's model and batch size for each
data set (the trunk of ``mtlfast.demo.make_trunk``, FusedHeads for mtlfast and LS, a Python
loop of ``nn.Linear`` heads for the slow way, same initial weights). A step is forward + losses
+ backward (no optimizer step, so every variant sees the same weights and batch). The variants
run in interleaved rounds of ``--steps`` steps each, so machine load hits them alike; the table
gives the median over all timed steps of wall time and of the main thread's CPU time (less
sensitive to other processes on a shared machine; with several threads, read the wall time).
Before timing, the mtlfast update is checked equal to the slow way's (relative error printed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mtlfast  # noqa: E402
from mtlfast import data as datasets  # noqa: E402
from mtlfast import demo  # noqa: E402
from mtlfast.engine.vjp import AUTO_TRIALS  # noqa: E402

VARIANTS = ("ls", "slow", "batched", "loop", "auto")


def _model(data: datasets.MTLData, fused: bool) -> demo.MTLModel:
    torch.manual_seed(0)
    return demo.MTLModel(demo.make_trunk(data), demo.make_heads(data.tasks, fused))


def _step_fn(variant: str, data: datasets.MTLData, method_name: str):
    """The demo's own backward steps (``mtlfast.demo``); mtlfast's with the given vjp strategy."""
    model = _model(data, fused=variant != "slow")
    method = demo.resolve_method(method_name, len(data.tasks))
    engine = None
    if variant == "ls":
        backward_step = demo.ls_step
    elif variant == "slow":
        backward_step = demo.slow_step(method)
    else:
        engine = mtlfast.MTLBackward(model.trunk, method, vjp=variant)

        def backward_step(losses, z, model):
            engine.backward(losses, z)

    def step(x, y) -> None:
        model.zero_grad(set_to_none=True)
        z, out = model(x)
        backward_step(demo.task_losses(data.tasks, out, y), z, model)

    return model, engine, step


def _flat_grad(model: demo.MTLModel) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])


def run(data_name: str, method_name: str, rounds: int, steps: int) -> dict[str, tuple]:
    data = datasets.load(data_name)
    batch_size = demo.DEFAULTS[data_name][1]
    x, y = next(iter(data.train.batches(batch_size, torch.Generator().manual_seed(0))))
    fns = {v: _step_fn(v, data, method_name) for v in VARIANTS}
    for v in ("slow", "batched", "loop"):
        fns[v][2](x, y)
    ref = _flat_grad(fns["slow"][0])
    for v in ("batched", "loop"):
        err = float((_flat_grad(fns[v][0]) - ref).norm() / ref.norm())
        print(f"{data_name}: update of mtlfast vjp={v} vs slow way: rel err {err:.1e}",
              file=sys.stderr)
    for _ in range(2 * (AUTO_TRIALS + 1) + 1):  # lets "auto" decide, warms every variant up
        for v in VARIANTS:
            fns[v][2](x, y)
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for v in VARIANTS:
            for _ in range(steps):
                w0, c0 = time.perf_counter(), time.thread_time()
                fns[v][2](x, y)
                wall[v].append(time.perf_counter() - w0)
                cpu[v].append(time.thread_time() - c0)
    choice = fns["auto"][1]._trunk.choice
    return {v: (statistics.median(wall[v]) * 1e3, statistics.median(cpu[v]) * 1e3,
                choice if v == "auto" else "") for v in VARIANTS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["digits", "qm9", "speech"])
    p.add_argument("--method", default="upgrad")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    basis = "CPU" if args.threads == 1 else "wall"
    print(f"| data | variant | wall ms/step | CPU ms/step | slow / variant ({basis}) |")
    print("|---|---|---:|---:|---:|")
    for name in args.data:
        res = run(name, args.method, args.rounds, args.steps)
        col = 1 if basis == "CPU" else 0
        slow = res["slow"][col]
        for v, (w, c, choice) in res.items():
            label = {"ls": "LS (sum().backward())", "slow": f"slow way ({args.method})",
                     "auto": f"mtlfast vjp=auto (chose {choice})"}.get(v, f"mtlfast vjp={v}")
            ratio = slow / (c if col else w)
            print(f"| {name} | {label} | {w:.2f} | {c:.2f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
