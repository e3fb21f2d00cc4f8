"""The report of benchmarks/gpu_check.sh: every step, test run and benchmark in one place.

    python benchmarks/gpu_report.py --out DIR     -> DIR/gpu_report.json, DIR/gpu_report.md

Reads what the steps left in DIR: ``steps.tsv`` (step, exit status, seconds), the JUnit XML of
each pytest run (``pytest_*.xml``) and the ``bench.json`` of each ``python -m mtlfast bench``
run (``bench_*/bench.json``). Benchmark times are put next to their memory floor: a case's
``params["bytes"]`` at the copy bandwidth measured by the ``ops`` suite's copy case. A few
records carry a target (``TARGETS``); a record that errored, or an mtlfast kernel that
disagrees with its torch reference, fails the report.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Record = dict[str, Any]

#: (what, applies to a record, the target's text, passes given (record, floor seconds, the
#: records of the same case by contender)); a target no record applies to is "not measured"
Passes = Callable[[Record, float | None, dict[str, Record]], bool]
TARGETS: list[tuple[str, Callable[[Record], bool], str, Passes]]


def _named(r: Record, contender: str, *models: str) -> bool:
    """A record of the step suite's named models (``step_models``), of one contender."""
    return (r["suite"] == "step" and r["contender"] == contender
            and r["params"].get("model") in (models or ("resnet", "dense", "ranking")))


def _ratio_to(other: str, key: str = "median_s") -> Callable[[Record, dict[str, Record]],
                                                              float | None]:
    """This record's ``key`` over the same case's ``other`` contender's."""
    def ratio(r: Record, case: dict[str, Record]) -> float | None:
        o = case.get(other)
        if o is None or not o.get(key) or r.get(key) is None:
            return None
        return r[key] / o[key]
    return ratio


_vs_sum = _ratio_to("sum().backward()")
_peak_vs_sum = _ratio_to("sum().backward()", "peak_bytes")


def _at_most(ratio: float | None, bound: float) -> bool:
    return ratio is not None and ratio <= bound


TARGETS = [
    ("gram+combine within 1.25x of the memory floor",
     lambda r: r["suite"] == "ops" and r["method"] == "gram+combine" and r["reference"]
     and r["params"].get("dtype") == "float32" and r["params"]["P"] >= 10**7,
     "<= 1.25x floor", lambda r, floor, case: floor is not None
     and r["median_s"] <= 1.25 * floor),
    ("projection step within 1.3x of the memory floor",
     lambda r: r["suite"] == "methods" and r["method"] in ("PCGrad", "UPGrad")
     and r["reference"] and r["params"]["P"] >= 10**8,
     "<= 1.3x floor", lambda r, floor, case: floor is not None
     and r["median_s"] <= 1.3 * floor),
    ("PCGrad at least 5x faster than the pairwise loop",
     lambda r: r["suite"] == "methods" and r["contender"] == "pairwise loop"
     and r["params"]["P"] >= 10**8,
     ">= 5x", lambda r, floor, case: r["speedup"] is not None and r["speedup"] >= 5.0),
    ("UPGrad's T=32 solve within 20 us",
     lambda r: r["suite"] == "ops" and r["reference"] and r["method"] == "nnqp x T (UPGrad)"
     and r["params"].get("T") == 32 and r["params"].get("batch") == 1,
     "<= 20 us", lambda r, floor, case: r["median_s"] <= 20e-6),
    ("every other T=32 solve within 100 us",
     lambda r: r["suite"] == "ops" and r["reference"] and r["method"] != "nnqp x T (UPGrad)"
     and r["params"].get("T") == 32 and r["params"].get("batch") == 1,
     "<= 100 us", lambda r, floor, case: r["median_s"] <= 100e-6),
    ("(a) jacobian step at most 0.3x the per-task loop",
     lambda r: _named(r, "per-task loop", "resnet"),
     "loop / jacobian >= 3.33", lambda r, floor, case: r["speedup"] is not None
     and r["speedup"] >= 1 / 0.3),
    ("(c) jacobian step at most 0.2x the per-task loop",
     lambda r: _named(r, "per-task loop", "ranking"),
     "loop / jacobian >= 5", lambda r, floor, case: r["speedup"] is not None
     and r["speedup"] >= 5.0),
    ("at least 1.5x faster than torchjd on every model",
     lambda r: _named(r, "torchjd"),
     "torchjd / jacobian >= 1.5", lambda r, floor, case: r["speedup"] is not None
     and r["speedup"] >= 1.5),
    ("features mode at most 1.2x sum().backward()",
     lambda r: _named(r, "mtlfast features"),
     "features / sum <= 1.2", lambda r, floor, case: _at_most(_vs_sum(r, case), 1.2)),
    ("gramian mode peak memory at most 1.5x sum().backward()'s",
     lambda r: _named(r, "mtlfast gramian"),
     "peak / sum's peak <= 1.5", lambda r, floor, case: _at_most(_peak_vs_sum(r, case), 1.5)),
    ("(c) CUDA-graph replay at least 1.3x faster than the eager step",
     lambda r: _named(r, "mtlfast CUDA graph", "ranking"),
     "jacobian / replay >= 1.3", lambda r, floor, case: r["speedup"] is not None
     and r["speedup"] <= 1 / 1.3),
]


