"""Time per training step (forward + backward) of the ways to get a multi-task update.

(a) ``sum(losses).backward()`` (linear scalarization), (b) per-task loop of backward with
``retain_graph`` + flatten + method (the LibMTL pattern, baselines/per_task_loop.py), (c) torchjd
0.18 ``mtl_backward`` + ``jac_to_grad``, (d) ``mtlfast.MTLBackward`` in jacobian / gramian /
features mode; the same method (UPGrad, PCGrad) for (b), (c), (d), with the update checked equal.

Models: "celeba" (conv trunk with BatchNorm, ~0.46M shared parameters, 40 binary heads,
64x64 inputs, batch 64) and "dense3" (MLP trunk, ~0.46M shared parameters, 3 regression heads,
batch 64).

Run:
  python benchmarks/bench_step.py [--threads 2] [--reps 5] [--models celeba,dense3]
      prints a markdown table of medians, the update checks, and peak RSS per variant (each
      variant in a fresh subprocess);
  pytest benchmarks/bench_step.py --benchmark-only   (pytest-benchmark, same cases);
  run_step_gpu_bench()  from Python on a CUDA machine: CUDA-event timings + peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mtlfast  # noqa: E402
from benchmarks.baselines.per_task_loop import per_task_loop_backward  # noqa: E402
from mtlfast import methods  # noqa: E402

VARIANTS = ["sum", "loop", "torchjd", "jacobian", "gramian", "features"]
METHODS = ["UPGrad", "PCGrad"]


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class MultiTaskModel(nn.Module):
    """trunk -> Z -> T heads; ``forward(x, y) -> (losses, Z)``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "celeba":
            self.trunk = nn.Sequential(_conv_bn(3, 32), _conv_bn(32, 64), _conv_bn(64, 128),
                                       _conv_bn(128, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                       nn.Linear(256, 256), nn.ReLU())
            self.heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(40))
        elif kind == "dense3":
            self.trunk = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512),
                                       nn.ReLU(), nn.Linear(512, 256), nn.ReLU())
            self.heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(3))
        else:
            raise ValueError(f"kind must be 'celeba' or 'dense3', got {kind!r}")

    def batch(self, size: int = 64, device: str = "cpu", seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        T = len(self.heads)
        if self.kind == "celeba":
            x = torch.randn(size, 3, 64, 64, generator=g)
            y = torch.randint(0, 2, (size, T), generator=g).float()
        else:
            x = torch.randn(size, 128, generator=g)
            y = torch.randn(size, T, generator=g)
        return x.to(device), y.to(device)

    def forward(self, x, y):
        z = self.trunk(x)
        out = [h(z).squeeze(-1) for h in self.heads]
        if self.kind == "celeba":
            losses = [nn.functional.binary_cross_entropy_with_logits(o, y[:, t])
                      for t, o in enumerate(out)]
        else:
            losses = [nn.functional.mse_loss(o, y[:, t]) for t, o in enumerate(out)]
        return losses, z


def _method(name: str) -> methods.Method:
    # Seeded: randomized methods (PCGrad's orders) then give the same update in every variant.
    return methods.PCGrad(seed=0) if name == "PCGrad" else getattr(methods, name)()


def _torchjd_aggregator(method: str):
    from torchjd import aggregation

    return getattr(aggregation, method)()


def make_step(variant: str, model: MultiTaskModel, method: str) -> Callable[[object], None]:
    """A closure doing zero_grad + forward + the variant's backward on a batch ``(x, y)``."""
    shared = list(model.trunk.parameters())
    heads = list(model.heads.parameters())
    if variant == "sum":
        def step(batch):
            model.zero_grad(set_to_none=True)
            losses, _ = model(*batch)
            sum(losses).backward()
    elif variant == "loop":
        m = _method(method)

        def step(batch):
            model.zero_grad(set_to_none=True)
            losses, _ = model(*batch)
            per_task_loop_backward(losses, shared, m, heads)
    elif variant == "torchjd":
        from torchjd.autojac import jac_to_grad, mtl_backward

        agg = _torchjd_aggregator(method)

        def step(batch):
            model.zero_grad(set_to_none=True)
            losses, z = model(*batch)
            mtl_backward(losses, features=z, shared_params=shared)
            jac_to_grad(shared, agg)
    else:
        engine = mtlfast.MTLBackward(shared, _method(method), mode=variant)

        def step(batch):
            model.zero_grad(set_to_none=True)
            losses, z = model(*batch)
            engine.backward(losses, features=z)
    return step


def _grad_vector(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).double().cpu() for p in model.parameters()
                      if p.grad is not None])


