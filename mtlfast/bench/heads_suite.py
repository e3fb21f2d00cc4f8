"""Suite ``heads``: forward + backward of T task heads reading one shared representation z.

Contenders on the same weights: mtlfast ``FusedHeads`` (built by ``mtlfast.fuse_heads`` from
the loop's heads), the ``nn.ModuleDict`` loop every MTL codebase writes, ``torch.compile`` of
that loop with default inductor options and with its ``batch_linear_lhs`` fusion (full runs
only: compiling takes about a minute per case on a 2-core CPU), the hand fusion (first layers
concatenated into one Linear, second layers as one padded bmm), and the floor: the first
layers' three GEMMs as one dense layer.
Each call runs the heads forward, a loss on all outputs, and the backward of every head
parameter and of z; the outputs and dL/dz are compared before timing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .. import baselines
from . import _contenders
from .harness import Case, Config, Contender

__all__ = ["cases", "make_heads"]

#: name -> (in_features, hidden or None, output widths, batch)
NAMED: dict[str, dict[str, tuple[int, int | None, tuple[int, ...], int]]] = {
    "tiny": {"mlp3": (16, 8, (1, 2, 5), 8)},
    "quick": {
        "celeba 40x Linear(512,1)": (512, None, (1,) * 40, 256),
        "8 MLP 512-256-{1..200}": (512, 256, (1, 2, 5, 10, 20, 50, 100, 200), 256),
        # small binary MLP heads: the host-bound regime (op count and Python per step)
        "40 MLP 64-16-1, B=32": (64, 16, (1,) * 40, 32),
    },
    "full": {
        "celeba 40x Linear(512,1)": (512, None, (1,) * 40, 256),
        "8 MLP 512-256-{1..200}": (512, 256, (1, 2, 5, 10, 20, 50, 100, 200), 256),
        "40 MLP 64-16-1, B=32": (64, 16, (1,) * 40, 32),
        "8 MLP 256-128-32, B=1024": (256, 128, (32,) * 8, 1024),
        "ranking 100x 256-64-1": (256, 64, (1,) * 100, 1024),
    },
}
#: the T sweep: T x Linear(D, 1) heads at batch B
SWEEP: dict[str, dict[str, Any]] = {
    "tiny": {"T": (2, 4), "D": 16, "B": 8},
    "quick": {"T": (4, 16, 64), "D": 512, "B": 256},
    "full": {"T": (4, 16, 64, 256), "D": 512, "B": 256},
}


def make_heads(in_features: int, hidden: int | None, widths: tuple[int, ...],
               device: torch.device, seed: int = 0) -> nn.ModuleDict:
    """The unfused heads: ``task{i}`` -> Linear, or Linear-ReLU-Linear when ``hidden``."""
    torch.manual_seed(seed)
    heads = nn.ModuleDict()
    for i, w in enumerate(widths):
        if hidden is None:
            heads[f"task{i}"] = nn.Linear(in_features, w)
        else:
            heads[f"task{i}"] = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(),
                                              nn.Linear(hidden, w))
    return heads.to(device)


def _step(forward: Callable[[torch.Tensor], dict[str, torch.Tensor]], params: list[nn.Parameter],
          z: torch.Tensor, cotangent: torch.Tensor) -> Callable[[], tuple[torch.Tensor, ...]]:
    """One forward + backward through ``forward``: returns (all outputs, dL/dz)."""

    def run() -> tuple[torch.Tensor, ...]:
        out = forward(z)
        flat = torch.cat(list(out.values()), dim=-1)
        loss = (flat * cotangent).sum()
        grads = torch.autograd.grad(loss, [z, *params])
        return flat.detach(), grads[0]

    return run


def _contenders_for(in_features: int, hidden: int | None, widths: tuple[int, ...], batch: int,
                    cfg: Config) -> list[Contender]:
    device = cfg.device
    heads = make_heads(in_features, hidden, widths, device)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(batch, in_features, generator=gen).to(device).requires_grad_()
    cotangent = torch.randn(batch, sum(widths), generator=gen).to(device)
    out: list[Contender] = []

    mtlfast_mod, why = _contenders.optional("mtlfast")
    fuse = getattr(mtlfast_mod, "fuse_heads", None)
    if fuse is None:
        out.append(Contender("mtlfast FusedHeads", unavailable="mtlfast.fuse_heads not built yet",
                             reference=True))
    else:
        fused = fuse(copy.deepcopy(heads))
        out.append(Contender("mtlfast FusedHeads", run=_step(fused, list(fused.parameters()), z,
                                                             cotangent), reference=True))

    loop = _step(lambda x: baselines.heads_loop(heads, x), list(heads.parameters()), z, cotangent)
    out.append(Contender("ModuleDict loop", run=loop))

    #: inductor options -> contender name: default, and batch_linear_lhs, inductor's pre-grad
    #: fusion of Linear layers reading one input (the options apply to that compile only)
    compiles = {"torch.compile(loop)": {},
                "torch.compile(loop, batch_linear_lhs)":
                    {"pre_grad_fusion_options": {"batch_linear_lhs": {}}}}
    for name, options in compiles.items():
        if cfg.sizes != "full":
            out.append(Contender(name, unavailable="skipped below --sizes full (compiling "
                                                   "takes ~1 min)"))
            continue
        compiled = torch.compile(lambda x: baselines.heads_loop(heads, x), options=options)
        out.append(Contender(name, run=_step(compiled, list(heads.parameters()), z, cotangent),
                             note="compile time not counted"))

    try:
        cat = baselines.ConcatBmmHeads(heads)
    except ValueError as exc:
        out.append(Contender("concat Linear + bmm", unavailable=str(exc)))
    else:
        out.append(Contender("concat Linear + bmm",
                             run=_step(cat, list(cat.parameters()), z, cotangent)))
    out.append(_gemm_floor(in_features, hidden, widths, batch, device))
    return out


def _gemm_floor(in_features: int, hidden: int | None, widths: tuple[int, ...], batch: int,
                device: torch.device) -> Contender:
    """The first layer of every head as one dense GEMM, forward and both backward GEMMs
    (dL/dz, dL/dW): the least work any fusion of these heads does."""
    n = sum(widths) if hidden is None else hidden * len(widths)
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(batch, in_features, generator=gen).to(device)
    w = torch.randn(in_features, n, generator=gen).to(device)
    g = torch.randn(batch, n, generator=gen).to(device)

    def gemms() -> torch.Tensor:
        torch.mm(a, w)
        torch.mm(g, w.T)
        return torch.mm(a.T, g)

    return Contender("GEMM floor", run=gemms, floor=True,
                     note="the first layers' forward + backward GEMMs as one dense layer")


def cases(cfg: Config) -> Iterator[Case]:
    """Named model-shaped cases (bars) and a T sweep of Linear(D, 1) heads."""
    for label, (d, hidden, widths, batch) in NAMED[cfg.sizes].items():
        yield Case(
            suite="heads", method="Linear" if hidden is None else "MLP", label=label,
            params={"T": len(widths), "D": d, "hidden": hidden, "widths": list(widths),
                    "B": batch},
            headline=True,  # model-shaped: every one is a bar of the speedup plot
            build=lambda d=d, h=hidden, w=widths, b=batch: _contenders_for(d, h, w, b, cfg),
        )
    sweep = SWEEP[cfg.sizes]
    for T in sweep["T"]:
        d, batch = sweep["D"], sweep["B"]
        yield Case(
            suite="heads", method="Linear", label=f"{T}x Linear({d},1)",
            params={"T": T, "D": d, "hidden": None, "widths": [1] * T, "B": batch},
            sweeps=("T",),
            build=lambda d=d, T=T, b=batch: _contenders_for(d, None, (1,) * T, b, cfg),
        )
