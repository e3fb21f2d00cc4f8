"""The slow ways mtlfast replaces, written once: the demo and ``python -m mtlfast bench`` time
them side by side with mtlfast after checking they compute the same update.

- :func:`per_task_backward`: the per-task backward loop of LibMTL-style frameworks;
- :func:`pcgrad_pairwise`: PCGrad as commonly implemented, a Python loop over task pairs;
- :func:`heads_loop` and :class:`ConcatBmmHeads`: task heads in a Python loop, and the usual
  hand fusion of them.

Per-task loop. For T losses: T ordinary backward passes with ``retain_graph=True``; after
each, the shared parameters' ``.grad`` are flattened (``torch.cat``) into row t of G (T x P)
and cleared; the heads keep accumulating their own gradients (a head only sees its own loss).
Then the method runs on G through its own protocol (``weights(G G^T, L) @ G``, or
``aggregate(G, L)``) and the result is written into the shared ``.grad``: the pattern
:func:`mtlfast.backward` replaces, on the same update.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .methods.base import Method

__all__ = ["ConcatBmmHeads", "heads_loop", "pcgrad_pairwise", "per_task_backward"]


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


# PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", Algorithm 1): for each
# task i, for the other tasks j in random order, g_i <- g_i - min(0, g_i . g_j) / ||g_j||^2 g_j;
# the update is sum_i g_i. The widely copied reference code (and LibMTL's PCGrad) loops over
# the pairs: three passes over the P entries and one host read (``if dot < 0``) per pair.
# mtlfast does the same algebra on the T x T Gram instead.


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


# Heads. ``heads_loop``: an ``nn.ModuleDict`` of heads called one after the other (one small
# GEMM per head and layer, twice as many in the backward). ``ConcatBmmHeads``: the first
# layers of all heads concatenated into one ``Linear`` (they read the same input), the second
# layers zero-padded to the widest head and run as one ``torch.bmm``, outputs sliced per task.


def heads_loop(heads: nn.ModuleDict, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{task: head(z)}``, one head after the other."""
    return {name: head(z) for name, head in heads.items()}


def _layers(head: nn.Module) -> tuple[nn.Linear, nn.Linear | None]:
    if isinstance(head, nn.Linear):
        return head, None
    mods = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not isinstance(head, nn.Sequential) or len(mods) != 2:
        raise TypeError("heads must be Linear or Sequential(Linear, activation, Linear)")
    return mods[0], mods[1]


class ConcatBmmHeads(nn.Module):
    """The heads of ``heads`` (all Linear, or all Linear-ReLU-Linear), fused by hand."""

    def __init__(self, heads: nn.ModuleDict) -> None:
        super().__init__()
        firsts, seconds = zip(*(_layers(h) for h in heads.values()), strict=True)
        self.names = list(heads.keys())
        with torch.no_grad():
            self.first = nn.Linear(firsts[0].in_features, sum(f.out_features for f in firsts))
            self.first = self.first.to(firsts[0].weight)
            self.first.weight.copy_(torch.cat([f.weight for f in firsts]))
            self.first.bias.copy_(torch.cat([f.bias for f in firsts]))
        self.first_widths = [f.out_features for f in firsts]
        self.mlp = seconds[0] is not None
        if not self.mlp:
            return
        if len(set(self.first_widths)) != 1:
            raise ValueError("the bmm fusion needs the same hidden width in every head")
        widths = [s.out_features for s in seconds]
        T, H, W = len(seconds), self.first_widths[0], max(widths)
        weight = torch.zeros(T, H, W).to(seconds[0].weight)
        bias = torch.zeros(T, 1, W).to(seconds[0].weight)
        with torch.no_grad():
            for t, s in enumerate(seconds):
                weight[t, :, : s.out_features] = s.weight.T
                bias[t, 0, : s.out_features] = s.bias
        self.weight2 = nn.Parameter(weight)
        self.bias2 = nn.Parameter(bias)
        self.widths = widths

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.first(z)
        if not self.mlp:
            return dict(zip(self.names, h.split(self.first_widths, dim=-1), strict=True))
        T, H = len(self.names), self.first_widths[0]
        h = torch.relu(h).view(z.shape[0], T, H).transpose(0, 1)  # (T, B, H)
        out = torch.baddbmm(self.bias2, h, self.weight2)  # (T, B, W)
        return {n: out[t, :, :w] for t, (n, w) in enumerate(zip(self.names, self.widths,
                                                                 strict=True))}
