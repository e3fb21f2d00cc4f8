"""The per-task mixture of experts: ``z[t, b] = sum_e g[t, b, e] * h[e, b]``, one op.

``g`` (T, B, E) holds the gate weights of T tasks (or gates) over E experts for every row b;
``h`` (E, B, D) the experts' outputs. Gates that mix a subset of the experts (CGC, PLE) carry
zeros for the others. Returns ``z`` (T, B, D). Any strides are accepted: the expert blocks
of ``mtlfast.arch`` hand ``g`` and ``h`` in as transposed views of ``(B, T, E)`` / ``(B, E, D)``
buffers, and ``z`` comes back as a transposed view of a ``(B, T, D)`` buffer (torch path).

Gradients: ``dg[t, b, e] = <dz[t, b], h[e, b]>`` and ``dh[e, b] = sum_t g[t, b, e] dz[t, b]``.

Dispatch (``_dispatch.backend("mixture", g)``): on the CPU the C++ kernel
(``csrc/cpu/mixture.cpp``: one pass over the rows, each row's gate weights and expert outputs
read once from cache; fp32/fp64, from 256 rows) and otherwise torch: one ``bmm`` over the
batch (for each b, ``(T, E) @ (E, D)``). Forward + backward, one thread, the expert blocks'
sizes (T, E = 8-40, B = 256-2048, D = 32-128): the kernel 1.5-4.5x faster than the three
bmm's (``benchmarks/RESULTS.md``); the bmm had beaten E broadcast multiply-adds 2.5-4x, and
``einsum`` lowers to the same bmm. On
CUDA tensors the Triton kernels (``mtlfast/kernels/triton/mixture.py``; on CPU tensors under
``TRITON_INTERPRET=1`` when ``MTLFAST_HEADS_TRITON=1`` asks for it).

``mtlfast::mixture`` and ``mtlfast::mixture_backward`` are ``torch.library.custom_op``s with
fake kernels and an autograd formula, so ``torch.compile`` sees through them; plain eager
calls skip the custom-op layer (as ``grouped_linear`` does), and plain eager calls served by
torch run the bmm directly under torch's autograd (no ``autograd.Function``: its Python cost
showed at small batches). First-order gradients only (the custom-op path).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from . import _validate
from ._dispatch import backend
from .grouped_linear import _vmap_loop

__all__ = ["mixture", "mixture_backward", "mixture_backward_reference", "mixture_reference"]

_OP = "mixture"


# ----------------------------------------------------------------------------- validation

def _check(g: object, h: object) -> None:
    _validate.tensor(_OP, "g", g, floating=True, dim=3)
    _validate.tensor(_OP, "h", h, floating=True, dim=3)
    T, B, E = g.shape  # type: ignore[union-attr]
    if h.shape[0] != E or h.shape[1] != B:  # type: ignore[union-attr]
        raise ValueError(f"{_OP}: h must be (E={E}, B={B}, D) to match g (T, B, E) = "
                         f"{tuple(g.shape)}, got h {tuple(h.shape)}")  # type: ignore[union-attr]
    if g.dtype != h.dtype:  # type: ignore[union-attr]
        raise TypeError(f"{_OP}: g has dtype {g.dtype} but h has {h.dtype}; "  # type: ignore
                        "cast one of them")
    _validate.same_device(_OP, g=g, h=h)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- references

def mixture_reference(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The spec: a plain loop over tasks and experts."""
    _check(g, h)
    T, E = g.shape[0], g.shape[2]
    z = [sum((g[t, :, e, None] * h[e] for e in range(1, E)), g[t, :, 0, None] * h[0])
         for t in range(T)]
    return torch.stack(z)


