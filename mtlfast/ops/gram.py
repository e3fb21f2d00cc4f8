"""``gram(G) = G G^T``: the T x T Gram matrix of the per-task gradients (one pass over G)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ext

__all__ = ["gram", "gram_multi", "gram_multi_reference", "gram_reference"]


def _check(G: torch.Tensor) -> None:
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"gram: G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() != 2:
        raise ValueError(f"gram: G must be 2-D (T, P), got shape {tuple(G.shape)}")
    if G.shape[0] == 0 or G.shape[1] == 0:
        raise ValueError(
            f"gram: G must have T > 0 tasks and P > 0 parameters, got {tuple(G.shape)}"
        )
    if not G.is_floating_point():
        raise TypeError(f"gram: G must be floating point, got {G.dtype}")


def _out_dtype(G: torch.Tensor) -> torch.dtype:
    return torch.float64 if G.dtype == torch.float64 else torch.float32


def gram_reference(G: torch.Tensor) -> torch.Tensor:
    """The spec: ``G G^T`` in float32 (float64 for float64 input), made exactly symmetric."""
    _check(G)
    Gf = G.to(_out_dtype(G))
    K = Gf @ Gf.T
    return (K + K.T) / 2


def gram(G: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``K = G G^T`` of a ``(T, P)`` matrix, symmetric, float32 (float64 for float64).

    Dispatch: CUDA kernel for CUDA tensors, C++ kernel on CPU (upper triangle only, blocked
    over P), torch reference otherwise (no extension, meta tensors, other devices).
    """
    _check(G)
    if G.device.type == "cpu" and _ext.has_cpu_kernels():
        return torch.ops.mtlfast.gram(G).to(_out_dtype(G))
    if G.device.type == "cuda" and _ext.has_cuda_kernels():
        return torch.ops.mtlfast.gram(G).to(_out_dtype(G))
    return gram_reference(G)


def _check_multi(Gs: Sequence[torch.Tensor]) -> int:
    if isinstance(Gs, torch.Tensor) or not isinstance(Gs, (list, tuple)):
        raise TypeError(f"gram_multi: Gs must be a list of tensors, got {type(Gs).__name__}")
    if len(Gs) == 0:
        raise ValueError("gram_multi: Gs must hold at least one (T, p_i) tensor")
    T = None
    for i, G in enumerate(Gs):
        if not isinstance(G, torch.Tensor):
            raise TypeError(f"gram_multi: Gs[{i}] must be a torch.Tensor, got {type(G).__name__}")
        if G.dim() != 2 or G.shape[0] == 0:
            raise ValueError(f"gram_multi: Gs[{i}] must be 2-D (T, p_i), got {tuple(G.shape)}")
        if not G.is_floating_point():
            raise TypeError(f"gram_multi: Gs[{i}] must be floating point, got {G.dtype}")
        T = G.shape[0] if T is None else T
        if G.shape[0] != T or G.dtype != Gs[0].dtype or G.device != Gs[0].device:
            raise ValueError(
                f"gram_multi: Gs[{i}] is {tuple(G.shape)} {G.dtype} on {G.device}; every tensor "
                f"needs T={T} rows, dtype {Gs[0].dtype} and device {Gs[0].device}"
            )
    return T


def gram_multi_reference(Gs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The spec: the Gram of the column concatenation, ``sum_i G_i G_i^T``."""
    _check_multi(Gs)
    return gram_reference(torch.cat([G.to(_out_dtype(Gs[0])) for G in Gs], dim=1))


def gram_multi(Gs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``K = sum_i G_i G_i^T`` for per-parameter blocks ``G_i`` of shape ``(T, p_i)``.

    Equals ``gram(torch.cat(Gs, dim=1))`` without building the concatenation: on CUDA one
    launch walks a chunk table over all the tensors (apex ``multi_tensor_apply`` style; the
    table is built once per list of shapes). Elsewhere the torch reference.
    """
    T = _check_multi(Gs)
    if Gs[0].device.type == "cuda" and _ext.has_cuda_kernels():
        return torch.ops.mtlfast.gram_multi([G.detach() for G in Gs]).to(_out_dtype(Gs[0]))
    if all(G.shape[1] == 0 for G in Gs):
        return torch.zeros(T, T, dtype=_out_dtype(Gs[0]), device=Gs[0].device)
    return gram_multi_reference(Gs)
