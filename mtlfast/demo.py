"""``python -m mtlfast demo``: multi-task training on real bundled data, three ways side by side.

Runs the same model (a small trunk + :class:`mtlfast.FusedHeads`) from the same seed with
(1) ``mtlfast.backward`` and a gradient method, (2) linear scalarization (``sum(L).backward()``)
and, with ``--compare``, (3) the same method the slow way: the heads as a Python loop of
``nn.Linear`` and the per-task backward loop of :mod:`mtlfast.baselines` (LibMTL's pattern),
from the same initial weights. It reports each task's held-out metric, Delta_m% against
single-task models (:func:`mtlfast.metrics.delta_m`), steps per second and the speedup over
the slow way, and writes ``results.json``, ``curves.png`` and ``table.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import data as datasets
from . import methods as methods_module
from .baselines import per_task_backward
from .metrics import accuracy, delta_m, mae

# Data-set sizes: "tiny" for tests and CI, "default" for the demo, "small" for sweeps over
# many models and methods (QM9's first 20,000 molecules; the others as default).
SIZES = {
    "digits": {"tiny": dict(n_train=512, n_val=128, n_test=256), "small": {}, "default": {}},
    "speech": {"tiny": dict(n_voices=2, reps=4), "small": {}, "default": {}},
    "qm9": {"tiny": dict(limit=1000), "small": dict(limit=20000), "default": {}},
}
# Per data set: epochs, batch size, learning rate (Adam).
DEFAULTS = {"digits": (4, 128, 2e-3), "speech": (20, 32, 1e-3), "qm9": (10, 120, 1e-3)}
FEATURES = 128


class MTLModel(nn.Module):
    """Hard parameter sharing: a shared trunk and task heads; ``forward`` returns
    ``(z, {task: output})``, z the shared representation."""

    def __init__(self, trunk: nn.Module, heads: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = heads

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.trunk(x)
        return z, self.heads(z)

    def shared_parameters(self) -> list[nn.Parameter]:
        """What every task uses: the parameters the methods combine."""
        return list(self.trunk.parameters())


class ExpertModel(nn.Module):
    """A shared stem, an expert block (:mod:`mtlfast.arch`: per-task mixtures of experts) and
    heads reading each task's own mixture; ``forward`` returns ``(z, {task: output})`` with z
    the ``(T, B, D)`` mixtures."""

    def __init__(self, stem: nn.Module, block: nn.Module, heads: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.block = block
        self.heads = heads

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.block(self.stem(x))
        return z, self.heads(z, per_task=True)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The stem and the block's shared part (LibMTL's ``get_share_params``); the gates and
        task-specific experts get their ordinary gradients."""
        return [*self.stem.parameters(), *self.block.shared_parameters()]


ARCHS = ("hps", "mmoe", "ple")


def make_model(data: datasets.MTLData, tasks: list[datasets.Task], arch: str = "hps",
               fused: bool = True) -> nn.Module:
    """``hps``: trunk + heads. ``mmoe`` (4 experts) / ``ple`` (2 levels, 2 shared experts and 1
    per task): the trunk's convolutions (image data) as a shared stem, then MLP experts of the
    trunk's widths ending in ``FEATURES``. ``fused=False``: the loop definitions (LibMTL's),
    same initial weights."""
    from . import arch as archs

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if arch == "hps":
        return MTLModel(make_trunk(data), make_heads(tasks, fused))
    stem = make_trunk(data, stem_only=True)
    with torch.no_grad():
        width = stem(torch.zeros(1, *data.input_shape)).shape[-1]
    names = [t.name for t in tasks]
    if arch == "mmoe":
        block = archs.MMoE(width, 4, [256, FEATURES], names)
    else:
        block = archs.PLE(width, 2, 2, 1, [FEATURES], names)
    heads = make_heads(tasks, fused)
    return ExpertModel(stem, block if fused else block.unfuse(), heads)


