"""Grouped (block-diagonal) linear layers: T small linear maps evaluated as one operation.

Group ``t`` has a weight ``W_t`` of shape ``(out_t, in_t)``; the weights of all groups live in
one flat buffer ``w``, block after block, each row-major. With ``x`` of shape
``(M, sum in_t)`` (block-diagonal: group t reads its own column slice) or ``(T, M, K)``
(``per_task``: group t reads ``x[t]``), the op computes

    y[:, out_t] = act(x_t @ W_t^T + b_t)        (y is (M, sum out_t), one buffer)

A single group is an ordinary dense ``act(x W^T + b)`` (layer 1 of fused heads).

Dispatch (``_dispatch.backend("grouped_linear", ...)``): a single dense group runs as ``addmm``
+ the activation on every device (cuBLAS / MKL, measured faster than the Triton kernel); several
groups run the Triton grouped kernels on CUDA tensors (or on CPU tensors under
``TRITON_INTERPRET=1`` when ``MTLFAST_HEADS_TRITON=1`` asks for it), otherwise torch: one
``bmm`` (or a broadcast multiply-sum for width-1 groups) when all groups have the same shape,
a loop of ``addmm`` for ragged groups (benchmarks/bench_heads.py measures these choices).

The public ops are ``torch.library.custom_op``s (``mtlfast::grouped_linear``,
``mtlfast::grouped_linear_input_grad``, ``mtlfast::grouped_linear_weight_grad``) with fake
(meta) kernels, autograd and vmap rules, so ``torch.compile`` and ``torch.func`` see through
them. First-order gradients only (the backward ops have no autograd formula of their own).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from ._dispatch import backend

__all__ = [
    "ACTIVATIONS",
    "activation_grad",
    "apply_activation",
    "block_sizes",
    "grouped_linear",
    "grouped_linear_input_grad",
    "grouped_linear_input_grad_reference",
    "grouped_linear_parts",
    "grouped_linear_reference",
    "grouped_linear_weight_grad",
    "grouped_linear_weight_grad_reference",
]

ACTIVATIONS = ("none", "relu", "gelu", "silu")
# Activations whose derivative needs the pre-activation (relu's is read off the output).
_NEEDS_PRE = ("gelu", "silu")


# ----------------------------------------------------------------------------- activations

def apply_activation(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """relu | gelu (exact, erf) | silu | none."""
    if activation == "relu":
        return torch.relu(pre)
    if activation == "gelu":
        return F.gelu(pre)
    if activation == "silu":
        return F.silu(pre)
    return pre


def activation_grad(grad: torch.Tensor, pre: torch.Tensor | None, out: torch.Tensor,
                    activation: str) -> torch.Tensor:
    """``grad * act'(pre)``; relu uses the output (``out > 0``), gelu/silu the pre-activation."""
    if activation == "relu":  # the fused native kernel relu's own backward uses
        return torch.ops.aten.threshold_backward(grad, out, 0)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(pre * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * pre * pre) * (1.0 / math.sqrt(2.0 * math.pi))
        return grad * (cdf + pre * pdf)
    if activation == "silu":
        s = torch.sigmoid(pre)
        return grad * (s * (1.0 + pre * (1.0 - s)))
    return grad


# ----------------------------------------------------------------------------- validation

