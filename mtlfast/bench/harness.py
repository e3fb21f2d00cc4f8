"""The benchmark harness: contenders on one case, checked equal to mtlfast's answer, then timed.

A *case* is one input (sizes, method) and the contenders that compute the same update on it.
The harness first runs every contender once and compares its output with the reference
contender's (mtlfast's) output; a contender whose relative error exceeds the case tolerance
is reported as ``differs`` and never timed. The checked contenders are then timed: warm-up
calls, then the median of repeated calls (``time.perf_counter`` on the CPU, CUDA events on a
GPU, with the device synchronised around each call).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = [
    "Case",
    "human",
    "Config",
    "Contender",
    "Record",
    "Status",
    "flat_output",
    "measure",
    "run_case",
    "run_cases",
]

Output = torch.Tensor | Sequence[torch.Tensor]

#: ok: checked equal and timed; floor: timed, computes a different update by design (e.g.
#: linear scalarization, the cheapest possible step); differs: checked, disagrees, not timed;
#: unchecked: the reference is random at this size, so nothing else could be checked or timed;
#: unavailable: the contender's package or API is missing (or it is skipped at these sizes);
#: error: it raised.
Status = Literal["ok", "floor", "differs", "unchecked", "unavailable", "error"]


@dataclass(frozen=True)
class Config:
    """How hard to measure: sizes profile, device, repetitions and time budget per contender."""

    device: torch.device
    sizes: Literal["tiny", "quick", "full"] = "quick"
    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 20
    budget_s: float = 0.1

    @staticmethod
    def for_sizes(sizes: str, device: str | torch.device) -> Config:
        device = torch.device(device)
        if sizes == "tiny":
            return Config(device, "tiny", warmup=0, min_reps=1, max_reps=1, budget_s=0.0)
        if sizes == "quick":
            return Config(device, "quick", warmup=1, min_reps=3, max_reps=20, budget_s=0.1)
        if sizes == "full":
            return Config(device, "full", warmup=2, min_reps=5, max_reps=100, budget_s=1.0)
        raise ValueError(f"sizes must be 'tiny', 'quick' or 'full', got {sizes!r}")


@dataclass
class Contender:
    """One way of computing the case's update.

    ``run`` is what gets timed; ``check`` (default: ``run``) returns the output compared with
    the reference's ``check``. Suites give a separate ``check`` when the timed call keeps
    state (a fresh instance for the check) or when equality can only be checked on a smaller
    input (random methods checked where they are deterministic, see the methods suite).
    ``expect``, when given, is mtlfast's answer to this contender's own ``check`` (e.g. the
    same random task orders replayed), compared instead of the reference's common answer.
    """

    name: str
    run: Callable[[], Output] | None = None
    check: Callable[[], Output] | None = None
    expect: Callable[[], Output] | None = None
    unavailable: str | None = None
    reference: bool = False
    floor: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        if self.run is None and self.unavailable is None:
            raise ValueError(f"contender {self.name!r}: give run or the reason it is unavailable")


@dataclass
class Case:
    """One input of a suite. ``build`` allocates the inputs and returns the contenders (lazily,
    so a long matrix of cases never holds more than one case's tensors)."""

    suite: str
    method: str
    label: str
    params: dict[str, Any]
    build: Callable[[], list[Contender]]
    sweeps: tuple[str, ...] = ()  # the sweeps ("T", "P") this case is a point of
    headline: bool = False
    rtol: float = 1e-4


@dataclass
class Record:
    """The outcome of one contender on one case (one row of bench.json)."""

    suite: str
    method: str
    case: str
    params: dict[str, Any]
    sweeps: tuple[str, ...]
    headline: bool
    contender: str
    status: Status
    reference: bool = False
    median_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    rel_err: float | None = None
    speedup: float | None = None  # this contender's median / the reference's median
    peak_bytes: int | None = None  # CUDA: memory allocated above the inputs while timed
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["sweeps"] = list(self.sweeps)
        return d


def human(n: int) -> str:
    """``1000 -> "1k"``, ``82_432 -> "82.4k"``, ``2_000_000 -> "2M"``: sizes in labels and ticks."""
    for div, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)