def make_trunk(data: datasets.MTLData, stem_only: bool = False) -> nn.Module:
    """A small conv net for image-like inputs (C, H, W), an MLP for feature vectors.
    ``stem_only``: the convolutions and the flattening only (nothing for feature vectors)."""
    shape = data.input_shape
    if len(shape) == 1:
        if stem_only:
            return nn.Identity()
        return nn.Sequential(
            nn.Linear(shape[0], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
            nn.Linear(256, FEATURES), nn.ReLU(),
        )
    layers: list[nn.Module] = []
    channels, (h, w) = shape[0], shape[1:]
    for width in (16, 32):
        # Stride 2 on large maps (speech spectrograms), pooling down to a small map; the
        # 10x14 digit canvas keeps a 5x7 map.
        stride = 2 if h * w > 1024 else 1
        layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1), nn.ReLU()]
        channels, h, w = width, -(-h // stride), -(-w // stride)
        if h >= 8:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
    while h * w > 96:
        layers.append(nn.MaxPool2d(2))
        h, w = h // 2, w // 2
    layers.append(nn.Flatten())
    if not stem_only:
        layers += [nn.Linear(channels * h * w, FEATURES), nn.ReLU()]
    return nn.Sequential(*layers)


class LoopHeads(nn.Module):
    """The usual way: one ``nn.Linear`` per task, called in a Python loop."""

    def __init__(self, heads: nn.ModuleDict) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, z: torch.Tensor, per_task: bool = False) -> dict[str, torch.Tensor]:
        """``z``: the shared ``(B, D)`` features, or with ``per_task`` one row per task."""
        return {name: head(z[t] if per_task else z)
                for t, (name, head) in enumerate(self.heads.items())}


def make_heads(tasks: list[datasets.Task], fused: bool = True) -> nn.Module:
    """Linear heads, fused (:func:`mtlfast.fuse_heads`) or looped; same initial weights."""
    heads = nn.ModuleDict({t.name: nn.Linear(FEATURES, t.out_features) for t in tasks})
    if not fused:
        return LoopHeads(heads)
    from . import fuse_heads

    return fuse_heads(heads)


def task_losses(
    tasks: list[datasets.Task], outputs: dict[str, torch.Tensor], y: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Cross-entropy for classification, MSE on the standardized target for regression."""
    return {
        t.name: F.cross_entropy(outputs[t.name], y[t.name]) if t.kind == "classification"
        else F.mse_loss(outputs[t.name].squeeze(-1), y[t.name])
        for t in tasks
    }


@torch.no_grad()
def evaluate(model: MTLModel, data: datasets.MTLData, split: datasets.Split,
             tasks: list[datasets.Task], device: str, batch_size: int = 2048) -> dict[str, float]:
    """Each task's held-out metric (accuracy, or MAE in the data's units) on ``split``."""
    model.eval()
    outs: dict[str, list[torch.Tensor]] = {t.name: [] for t in tasks}
    for x, _ in split.batches(batch_size):
        _, out = model(x.to(device))
        for t in tasks:
            outs[t.name].append(out[t.name].float().cpu())
    model.train()
    result = {}
    for t in tasks:
        pred = torch.cat(outs[t.name])
        result[t.name] = (accuracy(pred, split.y[t.name]) if t.kind == "classification"
                          else mae(pred, split.y[t.name], data.target_scale.get(t.name, 1.0)))
    return result


def resolve_method(name: str, num_tasks: int) -> methods_module.Method:
    """The demo's ``--method``: ``mtlfast.methods.get`` with the data set's T."""
    return methods_module.get(name, num_tasks=num_tasks)


# One backward step: (losses by task, shared features z, model) -> None. The only place
# where the three ways differ.
BackwardStep = Callable[[dict[str, torch.Tensor], torch.Tensor, MTLModel], None]


def ls_step(losses, z, model) -> None:
    """Linear scalarization: one ordinary backward of the summed losses."""
    sum(losses.values()).backward()


def engine_step(method: methods_module.Method, mode: str = "auto") -> BackwardStep:
    import mtlfast

    def step(losses, z, model) -> None:
        mtlfast.backward(losses, model.shared_parameters(), method=method, features=z,
                         mode=mode)

    return step


def slow_step(method: methods_module.Method) -> BackwardStep:
    def step(losses, z, model) -> None:
        per_task_backward(losses, model.shared_parameters(), method)

    return step


def torchjd_step(method_name: str, num_tasks: int) -> tuple[BackwardStep | None, str]:
    """torchjd's ``mtl_backward`` + ``jac_to_grad`` with its aggregator of the same name (loop
    heads: torchjd needs each task's own parameters); None and why when unavailable."""
    from .bench import _contenders
    from .bench.methods_suite import torchjd_factory

    method = resolve_method(method_name, num_tasks)
    autojac, why = _contenders.torchjd_autojac()
    make, why_agg = torchjd_factory(type(method).__name__, method, num_tasks)
    if autojac is None or make is None:
        return None, why or why_agg
    aggregator = make()

    def step(losses, z, model) -> None:
        shared = model.shared_parameters()
        heads = [list(h.parameters()) for h in model.heads.heads.values()]
        autojac.mtl_backward(list(losses.values()), features=z, tasks_params=heads,
                             shared_params=shared)
        autojac.jac_to_grad(shared, aggregator)

    return step, ""


