"""Input checks shared by the public ops: each raises TypeError/ValueError naming the op, the
argument, what was expected and what came, before any kernel reads memory."""

from __future__ import annotations

import torch

__all__ = ["gram_batch", "same_device", "tensor", "trailing_batch"]


def tensor(op: str, name: str, t: object, *, floating: bool = False,
           dtypes: tuple[torch.dtype, ...] | None = None, dim: int | None = None,
           min_dim: int | None = None) -> torch.Tensor:
    """``t`` is a tensor with the given dtype class and rank; returns it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} must be {names}, got {t.dtype} (convert it with .to())")
    if floating and not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {t.dtype} "
                        "(convert it with .to(torch.float32) or .double())")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dims, "
                         f"got shape {tuple(t.shape)}")
    return t


def gram_batch(op: str, name: str, K: object,
               dtypes: tuple[torch.dtype, ...] | None = None) -> int:
    """``K`` is a floating ``(..., T, T)`` batch with ``T > 0``; returns ``T``."""
    tensor(op, name, K, floating=True, dtypes=dtypes, min_dim=2)
    if K.shape[-1] != K.shape[-2] or K.shape[-1] == 0:
        raise ValueError(f"{op}: {name} must have shape (..., T, T) with T > 0, "
                         f"got {tuple(K.shape)}")
    return K.shape[-1]


def trailing_batch(op: str, name: str, t: torch.Tensor, batch: torch.Size,
                   trailing: tuple[int, ...], like: str = "K") -> None:
    """``t.shape == batch + trailing`` (the batch dims of ``like`` and the op's own dims)."""
    expected = (*batch, *trailing)
    if tuple(t.shape) != expected:
        raise ValueError(f"{op}: {name} must have shape {expected} ({like}'s batch dims "
                         f"{tuple(batch)} then {trailing}), got {tuple(t.shape)}")


def same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Every given tensor lives on the device of the first one."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on "
                             f"{first.device}; move them to one device")
