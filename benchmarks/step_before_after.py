"""The training step of two checkouts side by side: ``mtlfast.MTLBackward.backward`` only.

    python benchmarks/step_before_after.py --before /path/to/old/checkout --rounds 5

Each round runs one subprocess per checkout (``PYTHONPATH`` set to it, its own built
extension), alternating which goes first, so machine load hits both alike; each subprocess
times ``--steps`` steps (forward + losses + ``engine.backward``, no optimizer step) per case
after a warm-up, with one torch thread. The table gives, per case, the median over all rounds
of each checkout and their ratio. Only the public API is used, so any two versions compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

#: (label, model, method, mode): "digits" is the demo's MultiDigits model and batch size;
#: "mlp" a 3-layer MLP trunk (P = 0.2M) with 8 linear heads, batch 256; "mlp32" the bench
#: step suite's headline (64 -> 256 -> 256, P = 82.4k, 32 heads, batch 64).
CASES = [
    ("digits UPGrad jacobian", "digits", "UPGrad", "jacobian"),
    ("digits UPGrad gramian", "digits", "UPGrad", "gramian"),
    ("digits UPGrad features", "digits", "UPGrad", "features"),
    ("digits PCGrad jacobian", "digits", "PCGrad", "jacobian"),
    ("digits NashMTL jacobian", "digits", "NashMTL", "jacobian"),
    ("digits FAMO (losses)", "digits", "FAMO", "auto"),
    ("mlp T=8 UPGrad jacobian", "mlp", "UPGrad", "jacobian"),
    ("mlp T=8 MGDA gramian", "mlp", "MGDA", "gramian"),
    ("mlp32 T=32 UPGrad jacobian", "mlp32", "UPGrad", "jacobian"),
    ("mlp32 T=32 UPGrad gramian", "mlp32", "UPGrad", "gramian"),
]


def _model(name: str):
    """(model, step inputs, loss function) for a case; the same weights in every checkout."""
    import torch
    from torch import nn

    from mtlfast import data as datasets
    from mtlfast import demo

    torch.manual_seed(0)
    if name == "digits":
        data = datasets.load("digits")
        model = demo.MTLModel(demo.make_trunk(data), demo.make_heads(data.tasks, True))
        batch = next(iter(data.train.batches(demo.DEFAULTS["digits"][1],
                                             torch.Generator().manual_seed(0))))

        def losses(x, y):
            z, out = model(x)
            return demo.task_losses(data.tasks, out, y), z

        return model, batch, losses
    if name == "mlp32":
        trunk = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        T, width, d_in, size = 32, 256, 64, 64
    else:
        trunk = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                              nn.Linear(256, 128), nn.ReLU())
        T, width, d_in, size = 8, 128, 128, 256
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(T))
    model = nn.ModuleDict({"trunk": trunk, "heads": heads})
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(size, d_in, generator=g), torch.randn(size, T, generator=g))

    def mlp_losses(x, y):
        z = trunk(x)
        return [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(heads)], z

    return model, batch, mlp_losses


def _time_cases(steps: int, only: str | None = None) -> dict[str, float]:
    """In the child: median seconds per step for every case."""
    import torch

    import mtlfast
    from mtlfast import methods

    torch.set_num_threads(1)
    out = {}
    for label, name, method_name, mode in CASES:
        if only and only not in label:
            continue
        model, (x, y), losses_of = _model(name)
        method = (methods.FAMO(post_step_losses="next_batch") if method_name == "FAMO"
                  else getattr(methods, method_name)())
        engine = mtlfast.MTLBackward(model.trunk, method, mode=mode, vjp="loop")
        times = []
        for k in range(steps + 3):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            losses, z = losses_of(x, y)
            engine.backward(losses, features=z if mode == "features" else None)
            if k >= 3:
                times.append(time.perf_counter() - start)
        out[label] = statistics.median(times)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--before", required=True, help="the other checkout (its extension built)")
    p.add_argument("--after", default=str(HERE), help="this checkout (default)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per checkout")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case and round")
    p.add_argument("--only", default=None, help="run the cases whose label contains this")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_time_cases(args.steps, args.only)))
        return
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for which in (("before", "after") if r % 2 == 0 else ("after", "before")):
            repo = getattr(args, which)
            env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
            res = subprocess.run([sys.executable, __file__, "--before", args.before, "--child",
                                  "--steps", str(args.steps),
                                  *(["--only", args.only] if args.only else [])], env=env, cwd=repo,
                                 capture_output=True, text=True, check=True)
            runs[which].append(json.loads(res.stdout.strip().splitlines()[-1]))
    print("| case | before (ms) | after (ms) | after / before |")
    print("|---|---:|---:|---:|")
    for label, *_ in CASES:
        if args.only and args.only not in label:
            continue
        b = statistics.median(r[label] for r in runs["before"]) * 1e3
        a = statistics.median(r[label] for r in runs["after"]) * 1e3
        print(f"| {label} | {b:.2f} | {a:.2f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