def environment() -> dict[str, Any]:
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "python": sys.version.split()[0]}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton"] = f"unavailable: {exc}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sm_count=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,"
             "power.limit,temperature.gpu", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:
        env["nvidia_smi"] = f"failed: {exc}"
    try:
        from mtlfast import _ext

        env["mtlfast"] = _ext.info()
    except Exception as exc:
        env["mtlfast"] = f"import failed: {exc}"
    return env


def junit_summary(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {"status": "missing"}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"status": f"unreadable: {exc}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    s: dict[str, Any] = {k: sum(int(x.get(k, 0)) for x in suites)
                         for k in ("tests", "failures", "errors", "skipped")}
    s["passed"] = s["tests"] - s["failures"] - s["errors"] - s["skipped"]
    failed = []
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            msg = (bad.get("message") or "")[:300]
            failed.append(f"{case.get('classname')}::{case.get('name')}: {msg}")
    s["failed_tests"] = failed[:100]
    return s


def fmt(x: Any, digits: int = 3) -> str:
    return "" if x is None else (f"{x:.{digits}g}" if isinstance(x, float) else str(x))


def _bench_runs(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("bench_*/bench.json"))]


def _bandwidth(records: list[Record]) -> float | None:
    """Bytes per second of the ops suite's copy case (read + write)."""
    for r in records:
        if r["suite"] == "ops" and r["method"] == "copy" and r["median_s"]:
            return r["params"]["bytes"] / r["median_s"]
    return None


def _label(r: Record) -> str:
    return f"{r['suite']} {r['method']} {r['case']} {r['contender']}"