@dataclass
class RunResult:
    """One training run: held-out metrics, speed, and per-epoch curves."""

    name: str
    tasks: list[str]
    test: dict[str, float]
    steps: int
    train_seconds: float
    #: Per task: the untrained model's loss, then each epoch's mean training loss.
    loss_curves: dict[str, list[float]] = field(default_factory=dict)
    #: Per task: the validation metric after each epoch.
    val_curves: dict[str, list[float]] = field(default_factory=dict)

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.train_seconds if self.train_seconds > 0 else float("nan")


def train(
    data: datasets.MTLData,
    name: str,
    backward_step: BackwardStep,
    *,
    tasks: list[datasets.Task] | None = None,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str = "cpu",
    progress: bool = True,
    method: methods_module.Method | None = None,
    fused_heads: bool = True,
    arch: str = "hps",
) -> RunResult:
    """Train a fresh model (seeded by ``seed``) with ``backward_step``; time the steps only.

    ``method`` is the method inside ``backward_step``, when it asks for the losses after the
    optimizer step (FAMO's paper variant, ``post_step_losses="extra_forward"``): they are
    recomputed on the same batch and passed to ``method.update``, as the paper does.
    ``arch``: the model (:func:`make_model`); ``fused_heads=False`` builds its loop definition.
    """
    post_step = (method.update if getattr(method, "post_step_losses", None) == "extra_forward"
                 else None)
    tasks = list(tasks or data.tasks)
    torch.manual_seed(seed)
    model = make_model(data, tasks, arch, fused_heads).to(device)
    # Methods with learnable parameters (UW's log-variances) train with the model.
    extra = list(method.parameters()) if method is not None else []
    optimizer = torch.optim.Adam(list(model.parameters()) + extra, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(data.train) // batch_size)
    bar = _progress(epochs * steps_per_epoch, name, progress)
    result = RunResult(name, [t.name for t in tasks], {}, 0, 0.0,
                       {t.name: [] for t in tasks}, {t.name: [] for t in tasks})
    # Epoch 0 of the loss curves: the untrained model on (up to) 2048 training examples.
    with torch.no_grad():
        x0, y0 = next(data.train.batches(2048))
        for k, v in task_losses(tasks, model(x0.to(device))[1],
                                {k: v.to(device) for k, v in y0.items()}).items():
            result.loss_curves[k].append(v.item())
    for _ in range(epochs):
        sums = dict.fromkeys(result.tasks, 0.0)
        start = time.perf_counter()
        for x, y in data.train.batches(batch_size, gen):
            x, y = x.to(device), {k: v.to(device) for k, v in y.items()}
            optimizer.zero_grad(set_to_none=True)
            z, out = model(x)
            losses = task_losses(tasks, out, y)
            backward_step(losses, z, model)
            optimizer.step()
            if post_step is not None:
                with torch.no_grad():
                    post_step(torch.stack(list(task_losses(tasks, model(x)[1], y).values())))
            for k, v in losses.items():
                sums[k] += v.item()
            result.steps += 1
            bar.update(1)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        result.train_seconds += time.perf_counter() - start
        for k in result.tasks:
            result.loss_curves[k].append(sums[k] / steps_per_epoch)
        for k, v in evaluate(model, data, data.val, tasks, device).items():
            result.val_curves[k].append(v)
    bar.close()
    result.test = evaluate(model, data, data.test, tasks, device)
    return result


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{desc:<22}", disable=not enabled, leave=True,
                dynamic_ncols=True)


