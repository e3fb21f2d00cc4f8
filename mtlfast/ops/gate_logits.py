"""The logits of grouped gates, one op: gate g reads its own input ``x[skip + g]`` and owns
``sizes[g]`` logit columns, ``logits[:, cols_g] = x[skip + g] @ W_g^T + b_g`` (PLE's levels
past the first: each task's gate reads that task's representation).

``x`` is ``(skip + G, M, K)`` (the first ``skip`` inputs are read by no gate: PLE's last level
skips the shared one); ``weight`` the flat concatenation of the gates' ``(n_g, K)`` row-major
blocks; ``bias`` ``(N,)`` or None, N = sum of sizes. Returns ``(M, N)``.

Dispatch (``_dispatch.backend("gate_logits", x, eager=...)``): for plain eager fp32/fp64 CPU
calls the C++ kernel (``csrc/cpu/gates.cpp``): one pass over the rows, each row's N * K
multiply-adds against weights in cache, and one backward pass for the input, weight and bias
gradients (forward + backward measured 2.3-3.4x faster than one dense GEMM against the
block-diagonal weight and 5-6x faster than one ``addmm`` per gate, PLE's gates at 2048 rows,
``benchmarks/RESULTS.md``). Otherwise torch's ops: with equal sizes on the CPU one
``baddbmm`` of ``(G, M, K)`` x ``(G, K, n)``, else ``grouped_linear`` per task (Triton on the
GPU). The kernel path's backward takes torch's formula when autograd hands it a batched
gradient (``autograd.grad(..., is_grads_batched=True)``). First-order gradients only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._C._functorch import is_legacy_batchedtensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from . import _validate
from ._dispatch import backend
from .grouped_linear import _eager, grouped_linear

__all__ = ["gate_logits", "gate_logits_reference"]

_OP = "gate_logits"


def _gates(weight: torch.Tensor, bias: torch.Tensor | None, sizes: Sequence[int], K: int):
    """Each gate's ``(n_g, K)`` weight view and ``(n_g,)`` bias view (or None)."""
    ws = [w.view(n, K) for w, n in zip(weight.split([n * K for n in sizes]), sizes,
                                           strict=True)]
    bs = bias.split(list(sizes)) if bias is not None else [None] * len(sizes)
    return ws, bs


def gate_logits_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          sizes: Sequence[int], skip: int = 0) -> torch.Tensor:
    """The spec: one ``F.linear`` per gate on its own input, concatenated."""
    _check(x, weight, bias, sizes, skip)
    ws, bs = _gates(weight, bias, sizes, x.shape[2])
    return torch.cat([F.linear(x[skip + g], w, b)
                      for g, (w, b) in enumerate(zip(ws, bs, strict=True))], dim=1)


def _check(x: object, weight: object, bias: object, sizes: Sequence[int], skip: object) -> None:
    _validate.tensor(_OP, "x", x, floating=True, dim=3)
    _validate.tensor(_OP, "weight", weight, floating=True, dim=1)
    if bias is not None:
        _validate.tensor(_OP, "bias", bias, floating=True, dim=1)
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"{_OP}: sizes must be ints >= 1, one per gate, got {list(sizes)}")
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise ValueError(f"{_OP}: skip must be an int >= 0, got {skip!r}")
    G, N, K = len(sizes), sum(sizes), x.shape[2]  # type: ignore[union-attr]
    if x.shape[0] != skip + G:  # type: ignore[union-attr]
        raise ValueError(f"{_OP}: x must be (skip + G = {skip + G}, M, K) for {G} gates, got "
                         f"{tuple(x.shape)}")  # type: ignore[union-attr]
    if weight.numel() != N * K:  # type: ignore[union-attr]
        raise ValueError(f"{_OP}: weight must hold sum(sizes) x K = {N} x {K} entries, got "
                         f"{weight.numel()}")  # type: ignore[union-attr]
    if bias is not None and bias.numel() != N:  # type: ignore[union-attr]
        raise ValueError(f"{_OP}: bias must hold sum(sizes) = {N} entries, got "
                         f"{bias.numel()}")  # type: ignore[union-attr]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:  # type: ignore[union-attr]
            raise TypeError(f"{_OP}: {name} has dtype {t.dtype} but x has {x.dtype}; "  # type: ignore
                            "cast one of them")
    _validate.same_device(_OP, x=x, weight=weight, bias=bias)  # type: ignore[arg-type]


class _GateLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, sizes, skip):
        ctx.meta = (sizes, skip)
        ctx.save_for_backward(x, weight)
        return torch.ops.mtlfast.gate_logits_cpu(x, weight, bias, sizes, skip)

    @staticmethod
    @once_differentiable
    def backward(ctx, dl):
        sizes, skip = ctx.meta
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if is_legacy_batchedtensor(dl):
            dx, dw, db = _backward_torch(dl, x, weight, sizes, skip)
        else:
            dx, dw, db = torch.ops.mtlfast.gate_logits_backward_cpu(
                dl, x, weight, sizes, skip, need_x, need_w, need_b)
        return (dx if need_x else None), (dw if need_w else None), \
            (db if need_b else None), None, None


def _backward_torch(dl, x, weight, sizes, skip: int):
    """torch's formula, per gate (also for a batched ``dl``): ``dx[skip + g] = dl_g W_g``,
    ``dW_g = dl_g^T x[skip + g]``, ``db = sum over rows of dl``."""
    ws, _ = _gates(weight, None, sizes, x.shape[2])
    dls = dl.split(list(sizes), dim=1)
    dx = torch.cat([x.new_zeros(skip, *x.shape[1:]),
                    torch.stack([d @ w for d, w in zip(dls, ws, strict=True)])])
    dw = torch.cat([(d.t() @ x[skip + g]).reshape(-1) for g, d in enumerate(dls)])
    return dx, dw, dl.sum(0)


def gate_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                sizes: Sequence[int], skip: int = 0) -> torch.Tensor:
    """``(M, sum sizes)``: every grouped gate's logits (module docstring). ValueError /
    TypeError for shapes, dtypes or devices that do not fit."""
    _check(x, weight, bias, sizes, skip)
    return logits(x, weight, bias, [int(n) for n in sizes], skip)


def logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int],
           skip: int) -> torch.Tensor:
    """``gate_logits`` without the checks, for callers that validated their gates once
    (``GateBank``)."""
    if backend(_OP, x, eager=_eager(x, weight, bias)) == "cpu":
        return _GateLogits.apply(x, weight, bias, sizes, skip)
    G, K, xs = len(sizes), x.shape[2], x[skip:]
    if x.device.type == "cpu" and len(set(sizes)) == 1:
        n, M = sizes[0], x.shape[1]
        w = weight.view(G, n, K).transpose(1, 2)
        y = torch.baddbmm(bias.view(G, 1, n), xs, w) if bias is not None else torch.bmm(xs, w)
        return y.transpose(0, 1).reshape(M, G * n)
    return grouped_linear(xs, weight, bias, [K] * G, sizes, per_task=True)
