"""``python -m mtlfast {info, demo, bench}``."""

from __future__ import annotations

import argparse
import json


def _cmd_info(args: argparse.Namespace) -> int:
    from . import info

    facts = info()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args)
    return 0


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from .bench import add_arguments

    add_arguments(p)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="what this installation built and can run")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_cmd_info)
    from .demo import add_arguments as add_demo_arguments

    p = sub.add_parser("demo", help="multi-task training demo on real bundled data")
    add_demo_arguments(p)
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("bench", help="throughput benchmarks against torchjd and the usual loops")
    p.set_defaults(func=_cmd_bench)
    _bench_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