def _check(x, w, bias, in_widths, out_widths, per_task, activation, name="grouped_linear"):
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: x and w must be torch.Tensor")
    if len(in_widths) == 0 or len(in_widths) != len(out_widths):
        raise ValueError(f"{name}: in_widths and out_widths must be non-empty and of equal "
                         f"length, got {len(in_widths)} and {len(out_widths)}")
    if min(in_widths) < 1 or min(out_widths) < 1:
        raise ValueError(f"{name}: every width must be >= 1, got in={list(in_widths)} "
                         f"out={list(out_widths)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    numel = sum(block_sizes(in_widths, out_widths))
    if w.dim() != 1 or w.numel() != numel:
        raise ValueError(f"{name}: w must be the flat packed weights of {numel} elements, "
                         f"got shape {tuple(w.shape)}")
    if per_task:
        if x.dim() != 3 or x.shape[0] != len(in_widths) or len(set(in_widths)) != 1 \
                or x.shape[2] != in_widths[0]:
            raise ValueError(f"{name}: per_task x must be (T={len(in_widths)}, M, K) with all "
                             f"in_widths == K, got x {tuple(x.shape)}, in_widths {in_widths}")
    elif x.dim() != 2 or x.shape[1] != sum(in_widths):
        raise ValueError(f"{name}: x must be (M, {sum(in_widths)}), got {tuple(x.shape)}")
    for label, t in (("w", w), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: {label} dtype {t.dtype} != x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: {label} is on {t.device}, x on {x.device}")
    if bias is not None and (bias.dim() != 1 or bias.numel() != sum(out_widths)):
        raise ValueError(f"{name}: bias must be ({sum(out_widths)},), got {tuple(bias.shape)}")


def block_sizes(in_widths: Sequence[int], out_widths: Sequence[int]) -> list[int]:
    """Element counts of the packed weight blocks ``W_t`` (out_t x in_t)."""
    return [n * k for n, k in zip(out_widths, in_widths, strict=True)]


def _blocks(w: torch.Tensor, in_widths, out_widths) -> list[torch.Tensor]:
    # (the ATen method: Tensor.split's Python wrapper costs ~2 us a call, on hot eager paths)
    parts = w.split_with_sizes(block_sizes(in_widths, out_widths))
    return [b.view(n, k) for b, n, k in zip(parts, out_widths, in_widths, strict=True)]


def _inputs(x: torch.Tensor, in_widths, per_task: bool) -> list[torch.Tensor]:
    return list(x.unbind(0)) if per_task else list(x.split(list(in_widths), dim=1))


# ----------------------------------------------------------------------------- references

def grouped_linear_reference(x, w, bias, in_widths, out_widths, per_task=False,
                             activation="none") -> torch.Tensor:
    """The spec: a Python loop of ``F.linear`` over groups, then the activation."""
    _check(x, w, bias, in_widths, out_widths, per_task, activation)
    biases = bias.split(list(out_widths)) if bias is not None else [None] * len(out_widths)
    xs, Ws = _inputs(x, in_widths, per_task), _blocks(w, in_widths, out_widths)
    ys = [F.linear(xt, Wt, bt) for xt, Wt, bt in zip(xs, Ws, biases, strict=True)]
    return apply_activation(torch.cat(ys, dim=1), activation)


def grouped_linear_input_grad_reference(gy, w, in_widths, out_widths, per_task=False):
    """The spec of ``d(sum y * gy)/dx`` (no activation): ``gx_t = gy[:, out_t] @ W_t``."""
    parts = [g @ Wt for g, Wt in zip(gy.split(list(out_widths), dim=1),
                                     _blocks(w, in_widths, out_widths), strict=True)]
    return torch.stack(parts) if per_task else torch.cat(parts, dim=1)


def grouped_linear_weight_grad_reference(gy, x, in_widths, out_widths, per_task=False):
    """The spec of the packed weight gradient: ``gW_t = gy[:, out_t]^T @ x_t``."""
    parts = [(g.T @ xt).reshape(-1) for g, xt in
             zip(gy.split(list(out_widths), dim=1), _inputs(x, in_widths, per_task), strict=True)]
    return torch.cat(parts)


# ----------------------------------------------------------------------------- torch (CPU)

def _uniform(in_widths, out_widths) -> bool:
    return len(set(in_widths)) == 1 and len(set(out_widths)) == 1


def _forward_torch(x, w, bias, in_widths, out_widths, per_task, activation):
    T, M = len(in_widths), x.shape[-2]
    if T == 1 and not per_task:
        # addmm + in-place relu measured faster here than torch._addmm_activation (CPU;
        # benchmarks/RESULTS.md, "heads" section)
        W = w.view(out_widths[0], in_widths[0])
        pre = torch.addmm(bias, x, W.t()) if bias is not None else x @ W.t()
        return torch.relu_(pre) if activation == "relu" else apply_activation(pre, activation)
    if _uniform(in_widths, out_widths):
        n, k = out_widths[0], in_widths[0]
        if n == 1 and not per_task:  # T dot products per row: one broadcast multiply-sum
            pre = (x.view(M, T, k) * w.view(T, k)).sum(-1)
            return apply_activation(pre + bias if bias is not None else pre, activation)
        xs = x if per_task else x.view(M, T, k).transpose(0, 1)
        Wt = w.view(T, n, k).transpose(1, 2)
        yt = torch.baddbmm(bias.view(T, 1, n), xs, Wt) if bias is not None else torch.bmm(xs, Wt)
        pre = yt.transpose(0, 1).reshape(M, T * n)
        return apply_activation(pre, activation)
    return grouped_linear_reference(x, w, bias, in_widths, out_widths, per_task, activation)


def _input_grad_torch(gy, w, in_widths, out_widths, per_task):
    T, M = len(in_widths), gy.shape[0]
    if T == 1 and not per_task:
        return gy @ w.view(out_widths[0], in_widths[0])
    if _uniform(in_widths, out_widths):
        n, k = out_widths[0], in_widths[0]
        if n == 1:  # an outer product per group: a broadcast multiply, no GEMM
            gx = gy.view(M, T, 1) * w.view(T, k)
            return gx.transpose(0, 1) if per_task else gx.reshape(M, T * k)
        gx = torch.bmm(gy.view(M, T, n).transpose(0, 1), w.view(T, n, k))  # (T, M, k)
        return gx if per_task else gx.transpose(0, 1).reshape(M, T * k)
    return grouped_linear_input_grad_reference(gy, w, in_widths, out_widths, per_task)


def _weight_grad_torch(gy, x, in_widths, out_widths, per_task):
    T, M = len(in_widths), gy.shape[0]
    if T == 1 and not per_task:
        return (gy.t() @ x).reshape(-1)
    if _uniform(in_widths, out_widths):
        n, k = out_widths[0], in_widths[0]
        xs = x if per_task else x.view(M, T, k).transpose(0, 1)
        return torch.bmm(gy.view(M, T, n).permute(1, 2, 0), xs).reshape(-1)
    return grouped_linear_weight_grad_reference(gy, x, in_widths, out_widths, per_task)


# ----------------------------------------------------------------------------- dispatch

def _interpreter_dtype(t: torch.Tensor) -> torch.dtype:
    # The Triton interpreter's bf16 tl.dot is wrong (DESIGN.md): compute in fp32 there.
    if t.device.type == "cpu" and t.dtype == torch.bfloat16:
        return torch.float32
    return t.dtype


def _triton(t: torch.Tensor, in_widths, per_task) -> bool:
    return backend("grouped_linear", t, dense=_dense(in_widths, per_task)) == "triton"


def _dense(in_widths, per_task) -> bool:
    """A single dense group runs as cuBLAS / MKL GEMMs + a separate activation everywhere:
    measured on an H200 (benchmarks/results/heads_kernels_h200.json), addmm + relu took 0.13 ms
    where the Triton kernel with the fused epilogue took 0.35 ms (1024 x 256 x 6400, fp32).
    The fused epilogue stays in use for grouped first layers (per-task inputs)."""
    return len(in_widths) == 1 and not per_task


def _forward_impl(x, w, bias, in_widths, out_widths, per_task, activation):
    store_pre = activation in _NEEDS_PRE
    if _triton(x, in_widths, per_task):
        from ..kernels.triton import grouped_linear_triton

        cdt = _interpreter_dtype(x)
        y, pre = grouped_linear_triton(
            x.to(cdt), w.to(cdt), bias.to(cdt) if bias is not None else None,
            tuple(in_widths), tuple(out_widths), per_task, activation, store_pre)
        y = y.to(x.dtype)
        pre = pre.to(x.dtype) if store_pre else x.new_empty(0)
        return y, pre
    if store_pre:
        pre = _forward_torch(x, w, bias, in_widths, out_widths, per_task, "none")
        return apply_activation(pre, activation), pre
    return _forward_torch(x, w, bias, in_widths, out_widths, per_task, activation), \
        x.new_empty(0)


def _input_grad_impl(gy, w, in_widths, out_widths, per_task):
    if _triton(gy, in_widths, per_task):
        from ..kernels.triton import grouped_input_grad_triton

        cdt = _interpreter_dtype(gy)
        return grouped_input_grad_triton(gy.to(cdt), w.to(cdt), tuple(in_widths),
                                         tuple(out_widths), per_task).to(gy.dtype)
    return _input_grad_torch(gy, w, in_widths, out_widths, per_task).contiguous()


def _weight_grad_impl(gy, x, in_widths, out_widths, per_task):
    if _triton(gy, in_widths, per_task):
        from ..kernels.triton import grouped_weight_grad_triton

        cdt = _interpreter_dtype(gy)
        return grouped_weight_grad_triton(gy.to(cdt), x.to(cdt), tuple(in_widths),
                                          tuple(out_widths), per_task).to(gy.dtype)
    return _weight_grad_torch(gy, x, in_widths, out_widths, per_task).contiguous()


def cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """``t`` in ``dtype`` (a differentiable cast; None: unchanged). Under ``torch.autocast``
    FusedHeads and the expert blocks compute in its dtype, and the custom ops (this one,
    mixture, the C++ expert kernel) do not cast their arguments themselves."""
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


def _eager(*tensors) -> bool:
    """True for plain eager calls, which skip the custom-op layer: on an H200 its Python
    dispatch cost several times the kernels' GPU time (benchmarks/RESULTS.md, heads). Under
    torch.compile, torch.func transforms (wrapped tensors) and fake tensors the custom ops run,
    with their fake kernels and vmap rules."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is None:
            continue
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
        # is_fake costs microseconds per call; a plain tensor or Parameter (no subclass) that
        # wraps no functional tensor cannot be fake.
        if (type(t) not in _PLAIN or torch._is_functional_tensor(t)) and is_fake(t):
            return False
    return True


_PLAIN = (torch.Tensor, torch.nn.Parameter)


@torch.library.custom_op("mtlfast::grouped_linear", mutates_args=())
def _grouped_linear_op(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                       in_widths: list[int], out_widths: list[int], per_task: bool,
                       activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(x, w, bias, in_widths, out_widths, per_task, activation)


@_grouped_linear_op.register_fake
def _(x, w, bias, in_widths, out_widths, per_task, activation):
    y = x.new_empty(x.shape[-2], sum(out_widths))
    return y, (torch.empty_like(y) if activation in _NEEDS_PRE else x.new_empty(0))


@torch.library.custom_op("mtlfast::grouped_linear_input_grad", mutates_args=())
def _input_grad_op(gy: torch.Tensor, w: torch.Tensor, in_widths: list[int],
                   out_widths: list[int], per_task: bool) -> torch.Tensor:
    return _input_grad_impl(gy, w, in_widths, out_widths, per_task)


@_input_grad_op.register_fake
def _(gy, w, in_widths, out_widths, per_task):
    M = gy.shape[0]
    if per_task:
        return gy.new_empty(len(in_widths), M, in_widths[0])
    return gy.new_empty(M, sum(in_widths))


@torch.library.custom_op("mtlfast::grouped_linear_weight_grad", mutates_args=())
def _weight_grad_op(gy: torch.Tensor, x: torch.Tensor, in_widths: list[int],
                    out_widths: list[int], per_task: bool) -> torch.Tensor:
    return _weight_grad_impl(gy, x, in_widths, out_widths, per_task)


@_weight_grad_op.register_fake
def _(gy, x, in_widths, out_widths, per_task):
    return gy.new_empty(sum(block_sizes(in_widths, out_widths)))


# ----------------------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    x, w, bias, in_widths, out_widths, per_task, activation = inputs
    y, pre = output
    ctx.meta = (list(in_widths), list(out_widths), per_task, activation, bias is not None)
    keep_y = y if activation == "relu" else None
    keep_pre = pre if activation in _NEEDS_PRE else None
    ctx.save_for_backward(x, w, keep_y, keep_pre)


def _backward(ctx, gy, _gpre):
    x, w, y, pre = ctx.saved_tensors
    in_widths, out_widths, per_task, activation, has_bias = ctx.meta
    gx = gw = gb = None
    # First order only: the backward ops carry no autograd formula of their own, and under
    # torch.func.grad their inputs may still track gradients of an outer level.
    with torch.no_grad():
        g = activation_grad(gy, pre, y, activation)
        eager = _eager(g, w, x)
        if ctx.needs_input_grad[0]:
            input_grad = _input_grad_impl if eager else _input_grad_op
            gx = input_grad(g, w, in_widths, out_widths, per_task)
        if ctx.needs_input_grad[1]:
            weight_grad = _weight_grad_impl if eager else _weight_grad_op
            gw = weight_grad(g, x, in_widths, out_widths, per_task)
        if has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
    return gx, gw, gb, None, None, None, None


_grouped_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _GroupedLinearFn(torch.autograd.Function):
    """The same forward/backward as an autograd.Function: torch.func transforms (vjp, grad,
    vmap of a backward) reject a custom op's own autograd formula (no setup_context there),
    but accept this; its vmap rule comes from the custom ops' ``register_vmap`` rules."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, bias, in_widths, out_widths, per_task, activation):
        forward = _forward_impl if _eager(x, w, bias) else _grouped_linear_op
        return forward(x, w, bias, in_widths, out_widths, per_task, activation)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


# ----------------------------------------------------------------------------- vmap

def _vmap_loop(op, info, in_dims, args):
    """Fallback rule: one call per batch element (correct for any batched argument)."""
    def pick(i):
        return [a.select(d, i) if isinstance(d, int) else a
                for a, d in zip(args, in_dims, strict=True)]

    outs = [op(*pick(i)) for i in range(info.batch_size)]
    if isinstance(outs[0], tuple):
        stacked = tuple(torch.stack(o) for o in zip(*outs, strict=True))
        return stacked, tuple(0 for _ in stacked)
    return torch.stack(outs), 0


def _only_first_batched(in_dims) -> bool:
    # (list arguments come with a list of Nones as their in_dim)
    return isinstance(in_dims[0], int) and not any(isinstance(d, int) for d in in_dims[1:])


def _fold_rows(x: torch.Tensor, dim: int, per_task: bool) -> torch.Tensor:
    """(V at ``dim``) x (.., M, K) -> (.., V*M, K): a batch of inputs is just more rows."""
    x = x.movedim(dim, 0)
    if per_task:  # (V, T, M, K) -> (T, V*M, K)
        return x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])
    return x.reshape(-1, x.shape[-1])


