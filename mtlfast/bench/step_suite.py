"""Suite ``step``: one training step's forward + backward of a shared trunk with T heads.

Contenders on the same model and batch, each leaving the same gradients in ``.grad``:
``mtlfast.backward`` in its modes, the per-task loop of LibMTL-style trainers (T backward
passes with ``retain_graph``, gradients flattened, the method applied; from
``mtlfast.baselines``), torchjd's ``mtl_backward`` + ``jac_to_grad``, and linear
scalarization ``sum(losses).backward()`` as the floor (a different, cheaper update).

Two sweeps of an MLP trunk (T, and the trunk's width), and on CUDA or in full runs two named
models: "celeba" (a conv trunk with BatchNorm, 40 binary heads, 64x64 images) and "dense3"
(a 3-layer MLP trunk, 3 regression heads). PCGrad's random task orders come from its seed:
each check uses a fresh ``PCGrad(seed=0)``, so every contender drawing the same orders
(mtlfast's modes, the per-task loop) is compared; on CUDA each record also has the memory
the step allocates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .. import baselines
from . import _contenders
from .harness import Case, Config, Contender, human
from .methods_suite import discover_methods, torchjd_factory

__all__ = ["TrunkModel", "cases"]

#: methods measured (whichever exist); --quick uses the first available one, and PCGrad on
#: the named models
STEP_METHODS = ("UPGrad", "PCGrad", "MGDA", "Mean")
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"T": (2, 3), "W_at_T": 16, "W": (8, 16), "T_at_W": 2, "D": 8, "B": 4,
             "headline": (3, 16)},
    "quick": {"T": (2, 8, 32), "W_at_T": 256, "W": (64, 256, 1024), "T_at_W": 8, "D": 64,
              "B": 64, "headline": (32, 256)},
    "full": {"T": (2, 8, 32, 128), "W_at_T": 512, "W": (128, 512, 2048), "T_at_W": 8,
             "D": 256, "B": 128, "headline": (32, 512)},
}


class TrunkModel(nn.Module):
    """An MLP trunk (D -> widths[0] -> widths[1] ..., ReLU) with T regression heads
    Linear(widths[-1], 1); or, with ``conv``, a conv trunk with BatchNorm on (3, 64, 64)
    images (stride-2 convolutions to ``widths`` channels, pooled, one Linear) and T binary
    heads."""

    def __init__(self, in_features: int, widths: tuple[int, ...], num_tasks: int,
                 conv: bool = False) -> None:
        super().__init__()
        self.conv = conv
        layers: list[nn.Module] = []
        if conv:
            channels = (3, *widths)
            for c_in, c_out in zip(channels, channels[1:], strict=False):
                layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                           nn.BatchNorm2d(c_out), nn.ReLU()]
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], widths[-1]),
                       nn.ReLU()]
        else:
            for d_in, d_out in zip((in_features, *widths), widths, strict=False):
                layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(widths[-1], 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(T scalar losses, features z)``: one loss per task, each computed from its own
        head alone (task graphs that only meet at z, as torchjd's mtl_backward requires)."""
        z = self.trunk(x)
        out = [h(z).squeeze(1) for h in self.heads]
        if self.conv:
            return [nn.functional.binary_cross_entropy_with_logits(o, y[:, t])
                    for t, o in enumerate(out)], z
        return [((o - y[:, t]) ** 2).mean() for t, o in enumerate(out)], z

    def batch(self, size: int, in_features: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed batch ``(x, y)`` of ``size`` samples for this model's tasks."""
        gen = torch.Generator().manual_seed(1)
        T = len(self.heads)
        if self.conv:
            x = torch.randn(size, 3, 64, 64, generator=gen)
            y = torch.randint(0, 2, (size, T), generator=gen).float()
        else:
            x = torch.randn(size, in_features, generator=gen)
            y = torch.randn(size, T, generator=gen)
        return x.to(device), y.to(device)


#: name -> (in_features, widths, T, conv, batch)
NAMED: dict[str, tuple[int, tuple[int, ...], int, bool, int]] = {
    "celeba conv+BN 40 heads": (3, (32, 64, 128, 256), 40, True, 64),
    "dense3 MLP 3 heads": (128, (512, 512, 256), 3, False, 64),
}


def _method_factory(method_cls: type) -> Callable[[], Any]:
    """Fresh instances; a random method seeded, so two instances draw the same orders."""
    import inspect

    if "seed" in inspect.signature(method_cls).parameters:
        return lambda: method_cls(seed=0)
    return method_cls


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in model.parameters()]


def _stepper(model: TrunkModel, x: torch.Tensor, y: torch.Tensor,
             backward: Callable[[list[torch.Tensor], torch.Tensor], None]
             ) -> Callable[[], list[torch.Tensor]]:
    def run() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        losses, z = model(x, y)
        backward(losses, z)
        return _grads(model)

    return run


