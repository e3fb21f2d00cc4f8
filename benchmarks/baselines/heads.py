"""Task heads the way models write them today, and the usual hand-fused alternative.

- ``heads_loop``: a Python loop over an ``nn.ModuleDict`` of heads (one small GEMM per head
  and layer, 2x more in the backward).
- ``ConcatBmmHeads``: the common manual fusion: the first layers of all heads concatenated
  into one ``Linear`` (they all read the same input), the second layers zero-padded to the
  widest head and run as one ``torch.bmm``, the outputs sliced back per task.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConcatBmmHeads", "heads_loop"]


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
