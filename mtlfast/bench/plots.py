"""PNG plots of a run: time vs T and time vs P per suite (one panel per method, log-log),
and mtlfast's speedup over each contender on the headline cases (bars, log scale)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .harness import Record, human

__all__ = ["plot_all"]

_AXIS = {"T": "number of tasks T", "P": "shared parameters P"}


def _pyplot():  # imported late: matplotlib is the ``bench`` extra
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _colors(records: Sequence[Record]) -> dict[str, str]:
    """Stable colours: mtlfast's contenders in warm tones, everyone else in cool ones."""
    warm = ["#d62728", "#ff7f0e", "#e377c2", "#8c564b"]
    cool = ["#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#7f7f7f", "#bcbd22", "#393b79"]
    colors: dict[str, str] = {}
    for name in sorted({r.contender for r in records}):
        pool = warm if name.startswith("mtlfast") else cool
        used = sum(1 for n in colors if n.startswith("mtlfast") == name.startswith("mtlfast"))
        colors[name] = pool[used % len(pool)]
    return colors


def _fixed(records: Sequence[Record], axis: str) -> str:
    """The sizes that stay the same along a sweep, e.g. ``"P = 100k, B = 64"``."""
    held = []
    for key in ("T", "P", "D", "B"):
        values = {r.params.get(key) for r in records}
        if key != axis and len(values) == 1 and None not in values:
            held.append(f"{key} = {human(int(values.pop()))}")
    return ", ".join(held)


def _plain(value: float, _pos: object = None) -> str:
    return f"{value:g}"


def _plain_2_5(value: float, _pos: object = None) -> str:
    """Minor log ticks: label only 2x and 5x a power of ten (enough to read, not crowded)."""
    lead = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:g}" if lead in (2, 5) else ""


def _sweep_figure(records: Sequence[Record], suite: str, axis: str, device: str,
                  colors: dict[str, str], path: Path) -> bool:
    recs = [r for r in records if r.suite == suite and axis in r.sweeps and r.median_s]
    methods = list(dict.fromkeys(r.method for r in recs))
    if not methods:
        return False
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullLocator

    cols = min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 0.6, 3.4 * rows + 0.8),
                             squeeze=False)
    for ax, method in zip(axes.flat, methods, strict=False):
        mine = [r for r in recs if r.method == method]
        untimed = {r.contender: r.status for r in records if r.suite == suite
                   and r.method == method and axis in r.sweeps and r.median_s is None
                   and r.status in ("differs", "unchecked")}
        for contender in dict.fromkeys(r.contender for r in mine):
            pts = sorted((r.params[axis], r.median_s * 1e3) for r in mine
                         if r.contender == contender)
            xs, ys = zip(*pts, strict=True)
            gaps = f" (gaps: {untimed[contender]})" if contender in untimed else ""
            ax.plot(xs, ys, marker="o", label=contender + gaps, color=colors[contender],
                    linewidth=2.2 if contender.startswith("mtlfast") else 1.5)
        for contender, status in untimed.items():
            if contender not in {r.contender for r in mine}:
                ax.plot([], [], " ", label=f"{contender}: {status}, not timed")
        ax.set_xscale("log", base=2 if axis == "T" else 10)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(_plain))  # 0.3, not 3x10^-1
        ax.yaxis.set_minor_formatter(FuncFormatter(_plain_2_5))
        xs_all = sorted({r.params[axis] for r in mine})
        ax.set_xticks(xs_all, [human(x) for x in xs_all])
        ax.xaxis.set_minor_locator(NullLocator())  # the ticks are the measured sizes
        ax.set_title(method, fontsize=11)
        ax.set_xlabel(_AXIS[axis])
        ax.set_ylabel("median time per call (ms)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(methods):]:
        ax.set_visible(False)
    fixed = _fixed(recs, axis)
    fig.suptitle(f"{suite}: time vs {axis}" + (f" at {fixed}" if fixed else "") + f" ({device})",
                 fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _speedup_figure(records: Sequence[Record], device: str, colors: dict[str, str],
                    path: Path) -> bool:
    bars = [r for r in records if r.headline and r.speedup is not None and not r.reference]
    groups = list(dict.fromkeys((r.suite, r.method, r.case) for r in bars))
    if not groups:
        return False
    plt = _pyplot()
    per_group = {key: [r for r in bars if (r.suite, r.method, r.case) == key] for key in groups}
    width = 0.8 / max(len(v) for v in per_group.values())
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) + 4.0), 4.8))
    for g, key in enumerate(groups):
        recs = per_group[key]
        for k, rec in enumerate(recs):
            x = g + width * (k - (len(recs) - 1) / 2)
            ax.bar(x, rec.speedup, width, color=colors[rec.contender], label=rec.contender,
                   hatch="//" if rec.status == "floor" else None, edgecolor="white")
            ax.annotate(f"{rec.speedup:.2g}x", (x, rec.speedup), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7,
                        rotation=90)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), title="contender", title_fontsize=8)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, 0.5), max(high, 2.0) * 2.5)  # room for the labels above the bars
    ax.set_xticks(range(len(groups)),
                  [f"{s}\n{m}\n{c}" for s, m, c in groups], fontsize=8)
    ax.set_ylabel("contender time / mtlfast time\n(> 1: mtlfast is faster)")
    ax.set_title(f"mtlfast speedup, headline cases ({device})\n"
                 "hatched: a cheaper, different update (the floor)", fontsize=10)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_all(records: Sequence[Record], out_dir: Path, device: str) -> list[Path]:
    """Write every plot that has data; return the paths written."""
    colors = _colors(records)
    written = []
    for suite in dict.fromkeys(r.suite for r in records):
        for axis in ("T", "P"):
            path = out_dir / f"{suite}_time_vs_{axis}.png"
            if _sweep_figure(records, suite, axis, device, colors, path):
                written.append(path)
    path = out_dir / "speedup.png"
    if _speedup_figure(records, device, colors, path):
        written.append(path)
    return written