def _contenders_for(method_name: str, method_cls: type, model_args: tuple[Any, ...],
                    batch: int, cfg: Config) -> list[Contender]:
    torch.manual_seed(0)
    model = TrunkModel(*model_args).to(cfg.device)
    x, y = model.batch(batch, model_args[0], cfg.device)
    shared = list(model.trunk.parameters())
    T = len(model.heads)
    make_method = _method_factory(method_cls)

    def contender(name: str, backward: Callable[[Any, list[torch.Tensor], torch.Tensor], None],
                  **kw: Any) -> Contender:
        """``backward(method, losses, z)`` timed with one method instance, checked with a
        fresh one per check."""
        method = make_method()
        return Contender(name, run=_stepper(model, x, y, lambda L, z: backward(method, L, z)),
                         check=lambda: _stepper(model, x, y, lambda L, z: backward(
                             make_method(), L, z))(), **kw)

    out: list[Contender] = []

    import mtlfast

    api = getattr(mtlfast, "backward", None)
    for mode in ("jacobian", "gramian", "features"):
        name = f"mtlfast {mode}"
        if api is None:
            out.append(Contender(name, unavailable="mtlfast.backward not built yet",
                                 reference=mode == "jacobian"))
            continue

        def run_api(method: Any, losses: list[torch.Tensor], z: torch.Tensor,
                    mode: str = mode) -> None:
            api(losses, model.trunk, method=method, features=z, mode=mode)

        out.append(contender(
            name, run_api, reference=mode == "jacobian", floor=mode == "features",
            note="Gram of dL/dz only (MGDA-UB objective)" if mode == "features" else ""))

    out.append(contender(
        "per-task loop", lambda m, losses, z: baselines.per_task_backward(losses, shared, m),
        note="T backward passes with retain_graph, flatten, method (LibMTL pattern)"))

    autojac, why = _contenders.torchjd_autojac()
    make_jd, why_agg = torchjd_factory(method_name, method_cls(), T)
    if autojac is None or make_jd is None:
        out.append(Contender("torchjd", unavailable=why or why_agg))
    else:
        aggregator = make_jd()
        heads = [list(h.parameters()) for h in model.heads]

        def run_jd(losses: list[torch.Tensor], z: torch.Tensor) -> None:
            autojac.mtl_backward(losses, features=z, tasks_params=heads,
                                 shared_params=shared)
            autojac.jac_to_grad(shared, aggregator)

        out.append(Contender("torchjd", run=_stepper(model, x, y, run_jd),
                             note="mtl_backward + jac_to_grad"))

    out.append(Contender("sum().backward()", run=_stepper(
        model, x, y, lambda losses, z: torch.stack(losses).sum().backward()),
        floor=True, note="linear scalarization: the floor, another update"))
    return out


def cases(cfg: Config) -> Iterator[Case]:
    """A T sweep (number of heads) at fixed trunk width, a width sweep (P) at fixed T, and on
    CUDA or in full runs the named models."""
    sizes = SIZES[cfg.sizes]
    found = discover_methods()
    names = [n for n in STEP_METHODS if n in found]
    swept = names if cfg.sizes == "full" else names[:1]
    points: dict[tuple[int, int], tuple[str, ...]] = {}
    for T in sizes["T"]:
        points[(T, sizes["W_at_T"])] = ("T",)
    for W in sizes["W"]:
        key = (sizes["T_at_W"], W)
        points[key] = points.get(key, ()) + ("P",)
    D, B = sizes["D"], sizes["B"]
    for name in swept:
        for (T, W), sweeps in points.items():
            P = D * W + W + W * W + W  # the trunk's (shared) parameters
            yield Case(
                suite="step", method=name, label=f"T={T} P={human(P)}",
                params={"T": T, "P": P, "width": W, "in_features": D, "B": B},
                sweeps=sweeps, headline=(T, W) == tuple(sizes["headline"]), rtol=1e-3,
                build=lambda name=name, T=T, W=W: _contenders_for(
                    name, found[name], (D, (W, W), T), B, cfg),
            )
    if cfg.device.type != "cuda" and cfg.sizes != "full":
        return
    for name in [n for n in names if n in ("UPGrad", "PCGrad")]:
        for label, (d, widths, T, conv, batch) in NAMED.items():
            yield Case(
                suite="step", method=name, label=label,
                params={"T": T, "widths": list(widths), "in_features": d, "B": batch},
                rtol=1e-3, headline=True,
                build=lambda name=name, a=(d, widths, T, conv), b=batch: _contenders_for(
                    name, found[name], a, b, cfg),
            )
