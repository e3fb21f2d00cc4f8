"""The ``bench`` subcommand: pick the suites, run them with progress, print, save, plot."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import arch_suite, demo_suite, heads_suite, methods_suite, ops_suite, step_suite
from .harness import Case, Config, Record, run_cases
from .report import fmt_time, print_tables, write_json

__all__ = ["SUITES", "add_arguments", "run"]

#: suite name -> the function yielding its cases for a config (tests may add entries)
SUITES: dict[str, Callable[[Config], Iterator[Case]]] = {
    "methods": methods_suite.cases,
    "weights": methods_suite.weights_cases,
    "heads": heads_suite.cases,
    "step": step_suite.cases,
    "ops": ops_suite.cases,
    "demo": demo_suite.cases,
    "arch": arch_suite.cases,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="small sizes and short timing (under 2 minutes on a 2-core CPU)")
    p.add_argument("--sizes", choices=("tiny", "quick", "full"), default=None,
                   help="size profile (default: full, or quick with --quick; tiny is a smoke "
                        "test that times nothing meaningful)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the tensors live (cuda: timed with CUDA events)")
    p.add_argument("--suite", default="all", choices=(*SUITES, "all"),
                   help="which suite to run")
    p.add_argument("--out", default="bench-out", type=Path,
                   help="folder for bench.json and the PNG plots")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch during the run (default 1: steady numbers, also "
                        "on a machine shared with other jobs; every contender gets the same)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def _progress(start: float) -> Callable[[int, int, Case, list[Record]], None]:
    def show(i: int, n: int, case: Case, recs: list[Record]) -> None:
        parts = []
        for r in recs:
            parts.append(f"{r.contender} {fmt_time(r.median_s)}" if r.median_s is not None
                         else f"{r.contender} [{r.status}]")
        print(f"[{case.suite} {i}/{n} {time.perf_counter() - start:5.1f}s] {case.method} "
              f"{case.label}: " + ", ".join(parts), file=sys.stderr, flush=True)

    return show


def _command(args: argparse.Namespace) -> list[str]:
    """The arguments of this run, as a user would type them."""
    argv = ["bench"] + (["--quick"] if args.quick else [])
    argv += ["--sizes", args.sizes] if args.sizes else []
    argv += ["--device", args.device, "--suite", args.suite, "--out", str(args.out)]
    argv += ["--threads", str(args.threads)]
    return argv + (["--no-plots"] if args.no_plots else [])


def run(args: argparse.Namespace) -> int:
    """Run the selected suites; write ``bench.json`` and the plots to ``args.out``."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print("mtlfast bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads < 1:
        print("mtlfast bench: --threads must be at least 1", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads)
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process keeps its setting


def _run(args: argparse.Namespace) -> int:
    sizes = args.sizes or ("quick" if args.quick else "full")
    cfg = Config.for_sizes(sizes, args.device)
    names = list(SUITES) if args.suite == "all" else [args.suite]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records: list[Record] = []
    show = _progress(start)

    def progress(i: int, n: int, case: Case, recs: list[Record]) -> None:
        show(i, n, case, recs)
        # a run stopped from outside (a time limit) keeps the cases it finished
        write_json(args.out / "bench.json", records + recs, cfg.device, sizes, _command(args),
                   time.perf_counter() - start)

    for name in names:
        cases = list(SUITES[name](cfg))
        print(f"suite {name}: {len(cases)} cases on {cfg.device} ({sizes} sizes)",
              file=sys.stderr, flush=True)
        records += run_cases(cases, cfg, progress=progress)
    elapsed = time.perf_counter() - start
    print_tables(records)
    write_json(args.out / "bench.json", records, cfg.device, sizes, _command(args), elapsed)
    written = [] if args.no_plots else _plots(records, args.out, str(cfg.device))
    print(f"\nwrote {args.out / 'bench.json'}" + "".join(f", {p}" for p in written)
          + f" in {elapsed:.0f} s")
    return 0


def _plots(records: list[Record], out: Path, device: str) -> list[Path]:
    try:
        from .plots import plot_all

        return plot_all(records, out, device)
    except ImportError as exc:
        print(f"no plots: {exc} (pip install 'mtlfast[bench]')", file=sys.stderr)
        return []
