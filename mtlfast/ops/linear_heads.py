"""Linear heads on per-task inputs as one op: ``y_t = x[t] W_t^T + b_t`` for T heads, ``x``
``(T, M, D)``, ``W`` the heads' ``(out_t, D)`` rows stacked (FusedHeads' ``weight``).

Dispatch (``_dispatch.backend("linear_heads", x, ...)``): plain eager CPU calls of up to
``mlp_heads``' per-task head count run the C++ op (``csrc/cpu/heads.cpp``,
``torch.ops.mtlfast.linear_heads``): one autograd node whose gradients are written into the
packed buffers. FusedHeads' batched path (the ``grouped_linear`` custom op, a Python
``autograd.Function``, and the split of its output) ran 1.2-2.2x the loop of heads at 2-8
heads; the op ran 0.2-0.97x (benchmarks/RESULTS.md). Elsewhere FusedHeads keeps that path.
Differentiable twice, in forward mode and under batched backward gradients, as ``mlp_heads``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._dispatch import backend
from .mlp_heads import per_task_per_head, upcast_gemms

__all__ = ["linear_heads", "linear_heads_reference", "linear_heads_serves"]


def linear_heads_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                           outs: Sequence[int]) -> list[torch.Tensor]:
    """The spec: ``F.linear`` of each head on its own input."""
    bs = b.split(list(outs)) if b is not None else [None] * len(outs)
    return [F.linear(xt, wt, bt) for xt, wt, bt in zip(x.unbind(0), w.split(list(outs)), bs,
                                                         strict=True)]


def linear_heads_serves(x: torch.Tensor, outs: Sequence[int]) -> bool:
    """The dispatch for eager calls (the caller checked they are eager)."""
    return backend("linear_heads", x, eager=True) == "cpu" and per_task_per_head(x, None, outs)


def linear_heads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                 outs: Sequence[int]) -> list[torch.Tensor]:
    """The heads' outputs ``[(M, out_t)]`` from the C++ op; arguments as FusedHeads holds
    them, already checked. Low-precision GEMMs run in fp32 where ``mlp_heads.upcast_gemms``."""
    return torch.ops.mtlfast.linear_heads.default(x, w, b, outs, upcast_gemms(x))