# Bump when the model, loss or training recipe changes: invalidates cached single-task runs.
_RECIPE_VERSION = 1


def single_task_baselines(data: datasets.MTLData, size: str, *, epochs: int, batch_size: int,
                          lr: float, seed: int, device: str, progress: bool,
                          fresh: bool = False, fused_heads: bool = True) -> dict[str, float]:
    """Each task's test metric when trained alone (same trunk and recipe), cached on disk.

    The cache key is every input of the runs (data set, size, recipe, seed, device); cached
    numbers were produced by this function, never typed in. ``fresh`` recomputes them.
    """
    key = json.dumps([_RECIPE_VERSION, data.name, size, epochs, batch_size, lr, seed, device,
                      fused_heads, torch.__version__])
    path = datasets.cache_dir() / f"single_task_{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    if path.exists() and not fresh:
        return json.loads(path.read_text())["test"]
    test: dict[str, float] = {}
    for task in data.tasks:
        run = train(data, f"single-task {task.name}", ls_step, tasks=[task], epochs=epochs,
                    batch_size=batch_size, lr=lr, seed=seed, device=device, progress=progress,
                    fused_heads=fused_heads)
        test.update(run.test)
    path.write_text(json.dumps({"key": key, "test": test}, indent=1))
    return test


def run_demo(args: argparse.Namespace) -> dict:
    """Train, compare, report and save; returns the JSON-able summary."""
    epochs, batch_size, lr = DEFAULTS[args.data]
    epochs = args.epochs or epochs
    batch_size = args.batch_size or batch_size
    lr = args.lr or lr
    method_name = args.method
    resolve_method(method_name, 1)  # fail fast on a bad name, before loading data
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    data = datasets.load(args.data, **SIZES[args.data][args.size])
    progress = not args.no_progress
    print(f"{data.description}\ntrain/val/test = {len(data.train)}/{len(data.val)}/"
          f"{len(data.test)}, {epochs} epochs, batch {batch_size}, Adam lr {lr}, "
          f"device {args.device}, seed {args.seed}, model {args.arch}")
    common = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=args.seed,
                  device=args.device, progress=progress)
    T = len(data.tasks)
    # Single-task baselines are the hps trunk on one task whatever the MTL model is.
    model = dict(arch=args.arch)

    def fresh_method() -> methods_module.Method:
        torch.manual_seed(args.seed)  # every run's method draws the same seed
        return resolve_method(method_name, T)

    method = fresh_method()
    name = type(method).__name__
    runs = [train(data, f"mtlfast {name}", engine_step(method), method=method, **common, **model),
            train(data, "linear scalarization", ls_step, **common, **model)]
    notes = {}
    if args.compare:
        slow = fresh_method()
        runs.append(train(data, f"slow {name}", slow_step(slow), method=slow, fused_heads=False,
                          **common, **model))
        notes["first_step_difference"] = first_step_difference(data, method_name, batch_size,
                                                               args.seed, args.device, args.arch)
        if method.needs == "gram":
            features = fresh_method()
            runs.append(train(data, f"mtlfast {name} features", engine_step(features, "features"),
                              method=features, **common, **model))
        jd_step, why = torchjd_step(method_name, T) if args.arch == "hps" else (
            None, "the demo gives torchjd's mtl_backward each task's own parameters for hard "
            "parameter sharing only (it does not map an expert block's gates to their tasks)")
        if jd_step is None:
            notes["torchjd"] = f"not run: {why}"
        else:
            runs.append(train(data, f"torchjd {name}", jd_step, fused_heads=False, **common))
    baseline = single_task_baselines(data, args.size, fresh=args.fresh_baselines, **common)
    summary = _summary(data, runs, baseline, vars(args) | dict(epochs=epochs,
                       batch_size=batch_size, lr=lr))
    summary["notes"] = notes
    print(format_table(summary))
    print(explain(summary))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    _plot_curves(runs, data, out / "curves.png")
    _plot_table(format_table(summary), out / "table.png")
    print(f"wrote {out / 'results.json'}, {out / 'curves.png'}, {out / 'table.png'}")
    return summary