@_grouped_linear_op.register_vmap
def _(info, in_dims, x, w, bias, in_widths, out_widths, per_task, activation):
    args = (x, w, bias, in_widths, out_widths, per_task, activation)
    if not _only_first_batched(in_dims):
        return _vmap_loop(_grouped_linear_op, info, in_dims, args)
    V = info.batch_size
    y, pre = _grouped_linear_op(_fold_rows(x, in_dims[0], per_task), *args[1:])
    y = y.view(V, -1, y.shape[-1])
    if pre.numel() == 0:
        return (y, pre), (0, None)
    return (y, pre.view(V, -1, pre.shape[-1])), (0, 0)


@_input_grad_op.register_vmap
def _(info, in_dims, gy, w, in_widths, out_widths, per_task):
    args = (gy, w, in_widths, out_widths, per_task)
    if not _only_first_batched(in_dims):
        return _vmap_loop(_input_grad_op, info, in_dims, args)
    V = info.batch_size
    gx = _input_grad_op(_fold_rows(gy, in_dims[0], False), *args[1:])
    if per_task:  # (T, V*M, K) -> (T, V, M, K)
        return gx.view(gx.shape[0], V, -1, gx.shape[-1]), 1
    return gx.view(V, -1, gx.shape[-1]), 0


@_weight_grad_op.register_vmap
def _(info, in_dims, gy, x, in_widths, out_widths, per_task):
    return _vmap_loop(_weight_grad_op, info, in_dims, (gy, x, in_widths, out_widths, per_task))


