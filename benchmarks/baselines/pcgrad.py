"""PCGrad as commonly implemented: a Python loop over task pairs with full-length projections.

Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", Algorithm 1:
for each task i, for the other tasks j in random order,
``g_i <- g_i - min(0, g_i . g_j) / ||g_j||^2 g_j``; the update is ``sum_i g_i``.
This is the pattern of the widely copied Pytorch-PCGrad code (and of LibMTL's PCGrad): each
pair costs three passes over the P gradient entries, and the ``if dot < 0`` test reads the
device once per pair. mtlfast does the same algebra on the T x T Gram instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["pcgrad_pairwise"]


def pcgrad_pairwise(
    G: torch.Tensor,
    orders: Sequence[Sequence[int]] | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """PCGrad update of the ``(T, P)`` per-task gradients ``G``.

    ``orders[i]`` is the order in which task i is projected against the others (every task
    index, i itself skipped); when omitted each order is drawn with ``torch.randperm``.
    ``reduction`` is "sum" (the paper) or "mean".
    """
    if G.dim() != 2:
        raise ValueError(f"G must be a (T, P) matrix, got shape {tuple(G.shape)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    T = G.shape[0]
    grads = list(G)
    projected = []
    for i in range(T):
        g_i = grads[i].clone()
        order = orders[i] if orders is not None else torch.randperm(T, generator=generator)
        for j in order:
            j = int(j)
            if j == i:
                continue
            g_j = grads[j]
            dot = torch.dot(g_i, g_j)
            if dot < 0:  # a host read per pair, as in the reference code
                g_i -= dot / g_j.dot(g_j) * g_j
        projected.append(g_i)
    out = torch.stack(projected).sum(dim=0)
    return out / T if reduction == "mean" else out