def first_step_difference(data: datasets.MTLData, method_name: str, batch_size: int, seed: int,
                          device: str, arch: str = "hps") -> float:
    """Relative difference of the update below the heads (trunk; stem and expert block)
    between mtlfast and the slow way on the first batch, from the same initial weights: the
    two compute the same step. The fused blocks' ``state_dict`` uses the loop definitions'
    keys, so the gradients are compared key by key."""
    grads = []
    for fused, make_step in ((True, engine_step), (False, slow_step)):
        torch.manual_seed(seed)
        model = make_model(data, data.tasks, arch, fused).to(device)
        torch.manual_seed(seed)
        step = make_step(resolve_method(method_name, len(data.tasks)))
        x, y = next(data.train.batches(batch_size, torch.Generator().manual_seed(seed)))
        x, y = x.to(device), {k: v.to(device) for k, v in y.items()}
        z, out = model(x)
        step(task_losses(data.tasks, out, y), z, model)
        with torch.no_grad():  # the gradients in the parameters' place, keyed as checkpoints
            for p in model.parameters():
                p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
        keyed = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.")}
        grads.append(torch.cat([keyed[k].reshape(-1) for k in sorted(keyed)]))
    return float((grads[0] - grads[1]).norm() / grads[1].norm().clamp_min(1e-30))


def explain(summary: dict) -> str:
    """What the speeds and the ways' differences mean on the machine the demo ran on."""
    runs = {r["name"]: r for r in summary["runs"]}
    lines = []
    device = summary["config"].get("device", "cpu")
    if device == "cpu":
        lines.append(
            "Why these speeds: on a CPU an exact per-task-gradient step costs T backward passes "
            "whichever way they run (batching saves kernel launches, which a CPU barely has), "
            "so mtlfast's exact step runs about as fast as the per-task loop here; its speedups "
            "in exact mode come from batching the T passes on a GPU. Features mode needs one "
            "backward: about linear scalarization's cost.")
    diff = summary.get("notes", {}).get("first_step_difference")
    if diff is not None:
        lines.append(
            f"Why the slow way may end elsewhere: from the same seed and weights it computes the "
            f"same first update (relative difference {diff:.1e} on the first batch), in another "
            "floating-point order; over the whole run these rounding differences grow (training "
            "is chaotic), so its final metrics differ by about what another seed would give.")
    if any(name.endswith(" features") for name in runs):
        lines.append("Features mode weighs the tasks on the Gram of dL/dZ (the MGDA-UB "
                     "approximation), not the exact step: its metrics may differ.")
    why = summary.get("notes", {}).get("torchjd")
    if why:
        lines.append(f"torchjd: {why}")
    return "\n".join(lines)


def _summary(data, runs: list[RunResult], baseline: dict[str, float], config: dict) -> dict:
    higher = {t.name: t.higher_is_better for t in data.tasks}
    rows = []
    for run in runs:
        row = asdict(run) | {"steps_per_second": run.steps_per_second,
                             "delta_m": delta_m(run.test, baseline, higher)}
        rows.append(row)
    summary = {
        "data": data.name,
        "description": data.description,
        "config": {k: v for k, v in config.items() if k != "func"},
        "tasks": [{"name": t.name, "metric": t.metric, "higher_is_better": t.higher_is_better}
                  for t in data.tasks],
        "single_task": baseline,
        "runs": rows,
    }
    for other, key in (("slow", "speedup_over_slow"), ("torchjd", "speedup_over_torchjd")):
        match = [r for r in runs[1:] if r.name.startswith(other + " ")]
        if match:
            summary[key] = runs[0].steps_per_second / match[0].steps_per_second
    return summary


