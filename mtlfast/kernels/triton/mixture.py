"""Triton kernels of the per-task mixture of experts (``mtlfast.ops.mixture``).

``_mix_kernel`` computes ``out[i, b, :] = sum_j c[i, j, b] * src[j, b, :]`` for strided
operands; it serves the forward (``z[t] = sum_e g[t, :, e] h[e]``: i = task, j = expert) and
the expert gradient (``dh[e] = sum_t g[t, :, e] dz[t]``: i = expert, j = task), with the gate's
strides swapped. Grid: (I, row tiles, column tiles); each program keeps a (BLOCK_B, BLOCK_D)
fp32 accumulator and walks the J mixed rows. ``_gate_grad_kernel`` computes
``dg[t, b, e] = <dz[t, b, :], h[e, b, :]>``: grid (T * E, row tiles), a reduction over D.
Ragged sizes are masked; fp16/bf16 inputs accumulate in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["mixture_backward_triton", "mixture_triton"]


@triton.jit
def _mix_kernel(c_ptr, src_ptr, out_ptr, J, B, D,
                s_ci, s_cj, s_cb, s_sj, s_sb, s_sd, s_oi, s_ob, s_od,
                BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    offs_b = (tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_d = (tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    b_ok = offs_b < B
    d_ok = offs_d < D
    mask = b_ok[:, None] & d_ok[None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for j in range(0, J):
        cj = tl.load(c_ptr + i * s_ci + j * s_cj + offs_b * s_cb, mask=b_ok, other=0.0)
        s = tl.load(src_ptr + j * s_sj + offs_b[:, None] * s_sb + offs_d[None, :] * s_sd,
                    mask=mask, other=0.0)
        acc += cj.to(tl.float32)[:, None] * s.to(tl.float32)
    tl.store(out_ptr + i * s_oi + offs_b[:, None] * s_ob + offs_d[None, :] * s_od,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_grad_kernel(dz_ptr, h_ptr, dg_ptr, E, B, D,
                      s_zt, s_zb, s_zd, s_he, s_hb, s_hd, s_gt, s_gb, s_ge,
                      BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    t = pid // E
    e = pid % E
    offs_b = (tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    b_ok = offs_b < B
    acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = b_ok[:, None] & (offs_d < D)[None, :]
        a = tl.load(dz_ptr + t * s_zt + offs_b[:, None] * s_zb + offs_d[None, :] * s_zd,
                    mask=mask, other=0.0)
        b = tl.load(h_ptr + e * s_he + offs_b[:, None] * s_hb + offs_d[None, :] * s_hd,
                    mask=mask, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    tl.store(dg_ptr + t * s_gt + offs_b * s_gb + e * s_ge, acc.to(dg_ptr.dtype.element_ty),
             mask=b_ok)


BLOCK_B = 32


def _block_d(D: int) -> int:
    return max(16, min(128, triton.next_power_of_2(max(D, 1))))


def _mix(c: torch.Tensor, c_strides: tuple[int, int, int], src: torch.Tensor, I: int,
         ) -> torch.Tensor:
    J, B, D = src.shape
    out = torch.empty(I, B, D, device=src.device, dtype=src.dtype)
    if I == 0 or B == 0 or D == 0:
        return out
    if J == 0:
        return out.zero_()
    bd = _block_d(D)
    grid = (I, triton.cdiv(B, BLOCK_B), triton.cdiv(D, bd))
    _mix_kernel[grid](c, src, out, J, B, D, *c_strides, *src.stride(), *out.stride(),
                      BLOCK_B=BLOCK_B, BLOCK_D=bd)
    return out


def mixture_triton(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``z[t] = sum_e g[t, :, e] h[e]``: g (T, B, E), h (E, B, D) -> z (T, B, D), one launch."""
    return _mix(g, (g.stride(0), g.stride(2), g.stride(1)), h, g.shape[0])


def mixture_backward_triton(dz: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                            need_g: bool = True, need_h: bool = True):
    """``(dg (T, B, E), dh (E, B, D))`` of the mixture; one launch each (None when not needed)."""
    T, B, E = g.shape
    D = h.shape[2]
    dh = _mix(g, (g.stride(2), g.stride(0), g.stride(1)), dz, E) if need_h else None
    dg = None
    if need_g:
        dg = torch.empty(T, B, E, device=g.device, dtype=g.dtype)
        if T * E * B > 0:
            if D == 0:
                dg.zero_()
            else:
                grid = (T * E, triton.cdiv(B, BLOCK_B))
                _gate_grad_kernel[grid](dz, h, dg, E, B, D, *dz.stride(), *h.stride(),
                                        *dg.stride(), BLOCK_B=BLOCK_B, BLOCK_D=_block_d(D))
    return dg, dh
