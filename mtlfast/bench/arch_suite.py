"""Suite ``arch``: forward + backward of the expert blocks (``mtlfast.arch``) vs their loops.

Cases (LibMTL / DeepCTR-like sizes): MMoE with 8 experts and 8 tasks, and PLE with 2 levels
(DeepCTR's defaults: 1 shared and 1 specific expert per task per level), input width 256,
experts 256-128 (DeepCTR's default widths; GEMM-bound) and input 64, experts 64-32 (where
the loop's per-op costs weigh), batch 2048; full runs add CGC and DSelect-k. Contenders on
the same weights (the fused block's ``unfuse()``): mtlfast's fused block, the LibMTL /
DeepCTR-style loop (one ``nn.Sequential`` per expert, one gate per task, stack + einsum
mixtures), ``torch.compile`` of that loop (full runs only: compiling takes minutes on a
2-core CPU), and the floor: the experts' layer GEMMs (forward, input and weight gradients)
as dense ``mm``s of the same sizes, the least work any implementation of the block does.
Each call runs the block forward, a loss ``sum(z * c)`` and the backward of every parameter;
the outputs and every parameter gradient (in the loop's key order) are compared before timing.

The ``LS step`` cases time a whole training step: block + ``FusedHeads`` (per-task path) vs
the loop block + a ``ModuleDict`` of heads, T regression losses, ``sum(losses).backward()``.

The column architectures (Cross-stitch, MTAN, LTB on ResNet-style encoders) run forward +
backward batched (``StackedColumns``: grouped convolutions over channel-stacked columns) vs
their loop definitions, on a CelebA-like many-task case (T = 8, and 40 in full runs, narrow
columns, 32x32) and, in full runs, a NYUv2-like one (T = 3, ResNet-18 layout at width 32,
64x64), in training mode; outputs and gradients (by checkpoint key) are compared first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .harness import Case, Config, Contender

__all__ = ["cases", "make_block", "make_columns"]

_BIG = {"K": 256, "hidden": (256, 128), "B": 2048, "T": 8}
_SMALL = {"K": 64, "hidden": (64, 32), "B": 2048, "T": 8}
_MMOE, _PLE = {"kind": "mmoe", "E": 8}, {"kind": "ple", "levels": 2, "S": 1, "k": 1}
#: label -> block config (the first two also time the LS step)
NAMED: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "MMoE 3x2": {"kind": "mmoe", "K": 16, "E": 3, "T": 2, "hidden": (8, 6), "B": 8},
        "PLE 2 levels": {"kind": "ple", "K": 16, "levels": 2, "S": 1, "k": 1, "T": 2,
                         "hidden": (8, 6), "B": 8},
    },
    "quick": {
        "MMoE 8 experts x 8 tasks": {**_MMOE, **_BIG},
        "PLE 2 levels (1+1/task)": {**_PLE, **_BIG},
        "MMoE 8x8, experts 64-32": {**_MMOE, **_SMALL},
        "PLE 2 levels, experts 64-32": {**_PLE, **_SMALL},
    },
    "full": {
        "MMoE 8 experts x 8 tasks": {**_MMOE, **_BIG},
        "PLE 2 levels (1+1/task)": {**_PLE, **_BIG},
        "MMoE 8x8, experts 64-32": {**_MMOE, **_SMALL},
        "PLE 2 levels, experts 64-32": {**_PLE, **_SMALL},
        "CGC 2 shared + 1/task": {"kind": "cgc", "S": 2, "k": 1, **_BIG},
        "DSelect-k 8 experts, k=2": {"kind": "dselect", "E": 8, "k": 2, **_BIG},
    },
}


def make_block(cfg: dict[str, Any], device: torch.device, seed: int = 0) -> nn.Module:
    """The fused block of a case config."""
    from ..arch import CGC, PLE, DSelectK, MMoE

    torch.manual_seed(seed)
    K, T, hidden, kind = cfg["K"], cfg["T"], list(cfg["hidden"]), cfg["kind"]
    f = {"device": device}
    if kind == "mmoe":
        return MMoE(K, cfg["E"], hidden, T, **f)
    if kind == "cgc":
        return CGC(K, cfg["S"], cfg["k"], hidden, T, **f)
    if kind == "ple":
        return PLE(K, cfg["levels"], cfg["S"], cfg["k"], hidden, T, **f)
    return DSelectK(K, cfg["E"], cfg["k"], hidden, T, **f)


def _grads_by_loop_key(fused: nn.Module, grads: list[torch.Tensor], keys: list[str]
                       ) -> list[torch.Tensor]:
    """The fused block's parameter gradients, split and named as the loop's parameters."""
    names = [n for n, _ in fused.named_parameters()]
    by_name = dict(zip(names, grads, strict=True))
    out: dict[str, torch.Tensor] = {}
    for fused_name, blocks in fused._param_blocks().items():
        parts = by_name[fused_name].split([b.numel() for _, b in blocks])
        out.update({k: p.view(b.shape) for (k, b), p in zip(blocks, parts, strict=True)})
    return [out[k] for k in keys]


def _step(block: nn.Module, x: torch.Tensor, c: torch.Tensor
          ) -> Callable[[], tuple[torch.Tensor, ...]]:
    params = list(block.parameters())

    def run() -> tuple[torch.Tensor, ...]:
        z = block(x)
        grads = torch.autograd.grad((z * c).sum(), params)
        return (z.detach(), *grads)

    return run


def _gemm_floor(block: nn.Module, B: int, device: torch.device) -> Contender:
    """Every expert layer's forward, input-gradient and weight-gradient GEMM as one dense
    ``mm`` of the same size (layer 1 of level 0 needs no input gradient)."""
    from ..arch.experts import ExpertBank

    gen = torch.Generator().manual_seed(2)
    shapes = []
    for bank in (m for m in block.modules() if isinstance(m, ExpertBank)):
        for layer in range(bank.depth):
            ins, outs = bank.layer_widths(layer)
            k, n = max(ins), sum(i * o for i, o in zip(ins, outs, strict=True)) // max(ins)
            first = layer == 0 and bank.groups is None
            shapes.append((torch.randn(B, k, generator=gen).to(device),
                           torch.randn(k, n, generator=gen).to(device),
                           torch.randn(B, n, generator=gen).to(device), not first))

    def gemms() -> torch.Tensor:
        out = None
        for a, w, g, input_grad in shapes:
            torch.mm(a, w)
            if input_grad:
                torch.mm(g, w.T)
            out = torch.mm(a.T, g)
        return out

    return Contender("GEMM floor", run=gemms, floor=True,
                     note="the expert layers' forward + backward GEMMs as dense mm")


def _contenders(cfg: dict[str, Any], run_cfg: Config) -> list[Contender]:
    device = run_cfg.device
    fused = make_block(cfg, device)
    loop = fused.unfuse()
    keys = [k for k, _ in loop.named_parameters()]
    gen = torch.Generator().manual_seed(1)
    B, T = cfg["B"], cfg["T"]
    x = torch.randn(B, cfg["K"], generator=gen).to(device)
    c = torch.randn(T, B, cfg["hidden"][-1], generator=gen).to(device)
    fused_run = _step(fused, x, c)

    def fused_check() -> tuple[torch.Tensor, ...]:
        z, *grads = fused_run()
        return (z, *_grads_by_loop_key(fused, grads, keys))

    out = [Contender("mtlfast fused", run=fused_run, check=fused_check, reference=True),
           Contender("loop (LibMTL-style)", run=_step(loop, x, c))]
    if run_cfg.sizes != "full":
        out.append(Contender("torch.compile(loop)", unavailable="skipped below --sizes full "
                                                                "(compiling takes minutes)"))
    else:
        compiled = torch.compile(loop)
        out.append(Contender("torch.compile(loop)", run=_step_compiled(compiled, loop, x, c),
                             note="compile time not counted"))
    out.append(_gemm_floor(fused, B, device))
    return out


def _step_compiled(compiled, loop: nn.Module, x, c):
    params = list(loop.parameters())

    def run():
        z = compiled(x)
        grads = torch.autograd.grad((z * c).sum(), params)
        return (z.detach(), *grads)

    return run


def _ls_contenders(cfg: dict[str, Any], run_cfg: Config) -> list[Contender]:
    """A whole linear-scalarization training step, fused vs loop (block + heads)."""
    from ..heads import FusedHeads

    device = run_cfg.device
    block = make_block(cfg, device)
    loop = block.unfuse()
    T, D, B = cfg["T"], cfg["hidden"][-1], cfg["B"]
    torch.manual_seed(3)
    heads = FusedHeads(D, {f"task{t}": 1 for t in range(T)}, hidden=64, device=device)
    loop_heads = heads.unfuse()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, cfg["K"], generator=gen).to(device)
    y = torch.randn(B, T, generator=gen).to(device)

    def fused_step() -> tuple[torch.Tensor, ...]:
        out = heads(block(x), per_task=True)
        losses = [((o.squeeze(-1) - y[:, t]) ** 2).mean() for t, o in enumerate(out.values())]
        loss = sum(losses)
        loss.backward()
        return (torch.stack(losses).detach(),)

    def loop_step() -> tuple[torch.Tensor, ...]:
        z = loop(x)
        losses = [((h(z[t]).squeeze(-1) - y[:, t]) ** 2).mean()
                  for t, h in enumerate(loop_heads.values())]
        sum(losses).backward()
        return (torch.stack(losses).detach(),)

    return [Contender("mtlfast fused", run=fused_step, reference=True),
            Contender("loop (LibMTL-style)", run=loop_step,
                      note="+ ModuleDict heads; sum(losses).backward()")]


#: label -> (T, B, image size, width, blocks per ResNet layer)
COLUMNS: dict[str, dict[str, tuple[int, int, int, int, tuple[int, ...]]]] = {
    "tiny": {"T=2": (2, 2, 16, 4, (1, 2, 2, 2))},
    "quick": {"CelebA-like T=8": (8, 16, 32, 8, (1, 2, 2, 2))},
    "full": {"NYUv2-like T=3": (3, 8, 64, 32, (2, 2, 2, 2)),
             "CelebA-like T=8": (8, 16, 32, 8, (1, 2, 2, 2)),
             "CelebA-like T=40": (40, 16, 32, 8, (1, 2, 2, 2))},
}


def make_columns(arch: str, T: int, width: int, layers: tuple[int, ...], device: torch.device
                 ) -> tuple[nn.Module, nn.Module]:
    """(batched, loop definition) of a column architecture, with the same weights."""
    from ..arch import LTB, MTAN, CrossStitch, resnet

    torch.manual_seed(0)
    kinds = {"cross-stitch": CrossStitch, "mtan": MTAN, "ltb": LTB}
    batched = kinds[arch](T, resnet(layers, width)).to(device)
    if arch == "ltb":
        batched.set_epoch(50, 100)  # mid-schedule: every branch weight in use
    loop = batched.unfuse()
    return batched, loop


def _columns_contenders(arch: str, spec: tuple, run_cfg: Config) -> list[Contender]:
    T, B, size, width, layers = spec
    batched, loop = make_columns(arch, T, width, layers, run_cfg.device)
    x = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(1))
    x = x.to(run_cfg.device)

    def step(model: nn.Module) -> Callable[[], tuple[torch.Tensor, ...]]:
        def run() -> tuple[torch.Tensor, ...]:
            model.zero_grad(set_to_none=True)
            buffers = [b.clone() for b in model.buffers()]
            torch.manual_seed(5)  # LTB's Gumbel draw: the same sample for both
            outs = model(x)
            sum((o * o).mean() for o in outs).backward()
            with torch.no_grad():  # gradients in the parameters' place, keyed as checkpoints
                saved = [p.detach().clone() for p in model.parameters()]
                for p in model.parameters():
                    p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
                # BatchNorm statistics after this forward (compared too), then as before it
                keyed = model.state_dict()
                grads = [keyed[k].clone() for k in sorted(keyed) if keyed[k].is_floating_point()]
                for p, v in zip(model.parameters(), saved, strict=True):
                    p.copy_(v)
                for b, v in zip(model.buffers(), buffers, strict=True):
                    b.copy_(v)
            return (*(o.detach() for o in outs), *grads)

        return run

    def timed(model: nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            model.zero_grad(set_to_none=True)
            outs = model(x)
            loss = sum((o * o).mean() for o in outs)
            loss.backward()
            return loss.detach()

        return run

    return [Contender("mtlfast fused", run=timed(batched), check=step(batched), reference=True),
            Contender("loop (LibMTL-style)", run=timed(loop), check=step(loop))]


def cases(cfg: Config) -> Iterator[Case]:
    """Forward + backward of each named block, then the LS training step of the first two,
    then the column architectures."""
    for label, block_cfg in NAMED[cfg.sizes].items():
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in block_cfg.items()}
        yield Case(suite="arch", method=block_cfg["kind"], label=label, params=params,
                   headline=True, rtol=1e-4,
                   build=lambda c=block_cfg: _contenders(c, cfg))
    for label, block_cfg in list(NAMED[cfg.sizes].items())[:2]:
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in block_cfg.items()}
        yield Case(suite="arch", method="LS step", label=f"{label} + heads", params=params,
                   headline=True, rtol=1e-4,
                   build=lambda c=block_cfg: _ls_contenders(c, cfg))
    for arch in ("cross-stitch", "mtan", "ltb"):
        for label, spec in COLUMNS[cfg.sizes].items():
            T, B, size, width, layers = spec
            yield Case(suite="arch", method=arch, label=label,
                       params={"T": T, "B": B, "size": size, "width": width,
                               "layers": list(layers)},
                       headline=True, rtol=1e-3,  # training-mode BatchNorm over few
                       # values amplifies fp32 rounding (the tests' tolerance too)
                       build=lambda a=arch, sp=spec: _columns_contenders(a, sp, cfg))