def format_table(summary: dict) -> str:
    """The per-task table: single-task, then one column per run; Delta_m% and steps/s below."""
    names = ["single-task"] + [r["name"] for r in summary["runs"]]
    labels = [f"{t['name']} ({'acc' if t['metric'] == 'accuracy' else t['metric']} "
              f"{'up' if t['higher_is_better'] else 'down'})" for t in summary["tasks"]]
    first = max(len("Delta_m% (lower better)"), *(len(label) for label in labels)) + 1
    width = max(len(n) for n in names) + 2
    head = f"{'task (metric, better)':<{first}}" + "".join(f"{n:>{width}}" for n in names)
    lines = [head, "-" * len(head)]
    for label, task in zip(labels, summary["tasks"], strict=True):
        values = [summary["single_task"][task["name"]]] + [r["test"][task["name"]]
                                                          for r in summary["runs"]]
        lines.append(f"{label:<{first}}" + "".join(f"{v:>{width}.4g}" for v in values))
    lines.append("-" * len(head))
    lines.append(f"{'Delta_m% (lower better)':<{first}}" + f"{0.0:>{width}.2f}"
                 + "".join(f"{r['delta_m']:>+{width}.2f}" for r in summary["runs"]))
    lines.append(f"{'train steps/s':<{first}}" + f"{'':>{width}}"
                 + "".join(f"{r['steps_per_second']:>{width}.1f}" for r in summary["runs"]))
    if "speedup_over_slow" in summary:
        lines.append(f"speedup of {summary['runs'][0]['name']} over the slow way (per-task "
                     f"backward loop, same method): {summary['speedup_over_slow']:.2f}x")
    if "speedup_over_torchjd" in summary:
        lines.append(f"speedup of {summary['runs'][0]['name']} over torchjd (mtl_backward, same "
                     f"method): {summary['speedup_over_torchjd']:.2f}x")
    return "\n".join(lines)


def _plot_curves(runs: list[RunResult], data, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = data.tasks
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.2 * len(tasks), 5.5), squeeze=False)
    for j, task in enumerate(tasks):
        for run in runs:
            epochs = range(len(run.loss_curves[task.name]))
            # Markers: a one-epoch run has one validation point, which a line alone hides.
            axes[0, j].plot(epochs, run.loss_curves[task.name], marker="o", markersize=3,
                            label=run.name)
            axes[1, j].plot(epochs[1:], run.val_curves[task.name], marker="o", markersize=3,
                            label=run.name)
        axes[0, j].set_title(task.name)
        axes[0, j].set_yscale("log")
        axes[1, j].set_xlabel("epoch")
    axes[0, 0].set_ylabel("train loss")
    axes[1, 0].set_ylabel(f"val {tasks[0].metric}")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(data.description, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_table(text: str, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = text.splitlines()
    fig = plt.figure(figsize=(0.085 * max(len(line) for line in lines), 0.22 * len(lines) + 0.3))
    fig.text(0.01, 0.5, text, family="monospace", fontsize=9, va="center")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    parser.add_argument("--data", choices=sorted(datasets.LOADERS), default="digits",
                        help="the bundled data set: digits (MultiDigits, 4 tasks), speech "
                        "(SpokenDigits, 3 tasks, needs espeak-ng) or qm9 (11 regression "
                        "targets, needs qm9pack)")
    parser.add_argument("--arch", choices=ARCHS, default="hps",
                        help="the model: hps (hard parameter sharing: trunk + fused heads), "
                        "mmoe or ple (fused expert blocks of mtlfast.arch on a shared stem)")
    parser.add_argument("--method", default="upgrad",
                        help="a method name, as mtlfast.methods.get takes it (one of "
                        "mtlfast.methods.available(); default: upgrad)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default depends on --data)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="mini-batch size (default depends on --data)")
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam learning rate (default depends on --data)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights, the batch order and the method's randomness")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="also train the same method the slow way (per-task loop), in "
                        "features mode, and with torchjd when installed")
    parser.add_argument("--size", choices=("tiny", "small", "default"), default="default",
                        help="data set size: tiny is for tests and CI; small is QM9's first "
                        "20,000 molecules (the others as default)")
    parser.add_argument("--out", default="mtlfast-demo", help="folder for JSON and PNG output")
    parser.add_argument("--fresh-baselines", action="store_true",
                        help="retrain the single-task baselines instead of using the cache")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: the demo's models are small, "
                        "and one thread avoids OpenMP oversubscription on shared machines)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
