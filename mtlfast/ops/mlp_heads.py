"""MLP heads as one op: ``y_t = W2_t act(W1_t x + b1_t) + b2_t`` for T heads on one shared input
``x`` (every head's first layer in one GEMM, ``h = act(x W1^T + b1)``, ``W1`` the heads'
first-layer weights stacked) or on per-task inputs ``x[t]``; the second layers read from one
flat packed buffer (head t's ``(out_t, hidden_t)`` block after block, FusedHeads' ``weight2``).

Dispatch (``_dispatch.backend("mlp_heads", x, ...)``): plain eager CPU calls run the C++ op
(``csrc/cpu/heads.cpp``, ``torch.ops.mtlfast.mlp_heads``): forward and backward are ONE
autograd node, whose gradients come straight out of the GEMMs. At the sizes of task heads a
step is bound by per-node costs, not FLOPs; the same math as plain ATen ops under torch's
autograd takes a node per op plus the split nodes of the packed parameters, and lost to the
loop of unfused heads at two to four heads (benchmarks/RESULTS.md, FusedHeads grid). Its
second layer (``layer2``) is one GEMM per head (``"groups"``), one batched GEMM over equal
hidden widths with the out widths zero-padded to the widest (``"bmm"``), or for width-1 heads
a multiply-sum (``"dot"``); ``layer2_for`` picks it. For heads whose hidden layers are large
(FusedHeads' ``_large_groups``) ``"heads"`` runs each head's two layers on its own and writes
the gradients into the packed buffers (no concatenation of the weight gradients); it also
takes per-task inputs ``x`` ``(T, M, D)``, head t on ``x[t]`` (MMoE/PLE towers). Elsewhere
(no extension, torch.compile, torch.func, GPU) FusedHeads composes ATen ops itself
(``mtlfast.heads.module``).

On CPUs without a native bf16/fp16 GEMM (``_lowp_gemm_emulated``: torch's mkldnn checks say
no, as on an AVX2-only AMD EPYC), torch runs low-precision GEMMs in a scalar loop, 30-60x an
fp32 GEMM of the same size; the op then runs each of its GEMMs as an fp32 GEMM of the upcast
operands and rounds the result once (``upcast``), which is what a native low-precision GEMM
computes (fp32 accumulation) in another summation order, and the form choice reads the
GEMMs' dtype, fp32 (``gemm_dtype``).

The C++ op is differentiable twice (create_graph recomputes the hidden layer under autograd)
and in forward mode (inputs with tangents take the plain ATen composition); batched backward
gradients (``autograd.grad(..., is_grads_batched=True)``) flow through its formulas.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._dispatch import backend
from .grouped_linear import _blocks, _large_groups, _pad_ok, _width_one_mulsum, apply_activation

__all__ = ["gemm_dtype", "layer2_for", "mlp_heads", "mlp_heads_layer2", "mlp_heads_reference",
           "per_task_per_head", "upcast_gemms"]

#: Ragged out widths (equal hidden widths) are zero-padded into one batched GEMM from this many
#: heads on, where the padding costs less than a GEMM per head (grouped_linear's ``_pad_ok``:
#: its budget bounds the extra multiply-adds; fp32/fp64 also pad at most 2x). Low-precision
#: GEMMs cost ~20 us a call on the CPU (fp32 ~5 us): bf16, 40 ragged heads of 8 hidden, B=32,
#: padded 4x, took 1.64 ms where a GEMM per head took 2.48 ms.
_PAD_MIN_T = 8
#: Per-task inputs take the op's per-head form up to this many heads; beyond, FusedHeads'
#: batched first layer (one bmm over the heads' inputs) wins. Measured side by side (CPU,
#: B=32-1024, hidden 16-64): the per-head form ran 0.5-0.93x the loop of heads up to 8 heads,
#: where the batched path took 1.1-2.1x the loop at 2-4 heads. For low-precision heads of
#: equal widths the batched bmm already won from 4 heads (bf16, 4 heads 64-wide, B=256: 0.62
#: against the per-head form's 0.67).
_PER_TASK_MAX_T = {"ragged": 8, "uniform, low precision": 2}


def mlp_heads_reference(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                        w2: torch.Tensor, b2: torch.Tensor | None, hidden: Sequence[int],
                        outs: Sequence[int], activation: str) -> list[torch.Tensor]:
    """The spec: each head on its own, ``F.linear``, the activation, ``F.linear``; on ``x``
    ``(M, D)``, or head t on ``x[t]`` for per-task inputs ``(T, M, D)``."""
    b1s = b1.split(list(hidden)) if b1 is not None else [None] * len(hidden)
    b2s = b2.split(list(outs)) if b2 is not None else [None] * len(outs)
    xs = x.unbind(0) if x.dim() == 3 else [x] * len(hidden)
    return [F.linear(apply_activation(F.linear(xt, w1t, b1t), activation), w2t, b2t)
            for xt, w1t, b1t, w2t, b2t in zip(xs, w1.split(list(hidden)), b1s,
                                              _blocks(w2, hidden, outs), b2s, strict=True)]


@functools.cache
def _lowp_gemm_emulated() -> frozenset[torch.dtype]:
    """The low-precision dtypes this CPU has no native GEMM for, by torch's own checks (the
    ones its CPU matmul asks before taking oneDNN's bf16 / fp16 kernels)."""
    checks = {torch.bfloat16: "_is_mkldnn_bf16_supported",
              torch.float16: "_is_mkldnn_fp16_supported"}
    try:
        return frozenset(dt for dt, name in checks.items() if not getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):  # a build without the checks: keep torch's GEMMs
        return frozenset()


