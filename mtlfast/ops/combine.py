"""``combine(w, G) = scale * w^T G``: the combined update, written straight into a buffer.

Integer ``w``/``G``/``out`` raise TypeError (a truncated update is never what a caller wants;
cast first)."""

from __future__ import annotations

import torch

from . import _validate
from ._dispatch import backend

__all__ = ["combine", "combine_reference"]


def _check(
    w: torch.Tensor, G: torch.Tensor, out: torch.Tensor | None, scale: float | torch.Tensor
) -> None:
    _validate.tensor("combine", "w", w, floating=True)
    _validate.tensor("combine", "G", G, floating=True)
    if G.dim() != 2:
        raise ValueError(f"combine: G must be 2-D (T, P), got shape {tuple(G.shape)}")
    if w.dim() != 1 or w.shape[0] != G.shape[0]:
        raise ValueError(f"combine: w must be 1-D of length T={G.shape[0]}, got {tuple(w.shape)}")
    _validate.same_device("combine", G=G, w=w)
    if out is not None:
        _validate.tensor("combine", "out", out, floating=True)
        if out.dim() != 1 or out.shape[0] != G.shape[1]:
            raise ValueError(
                f"combine: out must be 1-D of length P={G.shape[1]}, got {tuple(out.shape)}"
            )
        _validate.same_device("combine", G=G, out=out)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(
                f"combine: a tensor scale must be one floating-point element, got "
                f"{tuple(scale.shape)} {scale.dtype}"
            )
        if scale.device.type != "cpu":
            _validate.same_device("combine", G=G, scale=scale)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
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
    which = backend("combine", G, out_dtype=G.dtype if out is None else out.dtype,
                    out_contiguous=out is None or out.is_contiguous())
    if which == "reference":
        return combine_reference(w, G, out, accumulate=accumulate, scale=scale)
    if which == "torch":
        return _combine_blas(w, G, out, accumulate, scale)
    if out is None:
        out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)
        accumulate = False
    if isinstance(scale, torch.Tensor):
        torch.ops.mtlfast.combine_(w.detach(), G.detach(), out, accumulate, 1.0, scale.detach())
    else:
        torch.ops.mtlfast.combine_(w.detach(), G.detach(), out, accumulate, float(scale))
    return out


def _combine_blas(w: torch.Tensor, G: torch.Tensor, out: torch.Tensor | None, accumulate: bool,
                  scale: float | torch.Tensor) -> torch.Tensor:
    """``scale * (w @ G)`` by BLAS gemv (``addmv``) in G's dtype; a tensor scale folds into w
    (on the CPU reading it costs no sync)."""
    w = w.detach().to(G.dtype)
    alpha = 1.0
    if isinstance(scale, torch.Tensor):
        w = w * scale.detach().to(G.device, G.dtype).reshape(())
    else:
        alpha = float(scale)
    if out is None:
        return torch.mv(G.detach().t(), w) if alpha == 1.0 else \
            torch.mv(G.detach().t(), w).mul_(alpha)
    return out.addmv_(G.detach().t(), w, beta=1.0 if accumulate else 0.0, alpha=alpha)