def write_report(out: Path) -> int:
    steps = []
    if (out / "steps.tsv").exists():
        for line in (out / "steps.tsv").read_text().splitlines():
            name, rc, secs = line.split("\t")
            steps.append({"step": name, "rc": int(rc), "seconds": int(secs)})
    tests = {p.stem: junit_summary(str(p)) for p in sorted(out.glob("pytest_*.xml"))}
    runs = _bench_runs(out)
    records = [r for run in runs for r in run["records"]]
    bw = _bandwidth(records)
    for r in records:
        nbytes = r["params"].get("bytes")
        r["floor_s"] = nbytes / bw if bw and nbytes else None

    checks = [{"check": s["step"], "ok": s["rc"] == 0, "detail": f"rc={s['rc']}, {s['seconds']} s"}
              for s in steps]
    for name, t in tests.items():
        # A run where nothing passed (every test skipped) proves nothing: it fails.
        ok = t.get("status") is None and t["failures"] == t["errors"] == 0 and t["passed"] > 0
        detail = (t.get("status") or f"{t['passed']} passed, {t['failures']} failed, "
                  f"{t['errors']} errors, {t['skipped']} skipped")
        checks.append({"check": name, "ok": ok, "detail": detail})
    cases: dict[tuple[str, str, str], dict[str, Record]] = {}
    for r in records:
        cases.setdefault((r["suite"], r["method"], r["case"]), {})[r["contender"]] = r
    measured: set[str] = set()
    for r in records:
        if r["status"] == "error" or (r["status"] == "differs" and r["suite"] == "ops"):
            checks.append({"check": _label(r), "ok": False,
                           "detail": f"{r['status']}: {r['note']}"})
        if r["median_s"] is None:
            continue
        case = cases[(r["suite"], r["method"], r["case"])]
        for what, applies, target, passes in TARGETS:
            if applies(r):
                measured.add(what)
                ratio = r["median_s"] / r["floor_s"] if r["floor_s"] else None
                detail = (f"{fmt(r['median_s'] * 1e3, 4)} ms, {fmt(ratio)}x floor, "
                          f"x mtlfast {fmt(r['speedup'])}")
                for name, rel in (("x sum().backward()", _vs_sum(r, case)),
                                  ("peak x sum's", _peak_vs_sum(r, case))):
                    if rel is not None and r["suite"] == "step":
                        detail += f", {name} {fmt(rel)}"
                checks.append({"check": f"{what}: {_label(r)}",
                               "ok": passes(r, r["floor_s"], case),
                               "detail": f"{detail} (target {target})"})
    checks += [{"check": what, "ok": False, "detail": f"not measured (target {target})"}
               for what, _, target, _ in TARGETS if what not in measured]
    env = environment()
    report = {"environment": env, "steps": steps, "tests": tests, "checks": checks,
              "bandwidth_bytes_per_s": bw, "bench": runs}
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1, default=str))

    md = ["# mtlfast GPU report", ""]
    md.append(f"- date: {env.get('date')}\n- GPU: {env.get('gpu', 'no GPU')} "
              f"({env.get('nvidia_smi', '')})")
    md.append(f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), Triton "
              f"{env.get('triton')}, Python {env.get('python')}")
    if bw:
        md.append(f"- measured copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)")
    md += ["", "## Pass / fail", "", "| check | ok | detail |", "|---|---|---|"]
    md += [f"| {c['check']} | {'PASS' if c['ok'] else 'FAIL'} | {c['detail']} |" for c in checks]
    for name, t in tests.items():
        if t.get("failed_tests"):
            md += ["", f"### {name} failures", ""] + [f"- `{x}`" for x in t["failed_tests"]]
    md += ["", "## Benchmarks (`python -m mtlfast bench --device cuda`, median of repetitions, "
           "CUDA events)", "",
           "| suite | method | case | contender | status | median ms | x mtlfast | floor ms | "
           "x floor | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ms = None if r["median_s"] is None else r["median_s"] * 1e3
        floor_ms = None if r["floor_s"] is None else r["floor_s"] * 1e3
        ratio = ms / floor_ms if ms and floor_ms else None
        peak = None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**20
        md.append(f"| {r['suite']} | {r['method']} | {r['case']} | {r['contender']} | "
                  f"{r['status']} | {fmt(ms, 4)} | {fmt(r['speedup'])} | {fmt(floor_ms, 4)} | "
                  f"{fmt(ratio)} | {fmt(peak)} |")
    (out / "gpu_report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[: 12 + len(checks)]))
    return 0 if all(c["ok"] for c in checks) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path,
                    default=Path(os.environ.get("MTLFAST_GPU_REPORT") or "gpu-report"),
                    help="the folder gpu_check.sh wrote (default: $MTLFAST_GPU_REPORT, else "
                         "gpu-report; unpack a run's gpu_check.tar.gz into a folder to "
                         "rebuild its report)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return write_report(args.out)


if __name__ == "__main__":
    sys.exit(main())