def update_errors(kind: str, method: str, device: str = "cpu",
                  variants: tuple[str, ...] = ("torchjd", "jacobian", "gramian", "features"),
                  ) -> dict[str, float]:
    """Relative difference of each variant's gradients from the per-task loop's (one step)."""
    torch.manual_seed(0)
    model = MultiTaskModel(kind).to(device)
    batch = model.batch(device=device)
    out = {}
    make_step("loop", model, method)(batch)
    ref = _grad_vector(model)
    for variant in variants:
        if variant in ("sum", "loop"):
            continue
        try:
            make_step(variant, model, method)(batch)
        except ImportError:
            continue
        got = _grad_vector(model)
        out[variant] = ((got - ref).norm() / ref.norm()).item()
    return out


def time_cpu(kind: str, variant: str, method: str, reps: int) -> list[float]:
    torch.manual_seed(0)
    model = MultiTaskModel(kind)
    batch = model.batch()
    step = make_step(variant, model, method)
    step(batch)  # warm-up (allocates buffers, settles the batching decision)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    return times


def peak_rss_delta(kind: str, variant: str, method: str, threads: int = 2) -> int:
    """Bytes of peak RSS one step adds on top of the model and batch (fresh process)."""
    root = str(Path(__file__).resolve().parent.parent)
    code = (
        f"import sys; sys.path.insert(0, {root!r})\n"
        "from benchmarks.bench_step import _peak_child\n"
        f"print(_peak_child({kind!r}, {variant!r}, {method!r}, {threads}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return int(res.stdout.strip().splitlines()[-1])


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_child(kind: str, variant: str, method: str, threads: int = 2) -> int:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = MultiTaskModel(kind)
    batch = model.batch()
    step = make_step(variant, model, method)
    step(batch)  # first step: warm-up, lazy allocations
    model.zero_grad(set_to_none=True)
    before = _rss_kib("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to now
    step(batch)
    return (_rss_kib("VmHWM:") - before) * 1024


# -- pytest-benchmark -------------------------------------------------------------------------

try:
    import pytest

    @pytest.mark.parametrize("kind", ["celeba", "dense3"])
    @pytest.mark.parametrize("variant", VARIANTS)
    @pytest.mark.parametrize("method", METHODS)
    def test_step(benchmark, kind, variant, method):
        if variant == "sum" and method != METHODS[0]:
            pytest.skip("no method")
        torch.manual_seed(0)
        model = MultiTaskModel(kind)
        batch = model.batch()
        step = make_step(variant, model, method)
        step(batch)
        benchmark.group = f"step {kind} {method}"
        benchmark.pedantic(step, args=(batch,), rounds=5, warmup_rounds=1)
except ImportError:  # running as a script without pytest
    pass


# -- GPU ----------------------------------------------------------------------------------------

def run_step_gpu_bench(reps: int = 20, warmup: int = 3) -> list[dict]:
    """Full UPGrad and PCGrad steps on CUDA for each variant, timed with CUDA events.

    Returns one dict per (model, method, variant): median/min ms, peak allocated MiB, and the
    update's relative difference from the per-task loop. torchjd rows only when importable.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("run_step_gpu_bench needs a CUDA device")
    rows = []
    for kind in ("celeba", "dense3"):
        for method in METHODS:
            errors = update_errors(kind, method, device="cuda")
            for variant in VARIANTS:
                if variant == "sum" and method != METHODS[0]:
                    continue
                torch.manual_seed(0)
                model = MultiTaskModel(kind).cuda()
                batch = model.batch(device="cuda")
                try:
                    step = make_step(variant, model, method)
                except ImportError:
                    continue
                for _ in range(warmup):
                    step(batch)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                times = []
                for _ in range(reps):
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    step(batch)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                rows.append({
                    "model": kind, "method": method if variant != "sum" else "-",
                    "variant": variant, "median_ms": statistics.median(times),
                    "min_ms": min(times),
                    "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
                    "update_rel_err_vs_loop": errors.get(variant),
                    "device": torch.cuda.get_device_name(),
                })
    return rows


# -- script ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--models", default="celeba,dense3")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    variants = args.variants.split(",")
    for kind in args.models.split(","):
        for method in args.methods.split(","):
            errors = update_errors(kind, method, variants=tuple(variants))
            for variant in variants:
                if variant == "sum" and method != args.methods.split(",")[0]:
                    continue
                try:
                    times = time_cpu(kind, variant, method, args.reps)
                except ImportError:
                    continue
                row = {"model": kind, "method": method if variant != "sum" else "-",
                       "variant": variant, "median_ms": 1e3 * statistics.median(times),
                       "min_ms": 1e3 * min(times), "update_rel_err_vs_loop": errors.get(variant)}
                if not args.no_memory:
                    peak = peak_rss_delta(kind, variant, method, args.threads)
                    row["peak_rss_mib"] = peak / 2**20
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| model | method | variant | median ms | min ms | update rel. err vs (b) | "
          "peak RSS added (MiB) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        err = r["update_rel_err_vs_loop"]
        print(f"| {r['model']} | {r['method']} | {r['variant']} | {r['median_ms']:.1f} | "
              f"{r['min_ms']:.1f} | {'-' if err is None else f'{err:.1e}'} | "
              f"{r.get('peak_rss_mib', float('nan')):.1f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