def flat_output(out: Output) -> torch.Tensor:
    """Every tensor of an output, flattened into one float64 CPU vector (for comparison)."""
    if isinstance(out, torch.Tensor):
        out = [out]
    parts = [t.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for t in out]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], cfg: Config) -> list[float]:
    """Seconds per call of ``fn``: ``cfg.warmup`` calls, then at least ``cfg.min_reps`` timed
    calls, more while within ``cfg.budget_s`` (at most ``cfg.max_reps``)."""
    device = cfg.device
    for _ in range(cfg.warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < cfg.max_reps and (
        len(times) < cfg.min_reps or time.perf_counter() - start < cfg.budget_s
    ):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text[:200]


def run_case(case: Case, cfg: Config) -> list[Record]:
    """Check every contender against the reference, then time the ones that agree."""

    def record(c: Contender | str, status: Status, **kw: Any) -> Record:
        name = c if isinstance(c, str) else c.name
        is_ref = False if isinstance(c, str) else c.reference
        note = kw.pop("note", "" if isinstance(c, str) else c.note)
        return Record(case.suite, case.method, case.label, case.params, case.sweeps,
                      case.headline, name, status, reference=is_ref, note=note, **kw)

    try:
        contenders = case.build()
    except Exception as exc:  # the inputs or the reference could not be built at all
        return [record("mtlfast", "error", note=_error_text(exc))]
    refs = [c for c in contenders if c.reference]
    if len(refs) != 1:
        raise ValueError(f"case {case.label}: exactly one reference contender expected")
    ref = refs[0]

    # The answer every other contender is checked against: mtlfast's; while mtlfast's piece
    # is not built, the first available contender's (so the others are still compared and
    # timed, without a speedup).
    anchor = ref if ref.run is not None else next(
        (c for c in contenders if c.run is not None and not c.floor), None)
    records: dict[str, Record] = {}
    timed: list[Contender] = []
    expected: torch.Tensor | None = None
    why_unchecked = "no contender to check against"
    if anchor is not None:
        try:
            anchor_check = anchor.check or anchor.run
            expected = flat_output(anchor_check())  # type: ignore[misc]
            if _rel_err(flat_output(anchor_check()), expected) > case.rtol:  # type: ignore[misc]
                expected, why_unchecked = None, f"{anchor.name}'s answer is random here"
        except Exception as exc:
            records[anchor.name] = record(anchor, "error", note=_error_text(exc))
            expected, why_unchecked = None, f"{anchor.name} failed"

    for c in contenders:
        if c.name in records:
            continue
        if c.run is None:
            records[c.name] = record(c, "unavailable", note=c.unavailable or "")
            continue
        if c.floor or c is anchor:  # the anchor is timed even when its answer is random
            timed.append(c)
            continue
        if expected is None and c.expect is None:
            records[c.name] = record(c, "unchecked", note=why_unchecked)
            continue
        try:
            want = flat_output(c.expect()) if c.expect is not None else expected
            got = flat_output((c.check or c.run)())  # after expect: it may replay its state
        except Exception as exc:
            records[c.name] = record(c, "error", note=_error_text(exc))
            continue
        err = _rel_err(got, want)
        if err > case.rtol:
            records[c.name] = record(c, "differs", rel_err=err,
                                     note=f"rel err {err:.2e} vs {anchor.name} > {case.rtol:.0e}")
            continue
        note = c.note if anchor is ref else f"checked against {anchor.name}; {c.note}".strip("; ")
        records[c.name] = record(c, "ok", rel_err=err, note=note)
        timed.append(c)

    for c in timed:
        on_cuda = cfg.device.type == "cuda"
        if on_cuda:
            torch.cuda.synchronize(cfg.device)
            torch.cuda.reset_peak_memory_stats(cfg.device)
            allocated = torch.cuda.memory_allocated(cfg.device)
        try:
            times = measure(c.run, cfg)  # type: ignore[arg-type]
        except Exception as exc:
            records[c.name] = record(c, "error", note=_error_text(exc))
            continue
        rec = records.get(c.name) or record(c, "floor" if c.floor else "ok")
        if on_cuda:
            rec.peak_bytes = torch.cuda.max_memory_allocated(cfg.device) - allocated
        rec.times_s = times
        rec.median_s = statistics.median(times)
        records[c.name] = rec

    ref_rec = records.get(ref.name)
    base = ref_rec.median_s if ref_rec is not None else None
    if base:
        for rec in records.values():
            if rec.median_s is not None:
                rec.speedup = rec.median_s / base
    return [records[c.name] for c in contenders]


def run_cases(
    cases: Iterable[Case],
    cfg: Config,
    progress: Callable[[int, int, Case, list[Record]], None] | None = None,
) -> Iterator[Record]:
    """Run the cases one after the other, reporting progress after each."""
    cases = list(cases)
    for i, case in enumerate(cases, 1):
        recs = run_case(case, cfg)
        if progress is not None:
            progress(i, len(cases), case, recs)
        yield from recs
