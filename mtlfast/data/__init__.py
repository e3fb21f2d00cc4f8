"""Bundled real-data multi-task sets for demos and benchmarks, loaded offline.

- :func:`multi_digits`: scikit-learn's digit scans, two per canvas; 4 classification tasks.
- :func:`spoken_digits`: espeak-ng speech, log-mel features; word / voice / speed.
- :func:`qm9`: 130,831 molecules (qm9pack), Coulomb-matrix features; 11 regression targets.

:func:`load` builds one by its CLI name. Generated sets are cached (see :func:`cache_dir`).
"""

from __future__ import annotations

from typing import Any

from .base import MTLData, Split, Task, cache_dir, split_indices
from .digits import multi_digits
from .qm9 import qm9
from .speech import spoken_digits

LOADERS = {"digits": multi_digits, "speech": spoken_digits, "qm9": qm9}


def load(name: str, **kwargs: Any) -> MTLData:
    """The data set called ``name`` ("digits", "speech" or "qm9"), built with ``kwargs``."""
    if name not in LOADERS:
        raise ValueError(f"data set name must be one of {sorted(LOADERS)}, got {name!r}")
    return LOADERS[name](**kwargs)


__all__ = [
    "LOADERS",
    "MTLData",
    "Split",
    "Task",
    "cache_dir",
    "load",
    "multi_digits",
    "qm9",
    "spoken_digits",
    "split_indices",
]