# ----------------------------------------------------------------------------- public

def grouped_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                   in_widths: Sequence[int], out_widths: Sequence[int], *,
                   per_task: bool = False, activation: str = "none") -> torch.Tensor:
    """``y[:, out_t] = act(x_t W_t^T + b_t)`` for T groups in one op (see the module docstring).

    Differentiable (first order), compilable, vmappable. Returns ``y`` of shape
    ``(M, sum out_widths)``.
    """
    _check(x, w, bias, in_widths, out_widths, per_task, activation)
    return _GroupedLinearFn.apply(x, w, bias, list(in_widths), list(out_widths), per_task,
                                  activation)[0]


def grouped_linear_input_grad(gy: torch.Tensor, w: torch.Tensor, in_widths: Sequence[int],
                              out_widths: Sequence[int], *, per_task: bool = False
                              ) -> torch.Tensor:
    """``gx_t = gy[:, out_t] @ W_t``: ``(M, sum in)``, or ``(T, M, K)`` when ``per_task``."""
    if gy.dim() != 2 or gy.shape[1] != sum(out_widths):
        raise ValueError(f"grouped_linear_input_grad: gy must be (M, {sum(out_widths)}), "
                         f"got {tuple(gy.shape)}")
    if gy.dtype != w.dtype or gy.device != w.device:
        raise TypeError("grouped_linear_input_grad: gy and w must share dtype and device, got "
                        f"{gy.dtype}/{gy.device} and {w.dtype}/{w.device}")
    input_grad = _input_grad_impl if _eager(gy, w) else _input_grad_op
    return input_grad(gy, w, list(in_widths), list(out_widths), per_task)