def mixture_backward_reference(dz: torch.Tensor, g: torch.Tensor, h: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec of the gradients: loops over tasks and experts."""
    T, E = g.shape[0], g.shape[2]
    dg = torch.stack([torch.stack([(dz[t] * h[e]).sum(-1) for e in range(E)], -1)
                      for t in range(T)])
    dh = torch.stack([sum((g[t, :, e, None] * dz[t] for t in range(1, T)), g[0, :, e, None] * dz[0])
                      for e in range(E)])
    return dg, dh


# ----------------------------------------------------------------------------- torch

def _forward_torch(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    # for each row b: (T, E) @ (E, D); (B, T, D) buffer returned as a (T, B, D) view
    return torch.bmm(g.transpose(0, 1), h.transpose(0, 1)).transpose(0, 1)


def _backward_torch(dz, g, h, need_g: bool, need_h: bool):
    dzb = dz.transpose(0, 1)  # (B, T, D)
    dg = torch.bmm(dzb, h.permute(1, 2, 0)).transpose(0, 1) if need_g else None  # (T, B, E)
    dh = torch.bmm(g.permute(1, 2, 0), dzb).transpose(0, 1) if need_h else None  # (E, B, D)
    return dg, dh


# ----------------------------------------------------------------------------- dispatch

def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # the Triton interpreter computes half types poorly: fp32 on CPU tensors
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return t.dtype


def _forward_impl(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    which = backend(_OP, g)
    if which == "cpu":
        return torch.ops.mtlfast.mixture_cpu(g, h)
    if which == "triton":
        from ..kernels.triton.mixture import mixture_triton

        cdt = _compute_dtype(g)
        return mixture_triton(g.to(cdt), h.to(cdt)).to(g.dtype)
    return _forward_torch(g, h)


def _backward_impl(dz, g, h, need_g: bool, need_h: bool):
    # dz, not g: under autograd.grad(..., is_grads_batched=True) dz is a legacy vmap
    # BatchedTensor (no storage for a Triton launch), which the rule sends to torch
    which = backend(_OP, dz)
    if which == "cpu":
        dg, dh = torch.ops.mtlfast.mixture_backward_cpu(dz, g, h, need_g, need_h)
        return (dg if need_g else None), (dh if need_h else None)
    if which == "triton":
        from ..kernels.triton.mixture import mixture_backward_triton

        cdt = _compute_dtype(g)
        dg, dh = mixture_backward_triton(dz.to(cdt), g.to(cdt), h.to(cdt), need_g, need_h)
        return (dg.to(g.dtype) if dg is not None else None,
                dh.to(h.dtype) if dh is not None else None)
    return _backward_torch(dz, g, h, need_g, need_h)


def _eager(*tensors: torch.Tensor) -> bool:
    """Plain eager calls skip the custom-op layer; compile, torch.func and fake tensors use it."""
    if torch.compiler.is_compiling():
        return False
    return not any(torch._C._functorch.is_functorch_wrapped_tensor(t) or is_fake(t)
                   for t in tensors)


@torch.library.custom_op("mtlfast::mixture", mutates_args=())
def _mixture_op(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return _forward_impl(g, h).contiguous()


@_mixture_op.register_fake
def _(g, h):
    return g.new_empty(g.shape[0], g.shape[1], h.shape[2])


@torch.library.custom_op("mtlfast::mixture_backward", mutates_args=())
def _mixture_backward_op(dz: torch.Tensor, g: torch.Tensor, h: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    dg, dh = _backward_impl(dz, g, h, True, True)
    return dg.contiguous(), dh.contiguous()


@_mixture_backward_op.register_fake
def _(dz, g, h):
    return torch.empty_like(g, memory_format=torch.contiguous_format), \
        torch.empty_like(h, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    g, h = inputs
    ctx.save_for_backward(g, h)


def _backward(ctx, dz):
    g, h = ctx.saved_tensors
    need_g, need_h = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_g or need_h):
        return None, None
    with torch.no_grad():
        if _eager(dz, g, h):
            dg, dh = _backward_impl(dz, g, h, need_g, need_h)
        else:
            dg, dh = _mixture_backward_op(dz, g, h)
    return (dg if need_g else None), (dh if need_h else None)


_mixture_op.register_autograd(_backward, setup_context=_setup_context)


@_mixture_op.register_vmap
def _(info, in_dims, g, h):
    return _vmap_loop(_mixture_op, info, in_dims, (g, h))


@_mixture_backward_op.register_vmap
def _(info, in_dims, dz, g, h):
    return _vmap_loop(_mixture_backward_op, info, in_dims, (dz, g, h))


class _MixtureFn(torch.autograd.Function):
    """Eager calls: the same forward/backward without the custom-op dispatch cost."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g, h):
        return _forward_impl(g, h) if _eager(g, h) else _mixture_op(g, h)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


# ----------------------------------------------------------------------------- public

def mixture(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``z[t, b] = sum_e g[t, b, e] h[e, b]``: g (T, B, E), h (E, B, D) -> z (T, B, D).

    Differentiable (first order) in ``g`` and ``h``, compilable. See the module docstring.
    """
    _check(g, h)
    if _eager(g, h) and backend(_OP, g) == "torch":
        # plain eager torch path: the bmm itself, differentiated by torch's autograd (the
        # same two bmm's as _backward_torch, without the Python autograd.Function's cost)
        return _forward_torch(g, h)
    return _MixtureFn.apply(g, h)


def mixture_backward(dz: torch.Tensor, g: torch.Tensor, h: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dg, dh)`` of ``mixture`` for the output gradient ``dz`` (T, B, D)."""
    _check(g, h)
    _validate.tensor(_OP, "dz", dz, floating=True, dim=3)
    want = (g.shape[0], g.shape[1], h.shape[2])
    if tuple(dz.shape) != want:
        raise ValueError(f"{_OP}: dz must be {want}, got {tuple(dz.shape)}")
    if dz.dtype != g.dtype or dz.device != g.device:
        raise TypeError(f"{_OP}: dz must share g's dtype and device, got {dz.dtype}/{dz.device}")
    dg, dh = _backward_impl(dz, g, h, True, True)
    return dg, dh
