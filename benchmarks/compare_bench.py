"""Two ``bench.json`` files side by side: mtlfast's median per case, and their ratio.

    python benchmarks/compare_bench.py BEFORE/bench.json AFTER/bench.json [--contender NAME]

Cases are matched on (suite, method, case, contender); the table lists those both runs timed,
then the median and the range of the after/before ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics


def _medians(path: str, contenders: set[str]) -> dict[tuple, float]:
    records = json.load(open(path))["records"]
    return {(r["suite"], r["method"], r["case"], r["contender"]): r["median_s"]
            for r in records
            if r["contender"] in contenders and r.get("median_s") and r["status"] in ("ok",)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", help="bench.json of the old checkout")
    p.add_argument("after", help="bench.json of the new checkout")
    p.add_argument("--contender", action="append", default=None,
                   help="contender(s) to compare (default: every mtlfast contender)")
    args = p.parse_args(argv)
    names = set(args.contender or [])
    before_all = json.load(open(args.before))["records"]
    if not names:
        names = {r["contender"] for r in before_all if r["contender"].startswith("mtlfast")}
    before, after = _medians(args.before, names), _medians(args.after, names)
    common = sorted(set(before) & set(after))
    print("| suite | method | case | contender | before | after | after / before |")
    print("|---|---|---|---|---:|---:|---:|")
    ratios = []
    for key in common:
        b, a = before[key], after[key]
        ratios.append(a / b)
        print(f"| {' | '.join(key)} | {b * 1e3:.3g} ms | {a * 1e3:.3g} ms | {a / b:.2f} |")
    if ratios:
        print(f"\n{len(ratios)} cases: after/before median {statistics.median(ratios):.2f}, "
              f"range {min(ratios):.2f}-{max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
