"""Grouped (block-diagonal) GEMMs for fused multi-task heads, with a device-side tile schedule.

One kernel, ``_grouped_mm_kernel``, computes for every group ``g`` (a task)

    C_g (M x N_g) = act(A_g (M x R_g) @ B_g (R_g x N_g) + bias_g)

where each operand is a strided window of one flat buffer described by a per-group metadata
row (sizes, column offsets, strides). Ragged sizes are masked, never padded. The launch grid is
(total N tiles over all groups, M tiles); a program reads its (group, column start) from a tile
table, so tasks of width 1 and width 1000 share one launch. The metadata and tile tables are
built once per (widths, layout, block sizes, device) and cached: no host-to-device copy per call.

The same kernel serves: layer 1 of all heads (one group, bias + activation epilogue), layer 2
(block-diagonal), per-task inputs (groups read ``x[t]``), the input gradient (transposed
blocks), and the per-task feature Jacobian (groups write ``out[t]``). ``_grouped_wgrad_kernel``
computes the per-task weight gradients ``X_g^T Y_g`` (a reduction over rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "grouped_input_grad_triton",
    "grouped_linear_triton",
    "grouped_weight_grad_triton",
]


@triton.jit
def _grouped_mm_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr, pre_ptr, meta_ptr, tiles_ptr,
    M, stride_am, stride_ag, stride_cm, stride_cg,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_m = tl.program_id(1)
    g = tl.load(tiles_ptr + 2 * tile)
    n_start = tl.load(tiles_ptr + 2 * tile + 1)
    row = meta_ptr + g * 8  # R, N, a_col, b_off, b_stride_r, b_stride_n, c_col, bias_off
    R = tl.load(row + 0)
    N = tl.load(row + 1)
    a_col = tl.load(row + 2)
    b_off = tl.load(row + 3)
    b_sr = tl.load(row + 4)
    b_sn = tl.load(row + 5)
    c_col = tl.load(row + 6)
    bias_off = tl.load(row + 7)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_base = a_ptr + g * stride_ag + a_col
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < R
        a = tl.load(a_base + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_off + offs_k[:, None] * b_sr + offs_n[None, :] * b_sn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + bias_off + offs_n, mask=n_ok, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    c_offs = g * stride_cg + c_col + offs_m[:, None] * stride_cm + offs_n[None, :]
    c_mask = m_ok[:, None] & n_ok[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + c_offs, acc.to(pre_ptr.dtype.element_ty), mask=c_mask)
    if ACT == "relu":
        acc = tl.maximum(acc, 0.0)
    elif ACT == "gelu":
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    elif ACT == "silu":
        acc = acc * tl.sigmoid(acc)
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _grouped_wgrad_kernel(
    x_ptr, y_ptr, out_ptr, meta_ptr, tiles_ptr,
    M, stride_xm, stride_xg, stride_ym, stride_yg,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):
    tile = tl.program_id(0)
    g = tl.load(tiles_ptr + 3 * tile)
    p_start = tl.load(tiles_ptr + 3 * tile + 1)
    q_start = tl.load(tiles_ptr + 3 * tile + 2)
    row = meta_ptr + g * 5  # P, Q, x_col, y_col, out_off
    P = tl.load(row + 0)
    Q = tl.load(row + 1)
    x_col = tl.load(row + 2)
    y_col = tl.load(row + 3)
    out_off = tl.load(row + 4)

    offs_p = p_start + tl.arange(0, BLOCK_P)
    offs_q = q_start + tl.arange(0, BLOCK_Q)
    p_ok = offs_p < P
    q_ok = offs_q < Q
    x_base = x_ptr + g * stride_xg + x_col
    y_base = y_ptr + g * stride_yg + y_col
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = offs_m < M
        xt = tl.load(x_base + offs_m[None, :] * stride_xm + offs_p[:, None],
                     mask=p_ok[:, None] & m_ok[None, :], other=0.0)
        y = tl.load(y_base + offs_m[:, None] * stride_ym + offs_q[None, :],
                    mask=m_ok[:, None] & q_ok[None, :], other=0.0)
        acc = tl.dot(xt, y, acc, input_precision=PRECISION)
    tl.store(out_ptr + out_off + offs_p[:, None] * Q + offs_q[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


# ----------------------------------------------------------------------------- schedules

_SCHEDULES: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}


def _offsets(widths: tuple[int, ...]) -> list[int]:
    out, acc = [], 0
    for w in widths:
        out.append(acc)
        acc += w
    return out


def _block(width: int, cap: int) -> int:
    """Smallest power of two >= width, within [16, cap] (tl.dot needs >= 16)."""
    return max(16, min(cap, triton.next_power_of_2(max(width, 1))))


def _mm_schedule(kind: str, in_widths: tuple[int, ...], out_widths: tuple[int, ...],
                 per_task: bool, block_n: int, device: torch.device):
    """Metadata rows + tile table for ``_grouped_mm_kernel``, cached per key.

    kind "forward": C[:, out_t] = A_t @ W_t^T with W_t (out_t, in_t) packed row-major;
    A_t = x[:, in_t] (block-diagonal) or x[t] (per_task).
    kind "input_grad": C_t = gy[:, out_t] @ W_t, written to gx[:, in_t] or gx[t] (per_task).
    """
    key = (kind, in_widths, out_widths, per_task, block_n, str(device))
    hit = _SCHEDULES.get(key)
    if hit is not None:
        return hit
    in_off, out_off = _offsets(in_widths), _offsets(out_widths)
    w_off = _offsets(tuple(n * k for n, k in zip(out_widths, in_widths, strict=True)))
    rows, tiles = [], []
    for g, (k, n) in enumerate(zip(in_widths, out_widths, strict=True)):
        if kind == "forward":
            x_col = 0 if per_task else in_off[g]
            rows.append([k, n, x_col, w_off[g], 1, k, out_off[g], out_off[g]])
            n_cols = n
        else:
            c_col = 0 if per_task else in_off[g]
            rows.append([n, k, out_off[g], w_off[g], k, 1, c_col, 0])
            n_cols = k
        tiles += [[g, s] for s in range(0, n_cols, block_n)]
    meta = torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1)
    tile_t = torch.tensor(tiles, dtype=torch.int64, device=device).reshape(-1)
    hit = (meta, tile_t, len(tiles))
    _SCHEDULES[key] = hit
    return hit


def _wgrad_schedule(in_widths, out_widths, per_task, block_p, block_q, device):
    key = ("wgrad", in_widths, out_widths, per_task, block_p, block_q, str(device))
    hit = _SCHEDULES.get(key)
    if hit is not None:
        return hit
    in_off, out_off = _offsets(in_widths), _offsets(out_widths)
    w_off = _offsets(tuple(n * k for n, k in zip(out_widths, in_widths, strict=True)))
    rows, tiles = [], []
    for g, (k, n) in enumerate(zip(in_widths, out_widths, strict=True)):
        rows.append([n, k, out_off[g], 0 if per_task else in_off[g], w_off[g]])
        tiles += [[g, p, q] for p in range(0, n, block_p) for q in range(0, k, block_q)]
    meta = torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1)
    tile_t = torch.tensor(tiles, dtype=torch.int64, device=device).reshape(-1)
    hit = (meta, tile_t, len(tiles))
    _SCHEDULES[key] = hit
    return hit


def _precision(t: torch.Tensor):
    if t.dtype != torch.float32:
        return None  # half types: the default (full-rate tensor cores)
    if t.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# ----------------------------------------------------------------------------- launchers

BLOCK_M = 64
BLOCK_K = 32


def grouped_linear_triton(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                          in_widths: tuple[int, ...], out_widths: tuple[int, ...],
                          per_task: bool, activation: str, store_pre: bool):
    """``y[:, out_t] = act(x_t @ W_t^T + b_t)`` for all groups in one launch.

    x: (M, sum in_widths), or (T, M, K) when ``per_task``; w: flat packed blocks (out_t, in_t);
    returns (y (M, sum out_widths), pre or None), pre = the values before the activation.
    """
    M = x.shape[-2]
    N = sum(out_widths)
    x = x.contiguous()
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    pre = torch.empty_like(y) if store_pre else None
    block_n = _block(max(out_widths), 64)
    meta, tiles, n_tiles = _mm_schedule("forward", in_widths, out_widths, per_task, block_n,
                                        x.device)
    if M == 0 or n_tiles == 0:
        return y, pre
    grid = (n_tiles, triton.cdiv(M, BLOCK_M))
    _grouped_mm_kernel[grid](
        x, w, bias if bias is not None else y, y, pre if store_pre else y, meta, tiles,
        M, x.stride(-2), x.stride(0) if per_task else 0, y.stride(0), 0,
        HAS_BIAS=bias is not None, ACT=activation, STORE_PRE=store_pre,
        PRECISION=_precision(x), BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=BLOCK_K,
    )
    return y, pre


def grouped_input_grad_triton(gy: torch.Tensor, w: torch.Tensor,
                              in_widths: tuple[int, ...], out_widths: tuple[int, ...],
                              per_task: bool) -> torch.Tensor:
    """``gx[:, in_t] = gy[:, out_t] @ W_t`` (or ``gx[t]`` when ``per_task``): one launch."""
    M = gy.shape[0]
    gy = gy.contiguous()
    if per_task:
        gx = torch.empty(len(in_widths), M, in_widths[0], device=gy.device, dtype=gy.dtype)
    else:
        gx = torch.empty(M, sum(in_widths), device=gy.device, dtype=gy.dtype)
    block_n = _block(max(in_widths), 64)
    meta, tiles, n_tiles = _mm_schedule("input_grad", in_widths, out_widths, per_task,
                                        block_n, gy.device)
    if M == 0 or n_tiles == 0:
        return gx
    grid = (n_tiles, triton.cdiv(M, BLOCK_M))
    _grouped_mm_kernel[grid](
        gy, w, gx, gx, gx, meta, tiles,
        M, gy.stride(0), 0, gx.stride(-2), gx.stride(0) if per_task else 0,
        HAS_BIAS=False, ACT="none", STORE_PRE=False,
        PRECISION=_precision(gy), BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=BLOCK_K,
    )
    return gx


def grouped_weight_grad_triton(gy: torch.Tensor, x: torch.Tensor,
                               in_widths: tuple[int, ...], out_widths: tuple[int, ...],
                               per_task: bool) -> torch.Tensor:
    """Packed ``gW_t = gy[:, out_t]^T @ x_t`` for all groups, in fp32 accumulation, one launch."""
    M = gy.shape[0]
    gy, x = gy.contiguous(), x.contiguous()
    gw = torch.empty(sum(n * k for n, k in zip(out_widths, in_widths, strict=True)),
                     device=gy.device, dtype=gy.dtype)
    block_p = _block(max(out_widths), 64)
    block_q = _block(max(in_widths), 64)
    meta, tiles, n_tiles = _wgrad_schedule(in_widths, out_widths, per_task, block_p, block_q,
                                           gy.device)
    if n_tiles == 0:
        return gw
    if M == 0:
        return gw.zero_()
    _grouped_wgrad_kernel[(n_tiles,)](
        gy, x, gw, meta, tiles,
        M, gy.stride(0), 0, x.stride(-2), x.stride(0) if per_task else 0,
        PRECISION=_precision(gy), BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_M=BLOCK_M,
    )
    return gw