def grouped_linear_weight_grad(gy: torch.Tensor, x: torch.Tensor, in_widths: Sequence[int],
                               out_widths: Sequence[int], *, per_task: bool = False
                               ) -> torch.Tensor:
    """Packed ``gW_t = gy[:, out_t]^T @ x_t`` (flat, the layout of ``w``)."""
    if gy.dim() != 2 or gy.shape[1] != sum(out_widths):
        raise ValueError(f"grouped_linear_weight_grad: gy must be (M, {sum(out_widths)}), "
                         f"got {tuple(gy.shape)}")
    weight_grad = _weight_grad_impl if _eager(gy, x) else _weight_grad_op
    return weight_grad(gy, x, list(in_widths), list(out_widths), per_task)


# ----------------------------------------------------------------------------- eager, per group

#: When one ``bmm`` over the groups beats a loop of per-group GEMMs (forward + backward, plain
#: ATen ops under torch's autograd, measured side by side on the CPU): the loop costs ~20 us of
#: op overhead per group, but the CPU's ``bmm`` on the strided (T, M, k) view of x loses to
#: MKL's per-group GEMMs once a group reads more than about 2^15 elements of x (M * k). On a GPU
#: the step is host-bound at these sizes: bmm.
_BMM_MAX_MK = {"cpu": 2**15}
#: Past these ``M * k`` FusedHeads runs whole MLP heads on their own (``_large_groups``): its
#: fused (M, T * k) hidden layer lost 1.1-1.8x to the loop of heads there (fp32 from 2^16; in
#: bf16/fp16, whose small CPU GEMMs cost more, only from 2^18: at 2^16 the fused layer still won
#: 0.7-0.9x; T=2..40, benchmarks/heads_grid.py).
_HEADS_LOOP_MK = {("cpu", torch.float32): 2**15, ("cpu", torch.float64): 2**15,
                  ("cpu", torch.bfloat16): 2**17, ("cpu", torch.float16): 2**17}
