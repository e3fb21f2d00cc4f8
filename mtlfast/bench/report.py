"""What a run writes: the console tables (median per contender, mtlfast's speedup against
each) and ``bench.json`` (every record plus the machine, the command and the date)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from .harness import Record

__all__ = ["fmt_time", "machine", "print_tables", "write_json"]


def fmt_time(seconds: float | None) -> str:
    """``0.00123 -> "1.23 ms"`` (three significant digits, unit chosen by size)."""
    if seconds is None:
        return "-"
    for unit, scale in (("ns", 1e-9), ("us", 1e-6), ("ms", 1e-3)):
        if float(f"{seconds / scale:.3g}") < 1000:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.3g} s"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from."""
    from .. import info

    facts: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "mtlfast": {k: str(v) for k, v in info().items()},
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    try:
        facts["torchjd"] = importlib.metadata.version("torchjd")
    except importlib.metadata.PackageNotFoundError:
        facts["torchjd"] = None
    return facts


def write_json(path: Path, records: Sequence[Record], device: torch.device, sizes: str,
               argv: Sequence[str], elapsed_s: float) -> dict[str, Any]:
    doc = {
        "command": "python -m mtlfast " + " ".join(argv),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "sizes": sizes,
        "elapsed_s": round(elapsed_s, 1),
        "machine": machine(device),
        "records": [r.as_dict() for r in records],
    }
    path.write_text(json.dumps(doc, indent=1))
    return doc


def _cell(rec: Record) -> str:
    if rec.median_s is None:
        return rec.status
    text = fmt_time(rec.median_s)
    if rec.reference:
        return text
    if rec.speedup is not None:
        text += f" ({rec.speedup:.2g}x)"
    return text + (" floor" if rec.status == "floor" else "")


def print_tables(records: Sequence[Record], out: TextIO = sys.stdout) -> None:
    """One table per suite: a row per (method, case), a column per contender. Cells hold the
    median time and, in parentheses, that time over mtlfast's (how many times faster mtlfast
    is); non-timed contenders show their status, explained under the table."""
    suites: dict[str, list[Record]] = {}
    for r in records:
        suites.setdefault(r.suite, []).append(r)
    for suite, recs in suites.items():
        contenders = list(dict.fromkeys(r.contender for r in recs))
        rows: dict[tuple[str, str], dict[str, Record]] = {}
        for r in recs:
            rows.setdefault((r.method, r.case), {})[r.contender] = r
        header = ["method", "case", *contenders]
        body = [[m, c, *(_cell(row[n]) if n in row else "" for n in contenders)]
                for (m, c), row in rows.items()]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
        print(f"\n== suite {suite}: median per call; (x) = contender time / mtlfast time",
              file=out)
        for line in (header, *body):
            print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip(),
                  file=out)
        notes = {(r.contender, r.status, r.note) for r in recs
                 if r.status not in ("ok", "differs") and r.note}
        for contender, status, note in sorted(notes):
            print(f"  {contender} [{status}]: {note}", file=out)
        for r in recs:
            if r.status == "differs":
                print(f"  {r.contender} [differs] on {r.method} {r.case}: {r.note}", file=out)
