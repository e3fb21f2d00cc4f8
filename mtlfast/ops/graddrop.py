"""``graddrop(G, seed)``: GradDrop (Chen et al. 2020, "Just Pick a Sign"), one pass over G.

Per column p of G ``(T, P)``: purity ``P_p = (1 + sum_t G[t,p] / sum_t |G[t,p]|) / 2``, a uniform
``U_p``, and ``out[p] = sum_t G[t,p] [(P_p > U_p and G[t,p] > 0) or (P_p < U_p and G[t,p] < 0)]``.

``U_p`` comes from a counter-based hash of ``(seed, p)`` (Chris Wellons' lowbias32), so the
torch reference below and the CUDA kernel draw the same numbers; both do the same float32
operations in the same order, so their outputs agree bit for bit.

NaN/Inf policy: a column whose ``sum_t |G[t,p]|`` is not finite (a NaN or Inf entry, or an
overflow) gives NaN. An all-zero column gives 0.
"""

from __future__ import annotations

import torch

from .. import _ext

__all__ = ["graddrop", "graddrop_reference", "graddrop_uniform"]

_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """``x * c mod 2^32`` for ``0 <= x < 2^32``, exact in int64 (no product reaches 2^63)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _lowbias32(x):
    """Chris Wellons' lowbias32 hash of 32-bit values (Python ints or int64 tensors)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"graddrop: seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"graddrop: seed must be in [0, 2**63), got {seed}")


def graddrop_uniform(seed: int, P: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The uniforms ``U_p`` in [0, 1) (a 2^-24 grid, exact in float32) for columns 0..P-1."""
    _check_seed(seed)
    key = _lowbias32((seed & _M32) ^ _lowbias32(((seed >> 32) & _M32) ^ 0x9E3779B9))
    p = torch.arange(P, dtype=torch.int64, device=device)
    x = _lowbias32(_lowbias32((p & _M32) ^ key) ^ (p >> 32))
    return (x >> 8).to(torch.float32) * 2.0**-24


def _check(G: torch.Tensor) -> None:
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"graddrop: G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() != 2 or G.shape[0] == 0 or G.shape[1] == 0:
        raise ValueError(f"graddrop: G must be 2-D (T, P) with T, P > 0, got {tuple(G.shape)}")
    if G.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"graddrop: G must be float32/float16/bfloat16, got {G.dtype}")


def graddrop_reference(G: torch.Tensor, seed: int) -> torch.Tensor:
    """The spec, in float32 with sums in row order (what the kernel does), cast to G's dtype."""
    _check(G)
    _check_seed(seed)
    Gf = G.float()
    S = torch.zeros(G.shape[1], dtype=torch.float32, device=G.device)
    A = torch.zeros_like(S)
    for g in Gf:
        S = S + g
        A = A + g.abs()
    purity = 0.5 * (1.0 + S / A)
    U = graddrop_uniform(seed, G.shape[1], G.device)
    keep_pos, keep_neg = purity > U, purity < U
    out = torch.zeros_like(S)
    for g in Gf:
        keep = (keep_pos & (g > 0)) | (keep_neg & (g < 0))
        out = out + torch.where(keep, g, torch.zeros_like(g))
    out = torch.where(torch.isfinite(A), out, torch.full_like(out, float("nan")))
    return out.to(G.dtype)


def graddrop(G: torch.Tensor, seed: int) -> torch.Tensor:
    """GradDrop's combined gradient (length P, G's dtype) for per-task gradients G ``(T, P)``.

    Draw a fresh ``seed`` per step (e.g. from ``torch.randint`` once per step on the host).
    CUDA: one fused kernel. Elsewhere: the torch reference.
    """
    _check(G)
    _check_seed(seed)
    if G.device.type == "cuda" and _ext.has_cuda_kernels():
        return torch.ops.mtlfast.graddrop(G.detach(), seed)
    return graddrop_reference(G.detach(), seed)