_HEADS_LOOP_MIN = min(_HEADS_LOOP_MK.values())
#: Padding ragged groups to the widest one multiplies layer 2's work by ``T * n_max / N`` and
#: adds a copy of the packed weights into the padded layout (and its backward) every step. Pad
#: while the extra multiply-adds ``M * k * (T * n_max - N)`` stay under the budget per group
#: saved; fp32 / fp64 on the CPU also at most 2x (measured: 4-5x padding lost to the loop by
#: 1.3-2x even at B=32, where in bf16, whose small CPU GEMMs cost ~70 us a call, it won by
#: 1.3-1.9x). GPU: launches cost more than FLOPs at these sizes, so only the budget applies.
_PAD_MAX_RATIO = {("cpu", torch.float32): 2.0, ("cpu", torch.float64): 2.0}
_PAD_BUDGET = {"cpu": 2**20, "cuda": 2**26}
#: The copy into the padded layout and its backward (new_zeros, index_copy, index_select for
#: the weights and the bias) cost about as much as one group of the loop: T=2 ragged groups
#: lost 1.0-1.5x padded (fp32 and bf16, B=32..256, benchmarks/heads_grid.py), so padding must
#: save more than that.
_PAD_COPY_GROUPS = 1
#: Width-1 groups in fp16/bf16 on the CPU: the multiply-sum reduces over k, and below ~16
#: elements that inner loop is too short to run fast, so the batched GEMV beat it once there are
#: enough rows (M * T >= 2^13: bf16, 8-40 heads, k=8-16, 0.6-0.9x); at k >= 64, or at fewer
#: rows, the multiply-sum won (bmm 1.0-1.5x). Below 8 groups it was not slower anywhere measured.
_MULSUM_LOWP_MIN_T = 8
_MULSUM_LOWP_MAX_K = 16
_MULSUM_LOWP_MIN_MT = 2**13


