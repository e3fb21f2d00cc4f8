"""Task-head descriptions and their validation (shared by FusedHeads and fuse_heads)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..ops.grouped_linear import ACTIVATIONS

__all__ = ["HeadSpec", "normalize_activation", "resolve_tasks"]


@dataclass(frozen=True)
class HeadSpec:
    """One task head: ``out_features`` outputs, and an optional hidden width.

    ``hidden=None`` takes the ``hidden`` given to :class:`~mtlfast.FusedHeads`; an int makes
    this head an MLP ``Linear(D, hidden) -> act -> Linear(hidden, out_features)`` of its own
    width. All heads of one FusedHeads are either Linear heads or MLP heads.
    """

    out_features: int
    hidden: int | None = None


def normalize_activation(activation: str | None) -> str:
    act = "none" if activation is None else activation
    if not isinstance(act, str) or act.lower() not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} or None, got {activation!r}")
    return act.lower()


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}")
    return value


def resolve_tasks(tasks, hidden) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...] | None]:
    """``tasks`` (mapping or sequence of (name, width | HeadSpec) pairs) and ``hidden`` (None,
    int, or one int per task) -> (names, output widths, hidden widths or None for Linear)."""
    if isinstance(tasks, Mapping):
        items = list(tasks.items())
    elif isinstance(tasks, Sequence) and not isinstance(tasks, str):
        items = list(tasks)
        if not all(isinstance(i, tuple) and len(i) == 2 for i in items):
            raise TypeError("tasks must be a mapping name -> width/HeadSpec or a sequence of "
                            "(name, width/HeadSpec) pairs")
    else:
        raise TypeError(f"tasks must be a mapping or a sequence of pairs, got "
                        f"{type(tasks).__name__}")
    if not items:
        raise ValueError("tasks must name at least one task, got an empty collection")
    names = [name for name, _ in items]
    for name in names:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"task names must be non-empty strings without '.', got {name!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate task names: {dupes}")
    T = len(items)
    if hidden is None or isinstance(hidden, int):
        default_hidden = [hidden] * T
    elif isinstance(hidden, Sequence) and len(hidden) == T:
        default_hidden = list(hidden)
    else:
        raise ValueError(f"hidden must be None, an int, or one int per task ({T}), got {hidden!r}")
    widths, hiddens = [], []
    for (name, spec), dflt in zip(items, default_hidden, strict=True):
        if isinstance(spec, HeadSpec):
            out, hid = spec.out_features, spec.hidden if spec.hidden is not None else dflt
        else:
            out, hid = spec, dflt
        widths.append(_positive_int(out, f"output width of task {name!r}"))
        hiddens.append(None if hid is None else _positive_int(hid, f"hidden of task {name!r}"))
    if all(h is None for h in hiddens):
        return tuple(names), tuple(widths), None
    if any(h is None for h in hiddens):
        raise ValueError("mixing Linear heads (no hidden) and MLP heads in one FusedHeads is not "
                         "supported: give every task a hidden width, or use two FusedHeads")
    return tuple(names), tuple(widths), tuple(hiddens)
