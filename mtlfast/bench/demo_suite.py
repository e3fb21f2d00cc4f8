"""Suite ``demo``: one training step of the demo's own models on its bundled data sets.

Contenders on the same weights and batch (the demo's trunk, ``mtlfast.demo.make_trunk``, and
its batch size; a step is zero_grad + forward + losses + backward, no optimizer step):
``mtlfast.MTLBackward`` with each per-task vjp strategy (``auto`` is the reference, decided
during the build; ``batched``, ``loop``), the demo's slow way (``mtlfast.demo.slow_step``:
looped heads and the per-task loop of :mod:`mtlfast.baselines`) and linear scalarization
(``mtlfast.demo.ls_step``, the floor). The shared trunk's gradients are compared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .harness import Case, Config, Contender

__all__ = ["VARIANTS", "cases", "step_functions"]

#: contender name per variant
VARIANTS = {"ls": "LS (sum().backward())", "slow": "slow way", "batched": "mtlfast vjp=batched",
            "loop": "mtlfast vjp=loop", "auto": "mtlfast vjp=auto"}
#: data sets per size profile (each run when its loader is available), and the data size
DATA = {"tiny": (("digits",), "tiny"), "quick": (("digits",), "default"),
        "full": (("digits", "qm9", "speech"), "default")}


def step_functions(data_name: str, method_name: str, device: torch.device, size: str = "default"
                   ) -> tuple[dict[str, Callable[[], torch.Tensor]], str]:
    """``({variant: step}, the vjp strategy "auto" chose)``; each step returns the trunk's
    flattened gradient. ``auto`` is run until it has decided."""
    import mtlfast
    from mtlfast import data as datasets
    from mtlfast import demo
    from mtlfast.engine.vjp import AUTO_TRIALS

    data = datasets.load(data_name, **demo.SIZES[data_name][size])
    batch_size = demo.DEFAULTS[data_name][1]
    x, y = next(iter(data.train.batches(batch_size, torch.Generator().manual_seed(0))))
    x = x.to(device)
    y = {k: v.to(device) for k, v in y.items()}
    steps: dict[str, Callable[[], torch.Tensor]] = {}
    engines = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = demo.MTLModel(demo.make_trunk(data),
                              demo.make_heads(data.tasks, variant != "slow")).to(device)
        method = demo.resolve_method(method_name, len(data.tasks))
        if variant == "ls":
            backward = demo.ls_step
        elif variant == "slow":
            backward = demo.slow_step(method)
        else:
            engine = engines[variant] = mtlfast.MTLBackward(model.trunk, method, vjp=variant)
            backward = lambda losses, z, model, e=engine: e.backward(losses, z)  # noqa: E731

        def step(model=model, backward=backward) -> torch.Tensor:
            model.zero_grad(set_to_none=True)
            z, out = model(x)
            backward(demo.task_losses(data.tasks, out, y), z, model)
            return torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])

        steps[variant] = step
    for _ in range(2 * (AUTO_TRIALS + 1)):
        steps["auto"]()
    return steps, str(engines["auto"]._trunk.choice)


def _contenders(data_name: str, size: str, device: torch.device) -> list[Contender]:
    try:
        steps, choice = step_functions(data_name, "upgrad", device, size)
    except ImportError as exc:  # the data set's optional dependency (espeak-ng, qm9pack)
        return [Contender(name, unavailable=str(exc).splitlines()[0], reference=v == "auto")
                for v, name in VARIANTS.items()]
    return [Contender(VARIANTS[v], run=fn, reference=v == "auto", floor=v == "ls",
                      note={"auto": f"chose {choice}",
                            "ls": "linear scalarization: the floor, another update"}.get(v, ""))
            for v, fn in steps.items()]


def cases(cfg: Config) -> Iterator[Case]:
    from mtlfast import data as datasets

    names, size = DATA[cfg.sizes]
    for name in names:
        if name not in datasets.LOADERS:
            continue
        yield Case("demo", "UPGrad", f"{name} ({size})", {"data": name, "size": size},
                   rtol=1e-4, headline=name == "digits",
                   build=lambda name=name: _contenders(name, size, cfg.device))