def _bmm_ok(x: torch.Tensor, k: int, out_widths) -> bool:
    M = x.shape[0]
    if M * k > _BMM_MAX_MK.get(x.device.type, M * k):
        return False
    return len(out_widths) * max(out_widths) == sum(out_widths) or _pad_ok(x, k, out_widths)


def _pad_ok(x: torch.Tensor, k: int, out_widths, dtype: torch.dtype | None = None) -> bool:
    """Ragged out widths padded to the widest cost less than a GEMM per group: within
    ``_PAD_MAX_RATIO`` and ``_PAD_BUDGET`` (the mlp_heads op's padded form uses it too).
    ``dtype``: the GEMMs' (x's unless the mlp_heads op runs them in fp32)."""
    device = x.device.type
    T, N, n_max = len(out_widths), sum(out_widths), max(out_widths)
    return T * n_max <= _PAD_MAX_RATIO.get((device, dtype or x.dtype), T) * N and \
        x.shape[0] * k * (T * n_max - N) <= _PAD_BUDGET.get(device, 0) * (T - 1 - _PAD_COPY_GROUPS)


def _width_one_mulsum(x: torch.Tensor, T: int, k: int, dtype: torch.dtype | None = None
                      ) -> bool:
    """Width-1 groups of k inputs on the CPU run as a broadcast multiply-sum, not a batched
    GEMV (``_MULSUM_LOWP_*``; the mlp_heads op's ``"dot"`` form follows it too, ``dtype``
    its GEMMs')."""
    return x.device.type == "cpu" and (
        (dtype or x.dtype) in (torch.float32, torch.float64) or T < _MULSUM_LOWP_MIN_T
        or k > _MULSUM_LOWP_MAX_K or x.shape[0] * T < _MULSUM_LOWP_MIN_MT)


def _large_groups(x: torch.Tensor, in_widths, dtype: torch.dtype | None = None) -> bool:
    """Groups past ``_HEADS_LOOP_MK``: FusedHeads then runs each MLP head on its own (layer 1
    too), as the loop of heads would. ``dtype``: the GEMMs' (x's by default)."""
    mk = x.shape[0] * max(in_widths)
    # (the first test alone answers tiny heads, where this runs on every ~0.2 ms step)
    return mk > _HEADS_LOOP_MIN and mk > _HEADS_LOOP_MK.get((x.device.type, dtype or x.dtype),
                                                            math.inf)


