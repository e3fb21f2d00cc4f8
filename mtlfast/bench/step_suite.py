"""Suite ``step``: one training step's forward + backward of a shared trunk with T heads.

Contenders on the same model and batch, each leaving the same gradients in ``.grad``:
``mtlfast.backward`` in its modes, the per-task loop of LibMTL-style trainers (T backward
passes with ``retain_graph``, gradients flattened, the method applied; from
``mtlfast.baselines``), torchjd's ``mtl_backward`` + ``jac_to_grad``, and linear
scalarization ``sum(losses).backward()`` as the floor (a different, cheaper update).

On CUDA, also mtlfast's jacobian step captured in a CUDA graph and replayed.

Two sweeps of an MLP trunk (T, and the trunk's width), and on CUDA or in full runs the named
models of ``step_models`` with UPGrad, PCGrad and MGDA: (a) a CelebA-like ResNet-18-style
trunk with 40 binary heads, (b) a NYUv2-like encoder-decoder with three pixel-wise tasks,
(c) a ranking MLP with 8 objectives (on CUDA at the sizes users train: B=256 64x64, B=8
128x128, B=4096; on the CPU scaled down, see ``MODELS``). PCGrad's random task orders come
from its seed: each check uses a fresh ``PCGrad(seed=0)``, so every contender drawing the same
orders (mtlfast's modes, the per-task loop) is compared; on CUDA each record also has the
memory the step allocates.
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
from .step_models import MODELS, build

__all__ = ["TrunkModel", "cases"]

#: methods measured (whichever exist); --quick uses the first available one
STEP_METHODS = ("UPGrad", "PCGrad", "MGDA", "Mean")
#: methods on the named models (``step_models``)
NAMED_METHODS = ("UPGrad", "PCGrad", "MGDA")
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
    Linear(widths[-1], 1)."""

    def __init__(self, in_features: int, widths: tuple[int, ...], num_tasks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for d_in, d_out in zip((in_features, *widths), widths, strict=False):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(widths[-1], 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(T scalar losses, features z)``: one loss per task, each computed from its own
        head alone (task graphs that only meet at z, as torchjd's mtl_backward requires)."""
        z = self.trunk(x)
        return [((h(z).squeeze(1) - y[:, t]) ** 2).mean() for t, h in enumerate(self.heads)], z

    def batch(self, size: int, in_features: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed batch ``(x, y)`` of ``size`` samples for this model's tasks."""
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(size, in_features, generator=gen)
        y = torch.randn(size, len(self.heads), generator=gen)
        return x.to(device), y.to(device)


def _method_factory(method_cls: type) -> Callable[[], Any]:
    """Fresh instances; a random method seeded, so two instances draw the same orders."""
    import inspect

    if "seed" in inspect.signature(method_cls).parameters:
        return lambda: method_cls(seed=0)
    return method_cls


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in model.parameters()]


def _stepper(model: nn.Module, x: torch.Tensor, y: Any,
             backward: Callable[[list[torch.Tensor], torch.Tensor], None]
             ) -> Callable[[], list[torch.Tensor]]:
    def run() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        losses, z = model(x, y)
        backward(losses, z)
        return _grads(model)

    return run


def _mlp_contenders(method_name: str, method_cls: type, model_args: tuple[Any, ...],
                    batch: int, cfg: Config) -> list[Contender]:
    torch.manual_seed(0)
    model = TrunkModel(*model_args).to(cfg.device)
    return _contenders_for(method_name, method_cls, model,
                           *model.batch(batch, model_args[0], cfg.device), cfg)


def _graph_contender(model: nn.Module, x: torch.Tensor, y: Any,
                     make_method: Callable[[], Any]) -> Contender:
    """mtlfast's jacobian step captured once in a CUDA graph and replayed (the user guide's
    recipe, ``on_nonfinite="skip"``), on a copy of the model with the same weights; checked
    against an eager twin that took the same warm-up steps (PCGrad's device-side counter then
    draws the same task orders in both)."""
    import copy

    import mtlfast

    name = "mtlfast CUDA graph"

    def engine_for(m: nn.Module) -> Any:
        return mtlfast.MTLBackward(m.trunk, make_method(), mode="jacobian",
                                   on_nonfinite="skip")

    captured, twin = copy.deepcopy(model), copy.deepcopy(model)
    engine, twin_engine = engine_for(captured), engine_for(twin)
    sx = x.clone()
    sy = tuple(t.clone() for t in y) if isinstance(y, tuple) else y.clone()

    def step() -> None:
        losses, z = captured(sx, sy)
        engine.backward(losses, features=z)

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: buffers, the batching decision
            for _ in range(3):
                captured.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream().wait_stream(side)
        captured.zero_grad(set_to_none=True)  # the replays overwrite these .grad buffers
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except Exception as exc:  # reported as this contender's error, not the case's
        why = f"capture failed: {type(exc).__name__}: {exc}"

        def failed() -> list[torch.Tensor]:
            raise RuntimeError(why)

        return Contender(name, run=failed)
    for _ in range(3):
        twin.zero_grad(set_to_none=True)
        losses, z = twin(x, y)
        twin_engine.backward(losses, features=z)

    def replay() -> list[torch.Tensor]:
        graph.replay()
        return _grads(captured)

    def eager_twin() -> list[torch.Tensor]:
        twin.zero_grad(set_to_none=True)
        losses, z = twin(x, y)
        twin_engine.backward(losses, features=z)
        return _grads(twin)

    return Contender(name, run=replay, expect=eager_twin,
                     note="jacobian step captured once, replayed; memory pool not in peak")


def _contenders_for(method_name: str, method_cls: type, model: nn.Module, x: torch.Tensor,
                    y: Any, cfg: Config) -> list[Contender]:
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

    if cfg.device.type == "cuda":
        out.append(_graph_contender(model, x, y, make_method))
    out.append(Contender("sum().backward()", run=_stepper(
        model, x, y, lambda losses, z: torch.stack(losses).sum().backward()),
        floor=True, note="linear scalarization: the floor, another update"))
    return out


def cases(cfg: Config) -> Iterator[Case]:
    """On CUDA or in full runs the named models first (``step_models``: what a time limit
    should cut last), then a T sweep (number of heads) at fixed trunk width and a width sweep
    (P) at fixed T of the MLP trunk."""
    sizes = SIZES[cfg.sizes]
    found = discover_methods()
    if cfg.device.type == "cuda" or cfg.sizes == "full":
        size = "gpu" if cfg.device.type == "cuda" else "cpu"
        for label, specs in MODELS.items():
            spec = specs[size]
            for name in [n for n in NAMED_METHODS if n in found]:
                yield Case(
                    suite="step", method=name, label=f"{label}: {spec.label()}",
                    params={"model": spec.kind, "T": spec.tasks, "width": spec.width,
                            "B": spec.batch, "image": spec.image},
                    rtol=1e-3, headline=True,
                    build=lambda name=name, spec=spec: _contenders_for(
                        name, found[name], *build(spec, cfg.device), cfg),
                )
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
                build=lambda name=name, T=T, W=W: _mlp_contenders(
                    name, found[name], (D, (W, W), T), B, cfg),
            )
