"""Where the contenders come from: mtlfast's own pieces, torchjd, and benchmarks/baselines.

Everything here is looked up at run time, so a suite reports a piece that is not installed
(or not built yet) as unavailable instead of failing.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["baselines", "optional", "torchjd_aggregation", "torchjd_autojac"]

_ROOT = Path(__file__).resolve().parents[2]


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


def baselines() -> tuple[ModuleType | None, str]:
    """``benchmarks/baselines`` of the source checkout this mtlfast was imported from."""
    if not (_ROOT / "benchmarks" / "baselines" / "__init__.py").exists():
        return None, "benchmarks/baselines not found (run from a source checkout)"
    if str(_ROOT) not in sys.path:
        sys.path.append(str(_ROOT))
    return optional("benchmarks.baselines")
