"""The slow way: the per-task backward loop of LibMTL-style frameworks, as a reference.

For T losses: T ordinary backward passes with ``retain_graph=True``; after each, the shared
parameters' ``.grad`` are flattened (``torch.cat``) into row t of G (T x P) and cleared; the
heads keep accumulating their own gradients (a head only sees its own loss). Then the method
runs on G through its own protocol (``weights(G G^T, L) @ G``, or ``aggregate(G, L)``) and the
result is written into the shared ``.grad``. This is the pattern mtlfast replaces; the demo
and the benchmarks time it side by side with :func:`mtlfast.backward`, on the same update.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .methods.base import Method

__all__ = ["per_task_backward"]


def _as_list(losses: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | torch.Tensor):
    if isinstance(losses, Mapping):
        return list(losses.values())
    if isinstance(losses, torch.Tensor):
        return list(losses.unbind(0)) if losses.dim() == 1 else [losses]
    return list(losses)


def per_task_backward(
    losses: Sequence[torch.Tensor] | Mapping[str, torch.Tensor] | torch.Tensor,
    shared: Iterable[nn.Parameter] | nn.Module,
    method: Method,
) -> torch.Tensor | None:
    """Backward of T losses the slow way; returns the Gram method's weights, else None.

    ``shared`` are the parameters whose per-task gradients the method combines (an
    ``nn.Module`` means its parameters). Existing ``.grad`` of the shared parameters is kept
    and the update added to it, like ``loss.backward()`` does.
    """
    loss_list = _as_list(losses)
    if not loss_list:
        raise ValueError("losses must hold at least one scalar loss")
    for i, loss in enumerate(loss_list):
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"losses[{i}] must be a scalar tensor")
    params = [p for p in (shared.parameters() if isinstance(shared, nn.Module) else shared)
              if p.requires_grad]
    if not params:
        raise ValueError("shared must hold at least one parameter that requires grad")
    loss_vector = torch.stack([loss.detach() for loss in loss_list])

    if method.needs == "losses":
        # Loss-based methods need no per-task gradients: one weighted backward either way.
        # (Their weights are not recomputed here: stateful ones update state per call.)
        method(torch.stack(loss_list)).backward()
        return None

    previous = [p.grad for p in params]
    for p in params:
        p.grad = None
    rows = []
    for t, loss in enumerate(loss_list):
        loss.backward(retain_graph=t < len(loss_list) - 1)
        rows.append(torch.cat([
            p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype,
                                                                      device=p.device)
            for p in params
        ]))
        for p in params:
            p.grad = None
    G = torch.stack(rows)

    if method.needs == "gram":
        w = method.weights(G @ G.T, loss_vector)
        update = w @ G
    elif method.needs == "jacobian":
        w = None
        update = method.aggregate(G, loss_vector)
    else:
        raise ValueError(
            f"method.needs must be 'gram', 'jacobian' or 'losses', got {method.needs!r}"
        )

    offset = 0
    for p, old in zip(params, previous, strict=True):
        part = update[offset : offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        p.grad = part.clone() if old is None else old + part
    return None if w is None else w.detach()
