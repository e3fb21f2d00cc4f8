"""Methods by name: ``mtlfast.methods.get("upgrad", **kwargs)`` and ``available()``.

Names are the class names, case-insensitive, with ``-``, ``_`` and spaces ignored
(``"IMTL-G"``, ``"nash_mtl"``, ``"aligned-mtl"``), plus LibMTL's ``"ls"`` / ``"ew"`` for linear
scalarization (``Sum``).
"""

from __future__ import annotations

import inspect

from . import base

__all__ = ["available", "get"]

_ALIASES = {"ls": "sum", "ew": "sum"}


def _classes() -> dict[str, type[base.Method]]:
    from .. import methods

    abstract = {base.Method, base.GramMethod, base.JacobianMethod, base.LossMethod}
    return {name.lower(): cls for name in methods.__all__
            if isinstance(cls := getattr(methods, name), type) and issubclass(cls, base.Method)
            and cls not in abstract}


def _key(name: str) -> str:
    key = "".join(c for c in name.lower() if c not in "-_ ")
    return _ALIASES.get(key, key)


def available() -> list[str]:
    """The names ``get`` accepts (lowercase class names), sorted."""
    return sorted(_classes())


def get(name: str, num_tasks: int | None = None, **kwargs: object) -> base.Method:
    """The method called ``name`` with ``kwargs`` (paper defaults otherwise).

    ``num_tasks`` is passed to the methods whose constructor needs T (UW's log-variances) and
    ignored by the others.
    """
    if not isinstance(name, str):
        raise TypeError(f"method name must be a str, got {type(name).__name__}")
    classes = _classes()
    cls = classes.get(_key(name))
    if cls is None:
        raise ValueError(f"method must be one of {sorted(classes)}, got {name!r}")
    if "num_tasks" in inspect.signature(cls).parameters and "num_tasks" not in kwargs:
        if num_tasks is None:
            raise ValueError(f"{cls.__name__} needs the number of tasks: "
                             f"mtlfast.methods.get({name!r}, num_tasks=T)")
        kwargs["num_tasks"] = num_tasks
    return cls(**kwargs)
