"""Fused multi-task heads vs the alternatives, forward + backward (issue 5).

Cases: (1) 40 x Linear(512, 1), B=256 (CelebA attributes); (2) 8 MLP heads
512->256->{1,2,5,10,20,50,100,200}, B=256; (3) 100 MLP heads 256->64->1, B=1024 (ranking).

Implementations: ``fused`` (mtlfast.FusedHeads), ``loop`` (nn.ModuleList of heads in a Python
loop), ``compiled_loop`` (torch.compile of the loop; ``compiled_loop_batch_lhs`` adds inductor's
``batch_linear_lhs`` pre-grad fusion), ``concat_bmm`` (one concatenated Linear for all first
layers + a zero-padded bmm for the second layers), and ``floor``: the case's GEMM FLOPs at the
GEMM rate measured in the same run. Also the CPU kernel choices the dispatch makes
(``_addmm_activation`` vs ``addmm + relu``; ``bmm`` vs a per-group ``addmm`` loop).

    python -m pytest benchmarks/bench_heads.py --benchmark-only   # pytest-benchmark
    python benchmarks/bench_heads.py                              # side-by-side medians table

``run_heads_gpu_bench()`` times the three cases on CUDA (fused / loop / concat_bmm, median ms
with CUDA events) for benchmarks/gpu_check.sh. Set MTLFAST_BENCH_COMPILE=0 to skip the
compiled-loop rows (compilation takes minutes on a small CPU).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from mtlfast import fuse_heads

CASES: dict[str, dict] = {
    "celeba_40xlinear": {"D": 512, "B": 256, "hidden": None, "widths": [1] * 40},
    "mlp8_ragged": {"D": 512, "B": 256, "hidden": 256,
                    "widths": [1, 2, 5, 10, 20, 50, 100, 200]},
    "ranking_100xmlp": {"D": 256, "B": 1024, "hidden": 64, "widths": [1] * 100},
}
IMPLS = ["fused", "loop", "concat_bmm", "compiled_loop", "compiled_loop_batch_lhs"]


def _plain_heads(case: dict, device) -> nn.ModuleList:
    D, h = case["D"], case["hidden"]
    heads = [nn.Linear(D, n) if h is None else
             nn.Sequential(nn.Linear(D, h), nn.ReLU(), nn.Linear(h, n)) for n in case["widths"]]
    return nn.ModuleList(heads).to(device)


class LoopHeads(nn.Module):
    """What frameworks do: one small Linear (or MLP) per task, in a Python loop."""

    def __init__(self, heads: nn.ModuleList):
        super().__init__()
        self.heads = heads

    def forward(self, z):
        return [head(z) for head in self.heads]


class ConcatBmmHeads(nn.Module):
    """The usual hand fusion: one concatenated first layer, then a zero-padded bmm."""

    def __init__(self, heads: nn.ModuleList, mlp: bool):
        super().__init__()
        first = [h[0] if mlp else h for h in heads]
        self.widths = [(h[-1] if mlp else h).out_features for h in heads]
        self.w1 = nn.Parameter(torch.cat([f.weight.detach() for f in first]))
        self.b1 = nn.Parameter(torch.cat([f.bias.detach() for f in first]))
        self.mlp = mlp
        if mlp:
            T, hid, nmax = len(heads), heads[0][0].out_features, max(self.widths)
            w2 = torch.zeros(T, hid, nmax, device=self.w1.device)
            b2 = torch.zeros(T, 1, nmax, device=self.w1.device)
            for t, hd in enumerate(heads):
                w2[t, :, : self.widths[t]] = hd[-1].weight.detach().T
                b2[t, 0, : self.widths[t]] = hd[-1].bias.detach()
            self.w2, self.b2 = nn.Parameter(w2), nn.Parameter(b2)

    def forward(self, z):
        y = torch.addmm(self.b1, z, self.w1.T)
        if not self.mlp:
            return list(y.split(self.widths, dim=1))
        T = len(self.widths)
        h = torch.relu(y).view(z.shape[0], T, -1).transpose(0, 1)  # (T, B, hid)
        out = torch.baddbmm(self.b2, h, self.w2)  # (T, B, nmax)
        return [out[t, :, :n] for t, n in enumerate(self.widths)]


def build(case_name: str, impl: str, device="cpu"):
    """-> (module, z) with module(z) -> list of task outputs."""
    case = CASES[case_name]
    torch.manual_seed(0)
    heads = _plain_heads(case, device)
    z = torch.randn(case["B"], case["D"], device=device, requires_grad=True)
    if impl == "fused":
        fused = fuse_heads(heads)
        return (lambda x: list(fused(x).values())), fused, z
    if impl == "concat_bmm":
        m = ConcatBmmHeads(heads, case["hidden"] is not None)
        return m, m, z
    loop = LoopHeads(heads)
    if impl == "loop":
        return loop, loop, z
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    if impl == "compiled_loop_batch_lhs":
        inductor_config.pre_grad_fusion_options = {"batch_linear_lhs": {}}
    else:
        inductor_config.pre_grad_fusion_options = {}
    return torch.compile(loop), loop, z


def step_fn(case_name: str, impl: str, device="cpu") -> Callable[[], None]:
    """One forward + backward (grads of z and of every head parameter)."""
    fn, module, z = build(case_name, impl, device)
    outs = fn(z)
    seeds = [torch.randn_like(o) for o in outs]
    params = [p for p in module.parameters()] if isinstance(module, nn.Module) else []

    def step():
        for p in params:
            p.grad = None
        z.grad = None
        torch.autograd.backward(fn(z), seeds)

    step()  # warm-up (and compilation)
    return step


def case_flops(case_name: str) -> float:
    """GEMM FLOPs of forward + backward (input and weight gradients): 3 x 2 B (D H + sum h n)."""
    c = CASES[case_name]
    B, D, n = c["B"], c["D"], c["widths"]
    if c["hidden"] is None:
        mac = D * sum(n)
    else:
        mac = D * c["hidden"] * len(n) + sum(c["hidden"] * w for w in n)
    return 3 * 2 * B * mac


def gemm_rate(case_name: str, reps: int = 20) -> float:
    """FLOP/s of this machine's dense GEMM at the case's dominant shape (B x D x total width)."""
    c = CASES[case_name]
    N = sum(c["widths"]) if c["hidden"] is None else c["hidden"] * len(c["widths"])
    a, b = torch.randn(c["B"], c["D"]), torch.randn(c["D"], N)
    ms = median_ms(lambda: torch.mm(a, b), reps)
    return 2 * c["B"] * c["D"] * N / (ms * 1e-3)


def median_ms(fn: Callable[[], object], reps: int = 20) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- CPU choices

def _relu_choices(B=256, D=512, H=2048):
    x, w, b = torch.randn(B, D), torch.randn(H, D), torch.randn(H)
    return {"addmm_activation": lambda: torch._addmm_activation(b, x, w.T),
            "addmm_relu": lambda: torch.relu_(torch.addmm(b, x, w.T))}


def _layer2_choices(case_name: str):
    """Block-diagonal layer 2 on CPU: one (padded) bmm vs a loop of per-group addmm."""
    c = CASES[case_name]
    T, h, n, B = len(c["widths"]), c["hidden"], c["widths"], c["B"]
    x = torch.randn(B, T * h)
    ws = [torch.randn(k, h) for k in n]
    bs = [torch.randn(k) for k in n]
    nmax = max(n)
    wp = torch.zeros(T, h, nmax)
    for t, w in enumerate(ws):
        wp[t, :, : n[t]] = w.T
    xs = x.split([h] * T, dim=1)

    def padded_bmm():
        return torch.bmm(x.view(B, T, h).transpose(0, 1), wp)

    def addmm_loop():
        return torch.cat([torch.addmm(b, xt, w.T) for xt, w, b in zip(xs, ws, bs, strict=True)],
                         dim=1)

    return {"padded_bmm": padded_bmm, "addmm_loop": addmm_loop}


# ----------------------------------------------------------------------------- pytest-benchmark

def _compile_enabled() -> bool:
    return os.environ.get("MTLFAST_BENCH_COMPILE", "1") != "0"


try:
    import pytest
except ImportError:  # plain `python benchmarks/bench_heads.py` needs no pytest
    pytest = None

if pytest is not None:

    pytestmark = pytest.mark.usefixtures("one_thread")  # benchmarks/conftest.py

    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize("case", list(CASES))
    def test_heads_fwd_bwd(benchmark, case, impl):
        if impl.startswith("compiled") and not _compile_enabled():
            pytest.skip("MTLFAST_BENCH_COMPILE=0")
        benchmark.group = case
        benchmark.extra_info["floor_ms"] = case_flops(case) / gemm_rate(case) * 1e3
        benchmark(step_fn(case, impl))

    @pytest.mark.parametrize("choice", ["addmm_activation", "addmm_relu"])
    def test_cpu_layer1_epilogue(benchmark, choice):
        benchmark.group = "cpu layer-1 epilogue"
        benchmark(_relu_choices()[choice])

    @pytest.mark.parametrize("choice", ["padded_bmm", "addmm_loop"])
    @pytest.mark.parametrize("case", ["mlp8_ragged", "ranking_100xmlp"])
    def test_cpu_layer2_strategy(benchmark, case, choice):
        benchmark.group = f"cpu layer-2 {case}"
        benchmark(_layer2_choices(case)[choice])


# ----------------------------------------------------------------------------- tables

def run_cpu_table(reps: int = 20, compile_loop: bool | None = None) -> list[dict]:
    """Side-by-side medians on CPU (one thread): every case x implementation + the floor."""
    torch.set_num_threads(1)
    compile_loop = _compile_enabled() if compile_loop is None else compile_loop
    rows = []
    for case in CASES:
        floor = case_flops(case) / gemm_rate(case, reps) * 1e3
        res = {"case": case, "floor_ms": floor}
        for impl in IMPLS:
            if impl.startswith("compiled") and not compile_loop:
                continue
            t0 = time.perf_counter()
            step = step_fn(case, impl)
            setup_s = time.perf_counter() - t0
            res[f"{impl}_ms"] = median_ms(step, reps)
            if impl.startswith("compiled"):
                res[f"{impl}_setup_s"] = setup_s
        rows.append(res)
    for name, fn in _relu_choices().items():
        rows.append({"case": "layer1 relu epilogue", "choice": name, "ms": median_ms(fn, reps)})
    for case in ("mlp8_ragged", "ranking_100xmlp"):
        for name, fn in _layer2_choices(case).items():
            rows.append({"case": f"layer2 {case}", "choice": name, "ms": median_ms(fn, reps)})
    return rows


def run_heads_gpu_bench(reps: int = 50) -> list[dict]:
    """The three cases on CUDA, forward + backward: median ms (CUDA events) of fused / loop /
    concat_bmm, and the speedups of fused over each."""
    if not torch.cuda.is_available():
        raise RuntimeError("run_heads_gpu_bench needs a CUDA device")
    rows = []
    for case in CASES:
        row: dict = {"case": case, "device": torch.cuda.get_device_name()}
        for impl in ("fused", "loop", "concat_bmm"):
            step = step_fn(case, impl, "cuda")
            for _ in range(5):
                step()
            times = []
            for _ in range(reps):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            row[f"{impl}_ms"] = statistics.median(times)
        row["speedup_vs_loop"] = row["loop_ms"] / row["fused_ms"]
        row["speedup_vs_concat_bmm"] = row["concat_bmm_ms"] / row["fused_ms"]
        rows.append(row)
    return rows


def _check_outputs_agree(case: str) -> float:
    """Max relative difference between fused and loop outputs (sanity for the table)."""
    fn_f, _, z = build(case, "fused")
    fn_l, _, _ = build(case, "loop")
    with torch.no_grad():
        return max(((a - b).norm() / b.norm()).item() for a, b in zip(fn_f(z), fn_l(z),
                                                                       strict=True))


if __name__ == "__main__":  # run from the repo root: PYTHONPATH=. python benchmarks/...
    for case in CASES:
        assert _check_outputs_agree(case) < 1e-5, case
    for row in run_cpu_table():
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
