"""Helpers shared by the catalogue methods: argument checks, the Euclidean projection onto
the probability simplex (batched, on the device, no host read), and MoDo's and SDMGrad's
three-batch Gram layout."""

from __future__ import annotations

import math

import torch

__all__ = ["check_batch_count", "check_batches", "check_int", "check_real", "cross_gram",
           "on_last_batch", "project_simplex"]


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


def check_batches(value: object) -> int:
    """MoDo's and SDMGrad's ``batches``: 1 (one mini-batch per step) or 3 (xi1, xi2, zeta)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"batches must be the int 1 or 3, got {type(value).__name__}")
    if value not in (1, 3):
        raise ValueError(f"batches must be 1 or 3, got {value}")
    return int(value)


def check_batch_count(name: str, num_losses: int, batches: int) -> None:
    """ValueError unless ``num_losses`` splits into ``batches`` equal blocks."""
    if num_losses % batches:
        raise ValueError(
            f"{name}(batches={batches}) takes the losses of {batches} mini-batches stacked "
            f"batch-major ({batches} T of them: all tasks on the first batch, then on the "
            f"second, ...); got {num_losses}, not a multiple of {batches}")


def cross_gram(gram: torch.Tensor, batches: int, name: str) -> torch.Tensor:
    """The float64 matrix MoDo's and SDMGrad's inner problems read: the symmetric part of the
    Gram (``batches = 1``), or (``batches = 3``, a ``(..., 3T, 3T)`` Gram of the losses of the
    mini-batches xi1, xi2, zeta stacked batch-major) its block ``G_xi1 G_xi2^T``, not
    symmetrised (as the papers and LibMTL). The whole Gram is symmetrised first (the block
    ``[:T, T:2T]`` and the transpose of ``[T:2T, :T]`` are the same products, rounded)."""
    check_batch_count(name, gram.shape[-1], batches)
    K = gram.to(torch.float64)
    K = (K + K.transpose(-1, -2)) / 2
    if batches == 1:
        return K
    T = gram.shape[-1] // batches
    return K[..., :T, T:2 * T]


def on_last_batch(w: torch.Tensor, batches: int) -> torch.Tensor:
    """Weights ``(..., T)`` on the last mini-batch's tasks as ``(..., batches T)`` weights on all
    the losses (zeros on the other batches), so that ``w @ G`` is ``w @ G_last``."""
    if batches == 1:
        return w
    zeros = w.new_zeros(*w.shape[:-1], (batches - 1) * w.shape[-1])
    return torch.cat([zeros, w], -1)
