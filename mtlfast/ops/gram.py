"""``gram(G) = G G^T``: the T x T Gram matrix of the per-task gradients (one pass over G)."""

from __future__ import annotations

import torch

from .. import _ext

__all__ = ["gram", "gram_reference"]


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
