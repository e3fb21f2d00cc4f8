"""Helpers shared by the catalogue methods: argument checks and the Euclidean projection onto
the probability simplex (batched, on the device, no host read)."""

from __future__ import annotations

import math

import torch

__all__ = ["check_int", "check_real", "project_simplex"]


def check_real(name: str, value: object, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float: TypeError unless a real number (bool excluded), ValueError unless
    finite and within the bounds (``low_open``/``high_open``: the bound itself excluded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    bad = not math.isfinite(v)
    if low is not None:
        bad |= v <= low if low_open else v < low
    if high is not None:
        bad |= v >= high if high_open else v > high
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        rule = " and ".join(s for s in (lo, hi) if s) or "finite"
        raise ValueError(f"{name} must be finite and {rule}, got {value!r}")
    return v


def check_int(name: str, value: object, *, low: int) -> int:
    """``value`` as an int: TypeError unless an int (bool excluded), ValueError below ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row ``(..., T)`` onto ``{x >= 0, sum x = 1}``.

    ``x = max(v - theta, 0)`` with the threshold ``theta = max_k (sum_{j<=k} u_j - 1) / k``
    over ``u``, the entries sorted descending (the sort-based rule of Held et al. 1974 and
    LibMTL's MoDo/SDMGrad projections picks the same ``theta``; Condat 2016 for the max form).
    Without a sort: the partial sum of the ``k`` largest entries at ``k = #{j : v_j >= v_i}``
    is ``sum_j [v_j >= v_i] v_j``, and over ties the maximum is attained at a tie group's end,
    which is where these counts land. O(T^2), branch-free, the same on every device.
    """
    ge = (v.unsqueeze(-2) >= v.unsqueeze(-1)).to(v.dtype)  # [..., i, j] = v_j >= v_i
    top = (ge * v.unsqueeze(-2)).sum(-1)
    theta = ((top - 1) / ge.sum(-1)).amax(-1, keepdim=True)
    return (v - theta).clamp_min(0)
