"""The LibMTL / public-implementation pattern: one backward per task, flatten, method.

For each task t: ``autograd.grad(L_t, shared, retain_graph=True)``, ``torch.cat`` of the
flattened per-parameter gradients into row t of G, then the method on G, then the update
copied back parameter by parameter; the heads get ``sum_t L_t``'s gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtlfast.methods import Method


def per_task_loop_backward(
    losses: Sequence[torch.Tensor],
    shared: Sequence[torch.Tensor],
    method: Method,
    head_params: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Write the method's update into the shared ``.grad`` (accumulating); returns it flat."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for p, g in zip(shared, grads, strict=True)
        ]))
    G = torch.stack(rows)
    L = torch.stack([loss.detach() for loss in losses])
    update = method.aggregate(G, L) if method.needs == "jacobian" else method(G, L)
    torch.autograd.backward(sum(losses), inputs=list(head_params))
    offset = 0
    for p in shared:
        g = update[offset:offset + p.numel()].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)
        offset += p.numel()
    return update
