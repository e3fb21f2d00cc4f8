"""Per-task held-out metrics and step time of several methods on the bundled data sets.

    python benchmarks/demo_methods.py --data digits --methods ls pcgrad upgrad nashmtl famo \
        --seeds 0 1 2 --out benchmarks/results/demo_digits.json

Every run trains the demo's model (``mtlfast.demo.train``) from the same seed; "ls" is linear
scalarization (``sum(L).backward()``), every other name a ``mtlfast.methods`` class run
through ``mtlfast.backward`` (``--way slow``: the per-task loop of ``mtlfast.baselines``;
``--heads loop``: a Python loop of ``nn.Linear`` heads instead of ``FusedHeads``, same weights).
Delta_m% is against single-task models trained with the same recipe and seed. Writes the raw
runs as JSON and prints a markdown table (mean +- std over seeds). ``--arch mmoe|ple`` trains
the demo's expert models instead of hard parameter sharing (``mtlfast.demo.make_model``).

    python benchmarks/demo_methods.py --table run1.json run2.json ...

prints the table of saved runs instead (several files: their records together).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch

from mtlfast import data as datasets
from mtlfast import demo
from mtlfast.metrics import delta_m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=sorted(datasets.LOADERS), default="digits")
    p.add_argument("--size", choices=("tiny", "small", "default"), default="default")
    p.add_argument("--methods", nargs="+", default=["ls", "pcgrad", "upgrad", "nashmtl", "famo"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--way", choices=("mtlfast", "slow"), default="mtlfast")
    p.add_argument("--heads", choices=("fused", "loop"), default="fused")
    p.add_argument("--arch", choices=demo.ARCHS, default="hps",
                   help="the model (mtlfast.demo.make_model); --heads loop: its loop definition")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="JSON file for the raw runs (required unless --table)")
    p.add_argument("--table", nargs="+", metavar="JSON",
                   help="print the markdown table of saved runs and exit")
    args = p.parse_args(argv)
    if args.table:
        saved = [json.loads(pathlib.Path(f).read_text()) for f in args.table]
        records = [r for run in saved for r in run["records"]]
        tasks = list(records[0]["test"])
        regression = saved[0]["args"]["data"] == "qm9"
        print(markdown(records, tasks, ".4g" if regression else ".4f"))
        return 0
    if args.out is None:
        p.error("--out is required (or --table)")
    torch.set_num_threads(args.threads)
    epochs, batch_size, lr = demo.DEFAULTS[args.data]
    epochs = args.epochs or epochs
    data = datasets.load(args.data, **demo.SIZES[args.data][args.size])
    higher = {t.name: t.higher_is_better for t in data.tasks}
    common = dict(epochs=epochs, batch_size=batch_size, lr=lr, device=args.device,
                  progress=False, fused_heads=args.heads == "fused")
    records = []
    for seed in args.seeds:
        baseline = demo.single_task_baselines(data, args.size, seed=seed, **common)
        for name in args.methods:
            start = time.perf_counter()
            if name == "ls":
                run = demo.train(data, "ls", demo.ls_step, seed=seed, arch=args.arch, **common)
            else:
                torch.manual_seed(seed)  # a randomized method draws the run's seed
                method = demo.resolve_method(name, len(data.tasks))
                step = (demo.engine_step if args.way == "mtlfast" else demo.slow_step)(method)
                run = demo.train(data, name, step, seed=seed, method=method, arch=args.arch,
                                 **common)
            records.append({"method": name, "arch": args.arch, "seed": seed, "test": run.test,
                            "single_task": baseline,
                            "delta_m": delta_m(run.test, baseline, higher),
                            "ms_per_step": 1000 * run.train_seconds / run.steps,
                            "wall_s": time.perf_counter() - start})
            print(f"{name:>8} seed {seed}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in run.test.items())
                + f", dm {records[-1]['delta_m']:+.2f}%, {records[-1]['ms_per_step']:.1f} ms/step",
                file=sys.stderr, flush=True)
            out = pathlib.Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"args": vars(args), "epochs": epochs,
                                       "batch_size": batch_size, "lr": lr,
                                       "records": records}, indent=1))
    print(markdown(records, [t.name for t in data.tasks]))
    return 0


def _mean_std(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    spread = format(statistics.stdev(values), fmt.lstrip("+"))
    return f"{format(statistics.mean(values), fmt)} ± {spread}"


def _label(record: dict) -> str:
    """The table row of a run: the method, after the model when it is not hps."""
    arch = record.get("arch", "hps")
    return record["method"] if arch == "hps" else f"{arch} {record['method']}"


def markdown(records: list[dict], tasks: list[str], fmt: str = ".4f") -> str:
    """Mean ± std over seeds per model and method: each task's metric (``fmt``), Delta_m%, ms
    per step."""
    labels = list(dict.fromkeys(_label(r) for r in records))
    head = "| method | " + " | ".join(tasks) + " | Δm% | ms/step |"
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    stl = [r for r in records if _label(r) == labels[0]]
    lines.append("| single-task | " + " | ".join(
        _mean_std([r["single_task"][t] for r in stl], fmt) for t in tasks) + " | 0 | |")
    for m in labels:
        rs = [r for r in records if _label(r) == m]
        lines.append(f"| {m} | " + " | ".join(_mean_std([r["test"][t] for r in rs], fmt)
                                              for t in tasks)
                     + f" | {_mean_std([r['delta_m'] for r in rs], '+.2f')}"
                     + f" | {_mean_std([r['ms_per_step'] for r in rs], '.1f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
