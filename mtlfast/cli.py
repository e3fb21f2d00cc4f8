"""``python -m mtlfast {info, demo, bench}``."""

from __future__ import annotations

import argparse
import json
import sys


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


def _not_built(name: str):
    def run(args: argparse.Namespace) -> int:
        print(f"mtlfast {name}: not built yet in this version", file=sys.stderr)
        return 2

    return run


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
    sub.add_parser("bench", help="throughput benchmarks").set_defaults(func=_not_built("bench"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