def upcast_gemms(x: torch.Tensor) -> bool:
    """Whether the op runs ``x``'s GEMMs in fp32 (``x`` bf16/fp16 on a CPU with no native
    GEMM for it)."""
    return x.device.type == "cpu" and x.dtype in _lowp_gemm_emulated()


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the op's GEMMs run in for ``x``: the form choice's cost rules read it."""
    return torch.float32 if upcast_gemms(x) else x.dtype


def layer2_for(x: torch.Tensor, hidden: Sequence[int], outs: Sequence[int]) -> str:
    """The C++ op's second-layer form for these heads (see the module docstring)."""
    T, k, n_max, dtype = len(hidden), hidden[0], max(outs), gemm_dtype(x)
    if any(h != k for h in hidden):
        return "groups"
    if n_max == 1:  # grouped_linear's measured rule for width-1 groups
        return "dot" if _width_one_mulsum(x, T, k, dtype) else "bmm"
    if T * n_max == sum(outs) or (T >= _PAD_MIN_T and _pad_ok(x, k, outs, dtype)):
        return "bmm"
    return "groups"


def mlp_heads_layer2(x: torch.Tensor, hidden: Sequence[int], outs: Sequence[int],
                     per_task: bool = False) -> str | None:
    """The dispatch: the C++ op's form where it serves eager calls with ``x`` (the caller
    checked they are eager): ``"heads"`` (each head's two layers on its own) for large groups
    (``_large_groups`` at the GEMMs' dtype) and for per-task inputs (``x`` ``(T, M, D)``) up
    to ``_PER_TASK_MAX_T`` heads, else ``layer2_for``'s; None where it does not serve
    (FusedHeads composes ATen ops)."""
    if backend("mlp_heads", x, eager=True) != "cpu":
        return None
    if per_task:
        return "heads" if per_task_per_head(x, hidden, outs) else None
    return "heads" if _large_groups(x, hidden, gemm_dtype(x)) else layer2_for(x, hidden, outs)


def per_task_per_head(x: torch.Tensor, hidden: Sequence[int] | None, outs: Sequence[int]
                      ) -> bool:
    """Heads on per-task inputs run one by one (the per-head form of this op, or of
    ``linear_heads``) rather than batched: up to ``_PER_TASK_MAX_T`` heads, and any number
    where ``upcast_gemms`` (the batched path would run the CPU's slow low-precision GEMMs)."""
    if upcast_gemms(x):
        return True
    lowp = x.dtype in (torch.float16, torch.bfloat16)
    ragged = len(set(outs)) > 1 or (hidden is not None and len(set(hidden)) > 1)
    return len(outs) <= _PER_TASK_MAX_T["ragged" if ragged or not lowp
                                        else "uniform, low precision"]


def mlp_heads(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
              b2: torch.Tensor | None, hidden: Sequence[int], outs: Sequence[int],
              activation: str, layer2: str, dropout: float = 0.0) -> list[torch.Tensor]:
    """The heads' outputs ``[(M, out_t)]`` from the C++ op. Arguments as FusedHeads holds
    them, already checked: ``x`` ``(M, D)`` or ``(T, M, D)``, ``w1`` ``(sum hidden, D)``,
    ``w2`` flat packed, ``layer2`` from ``mlp_heads_layer2``; ``dropout``: the probability
    on the hidden layer (0 outside training), drawn as ``F.dropout`` draws it. Low-precision
    GEMMs run in fp32 where ``upcast_gemms``."""
    # (the overload itself: the packet's overload resolution costs ~2 us a call)
    return torch.ops.mtlfast.mlp_heads.default(x, w1, b1, w2, b2, hidden, outs, activation,
                                               layer2, dropout, upcast_gemms(x))
