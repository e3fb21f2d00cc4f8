"""``combine(w, G) = scale * w^T G``: the combined update, written straight into a buffer."""

from __future__ import annotations

import torch

from .. import _ext

__all__ = ["combine", "combine_reference"]


def _check(
    w: torch.Tensor, G: torch.Tensor, out: torch.Tensor | None, scale: float | torch.Tensor
) -> None:
    for name, t in (("w", w), ("G", G)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"combine: {name} must be a torch.Tensor, got {type(t).__name__}")
    if G.dim() != 2:
        raise ValueError(f"combine: G must be 2-D (T, P), got shape {tuple(G.shape)}")
    if w.dim() != 1 or w.shape[0] != G.shape[0]:
        raise ValueError(f"combine: w must be 1-D of length T={G.shape[0]}, got {tuple(w.shape)}")
    if out is not None:
        if out.dim() != 1 or out.shape[0] != G.shape[1]:
            raise ValueError(
                f"combine: out must be 1-D of length P={G.shape[1]}, got {tuple(out.shape)}"
            )
        if out.device != G.device:
            raise ValueError(f"combine: out is on {out.device}, G on {G.device}")
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(
                f"combine: a tensor scale must be one floating-point element, got "
                f"{tuple(scale.shape)} {scale.dtype}"
            )
    elif not isinstance(scale, (int, float)):
        raise TypeError(f"combine: scale must be a float or a tensor, got {type(scale).__name__}")


def combine_reference(
    w: torch.Tensor,
    G: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    accumulate: bool = False,
    scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """The spec: ``(w @ G) * scale`` in float32 (float64 for float64), cast to ``out``'s dtype."""
    _check(w, G, out, scale)
    acc = torch.float64 if G.dtype == torch.float64 else torch.float32
    r = w.to(acc) @ G.to(acc)
    r = r * (scale.to(r.device, acc).reshape(()) if isinstance(scale, torch.Tensor) else scale)
    if out is None:
        return r.to(G.dtype)
    if accumulate:
        out.add_(r.to(out.dtype))
    else:
        out.copy_(r)
    return out


def combine(
    w: torch.Tensor,
    G: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    accumulate: bool = False,
    scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """``out = scale * (w @ G)`` (``out += ...`` with ``accumulate``) for G ``(T, P)``, w ``(T,)``.

    ``out`` (1-D, length P, G's dtype) is typically the flat ``.grad`` buffer of the shared
    parameters. Returns ``out`` (a new tensor when ``out`` is None). ``scale`` is a Python
    float or a one-element tensor (e.g. Nash-MTL's clip factor or GradScaler's inverse scale);
    a CUDA tensor scale is read by the kernel on the device, so no host sync happens.
    """
    _check(w, G, out, scale)
    kernel = (G.device.type == "cpu" and _ext.has_cpu_kernels()) or (
        G.device.type == "cuda" and _ext.has_cuda_kernels()
    )
    usable = (
        kernel
        and (out is None or (out.is_contiguous() and out.dtype == G.dtype))
        and (G.device.type == "cuda" or G.dtype in (torch.float32, torch.float64))
    )
    if not usable:
        return combine_reference(w, G, out, accumulate=accumulate, scale=scale)
    if out is None:
        out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)
        accumulate = False
    if isinstance(scale, torch.Tensor):
        torch.ops.mtlfast.combine_(w.detach(), G.detach(), out, accumulate, 1.0, scale.detach())
    else:
        torch.ops.mtlfast.combine_(w.detach(), G.detach(), out, accumulate, float(scale))
    return out