@functools.cache
def _pad_positions(out_widths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Where each packed row of the ``(N, k)`` weights (and each bias entry) goes in the padded
    ``(T * n_max, k)`` layout: row ``j`` of group ``t`` to ``t * n_max + j``."""
    n_max = max(out_widths)
    return torch.tensor([t * n_max + j for t, n in enumerate(out_widths) for j in range(n)],
                        device=device)


def _parts_bmm(x, w, bias, k, out_widths) -> list[torch.Tensor]:
    """One ``baddbmm`` of ``(T, M, k)`` x ``(T, k, n_max)`` views, ragged groups zero-padded
    (width-1 groups on the CPU: a multiply-sum)."""
    T, M, n_max = len(out_widths), x.shape[0], max(out_widths)
    if n_max == 1 and _width_one_mulsum(x, T, k):
        # T dot products per row: a broadcast multiply-sum, forward and backward as fast as
        # the CPU's bmm (a batch of GEMVs) or up to 2x faster where this path runs.
        y = (x.reshape(M, T, k) * w.view(T, k)).sum(-1)
        return list((y if bias is None else y + bias).split_with_sizes(out_widths, 1))
    if T * n_max == sum(out_widths):
        W, b = w.view(T, n_max, k), bias
    else:
        # The packed rows copied into zeros: padding rows are exact zeros (an inf weight gives
        # no 0 * inf in the padding), and the backward is one gather (index_select), where a
        # gather forward's backward is an index_add, row by row on the CPU (bf16, 8 ragged
        # heads, B=32: 1.09x -> 1.01x of the hand fusion's step).
        pos = _pad_positions(tuple(out_widths), x.device)
        W = w.new_zeros(T * n_max, k).index_copy(0, pos, w.view(-1, k)).view(T, n_max, k)
        b = None if bias is None else bias.new_zeros(T * n_max).index_copy(0, pos, bias)
    xs, Wt = x.reshape(M, T, k).transpose(0, 1), W.transpose(1, 2)
    y = torch.bmm(xs, Wt) if b is None else torch.baddbmm(b.view(T, 1, n_max), xs, Wt)
    return [p if n == n_max else p[:, :n] for p, n in zip(y.unbind(0), out_widths, strict=True)]


def _parts_loop(x, w, bias, in_widths, out_widths) -> list[torch.Tensor]:
    """One ``F.linear`` per group on splits of x, w and the bias (each split is one autograd
    node, so the backward gathers each gradient with one ``cat``)."""
    biases = bias.split_with_sizes(out_widths) if bias is not None else [None] * len(out_widths)
    return [F.linear(xt, Wt, bt) for xt, Wt, bt in zip(
        x.split_with_sizes(in_widths, 1), _blocks(w, in_widths, out_widths), biases,
        strict=True)]


def grouped_linear_parts(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                         in_widths: Sequence[int], out_widths: Sequence[int]
                         ) -> list[torch.Tensor]:
    """The groups' outputs ``x_t W_t^T + b_t``, a list of ``(M, out_t)`` views of one buffer
    (x is ``(M, sum in_widths)``, block-diagonal; no activation): the heads' second layer.

    Eager calls run as plain ATen ops under torch's own autograd (no Python in the backward, no
    custom-op dispatch): with equal in widths ``k`` and where it is measured faster
    (``_bmm_ok``; ragged out widths only from three groups on, the padding costing about one
    group), one ``baddbmm`` of ``(T, M, k)`` x ``(T, k, n_max)`` views, ragged out widths
    zero-padded to the widest (one ``index_copy`` of the packed weights into zeros), or for
    width-1 groups on the CPU a multiply-sum (fp32/fp64; fp16/bf16 unless 8+ groups of
    k <= 16 over 2^13+ rows); otherwise, unless the Triton grouped kernel serves (GPU), one
    ``F.linear`` per group. torch.compile, torch.func and fake tensors get ``grouped_linear``
    (the custom op) split per group.
    """
    _check(x, w, bias, in_widths, out_widths, False, "none", "grouped_linear_parts")
    return _parts(x, w, bias, in_widths, out_widths, _eager(x, w, bias))


def _parts(x, w, bias, in_widths, out_widths, eager: bool) -> list[torch.Tensor]:
    """``grouped_linear_parts`` on checked arguments; ``eager``: ``_eager(x, w, bias)``."""
    if eager:
        k = in_widths[0]
        if len(set(in_widths)) == 1 and _bmm_ok(x, k, out_widths):
            return _parts_bmm(x, w, bias, k, out_widths)
        if not _triton(x, in_widths, False):
            return _parts_loop(x, w, bias, in_widths, out_widths)
    y = grouped_linear(x, w, bias, in_widths, out_widths)
    return list(y.split(list(out_widths), dim=1))
