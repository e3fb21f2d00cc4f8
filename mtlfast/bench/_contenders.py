"""Optional contenders: torchjd, looked up at run time, so a suite reports it as unavailable
when it is not installed instead of failing."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["optional", "torchjd_aggregation", "torchjd_autojac"]


def optional(module: str) -> tuple[ModuleType | None, str]:
    """``(module, "")`` or ``(None, why it could not be imported)``."""
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # ImportError, or a broken optional dependency
        return None, f"{module} not importable ({type(exc).__name__}: {exc})"


def torchjd_aggregation() -> tuple[ModuleType | None, str]:
    mod, why = optional("torchjd.aggregation")
    return mod, why and "torchjd not installed"


def torchjd_autojac() -> tuple[ModuleType | None, str]:
    mod, why = optional("torchjd.autojac")
    return mod, why and "torchjd not installed"
