"""Suite ``step``: one training step's forward + backward of a shared trunk with T heads.

Contenders on the same model and batch, each leaving the same gradients in ``.grad``:
``mtlfast.backward`` in its modes, the per-task loop of LibMTL-style trainers (T backward
passes with ``retain_graph``, gradients flattened, the method applied; from
``mtlfast.baselines``), torchjd's ``mtl_backward`` + ``jac_to_grad``, and linear
scalarization ``sum(losses).backward()`` as the floor (a different, cheaper update).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from . import _contenders
from .harness import Case, Config, Contender, human
from .methods_suite import _torchjd_factory, discover_methods

__all__ = ["TrunkModel", "cases"]

#: deterministic methods measured (whichever exist); --quick uses the first available one
STEP_METHODS = ("UPGrad", "MGDA", "Mean")
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"T": (2, 3), "W_at_T": 16, "W": (8, 16), "T_at_W": 2, "D": 8, "B": 4,
             "headline": (3, 16)},
    "quick": {"T": (2, 8, 32), "W_at_T": 256, "W": (64, 256, 1024), "T_at_W": 8, "D": 64,
              "B": 64, "headline": (32, 256)},
    "full": {"T": (2, 8, 32, 128), "W_at_T": 512, "W": (128, 512, 2048), "T_at_W": 8,
             "D": 256, "B": 128, "headline": (32, 512)},
}


class TrunkModel(nn.Module):
    """An MLP trunk (D -> W -> W, ReLU) with T regression heads Linear(W, 1)."""

    def __init__(self, in_features: int, width: int, num_tasks: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(),
                                   nn.Linear(width, width), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(T scalar losses, features z)``: one MSE loss per task, each computed from its own
        head alone (task graphs that only meet at z, as torchjd's mtl_backward requires)."""
        z = self.trunk(x)
        losses = [((h(z).squeeze(1) - y[:, t]) ** 2).mean() for t, h in enumerate(self.heads)]
        return losses, z


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


def _per_task_loop(method_cls: type, model: TrunkModel, shared: list[nn.Parameter],
                   step: Callable[[Callable[[list[torch.Tensor], torch.Tensor], None]],
                                  Callable[[], list[torch.Tensor]]]) -> Contender:
    """The LibMTL pattern: ``mtlfast.baselines.per_task_backward`` when the package has it,
    else ``benchmarks/baselines/per_task_loop.py`` of the source checkout."""
    note = "T backward passes with retain_graph, flatten, method (LibMTL pattern)"
    method = method_cls()
    pkg, why_pkg = _contenders.optional("mtlfast.baselines")
    if pkg is not None and hasattr(pkg, "per_task_backward"):
        return Contender("per-task loop", note=note, run=step(
            lambda losses, z: pkg.per_task_backward(losses, shared, method)))
    base, why = _contenders.baselines()
    if base is not None and hasattr(base, "per_task_loop_backward"):
        heads = [p for h in model.heads for p in h.parameters()]
        return Contender("per-task loop", note=note, run=step(
            lambda losses, z: base.per_task_loop_backward(losses, shared, method, heads)))
    return Contender("per-task loop", unavailable=why or why_pkg)


def _contenders_for(method_name: str, method_cls: type, T: int, W: int, cfg: Config
                    ) -> list[Contender]:
    sizes = SIZES[cfg.sizes]
    torch.manual_seed(0)
    model = TrunkModel(sizes["D"], W, T).to(cfg.device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sizes["B"], sizes["D"], generator=gen).to(cfg.device)
    y = torch.randn(sizes["B"], T, generator=gen).to(cfg.device)
    shared = list(model.trunk.parameters())
    step = lambda fn: _stepper(model, x, y, fn)  # noqa: E731
    out: list[Contender] = []

    import mtlfast

    api = getattr(mtlfast, "backward", None)
    for mode in ("jacobian", "gramian", "features"):
        name = f"mtlfast {mode}"
        if api is None:
            out.append(Contender(name, unavailable="mtlfast.backward not built yet",
                                 reference=mode == "jacobian"))
            continue
        method = method_cls()

        def run_api(losses: list[torch.Tensor], z: torch.Tensor, mode: str = mode,
                    method: Any = method) -> None:
            api(losses, model.trunk, method=method, features=z, mode=mode)

        out.append(Contender(
            name, run=step(run_api), reference=mode == "jacobian",
            floor=mode == "features",
            note="Gram of dL/dz only (MGDA-UB objective)" if mode == "features" else ""))

    out.append(_per_task_loop(method_cls, model, shared, step))

    autojac, why = _contenders.torchjd_autojac()
    make_jd, why_agg = _torchjd_factory(method_name, method_cls(), T)
    if autojac is None or make_jd is None:
        out.append(Contender("torchjd", unavailable=why or why_agg))
    else:
        aggregator = make_jd()
        heads = [list(h.parameters()) for h in model.heads]

        def run_jd(losses: list[torch.Tensor], z: torch.Tensor) -> None:
            autojac.mtl_backward(losses, features=z, tasks_params=heads,
                                 shared_params=shared)
            autojac.jac_to_grad(shared, aggregator)

        out.append(Contender("torchjd", run=step(run_jd),
                             note="mtl_backward + jac_to_grad"))

    out.append(Contender("sum().backward()",
                         run=step(lambda losses, z: torch.stack(losses).sum().backward()),
                         floor=True, note="linear scalarization: the floor, another update"))
    return out


def cases(cfg: Config) -> Iterator[Case]:
    """A T sweep (number of heads) at fixed trunk width, and a width sweep (P) at fixed T."""
    sizes = SIZES[cfg.sizes]
    found = discover_methods()
    names = [n for n in STEP_METHODS if n in found and getattr(found[n], "deterministic", True)]
    if cfg.sizes != "full":
        names = names[:1]
    points: dict[tuple[int, int], tuple[str, ...]] = {}
    for T in sizes["T"]:
        points[(T, sizes["W_at_T"])] = ("T",)
    for W in sizes["W"]:
        key = (sizes["T_at_W"], W)
        points[key] = points.get(key, ()) + ("P",)
    for name in names:
        for (T, W), sweeps in points.items():
            D = sizes["D"]
            P = D * W + W + W * W + W  # the trunk's (shared) parameters
            yield Case(
                suite="step", method=name, label=f"T={T} P={human(P)}",
                params={"T": T, "P": P, "width": W, "in_features": D, "B": sizes["B"]},
                sweeps=sweeps, headline=(T, W) == tuple(sizes["headline"]), rtol=1e-3,
                build=lambda name=name, T=T, W=W: _contenders_for(name, found[name], T, W, cfg),
            )
