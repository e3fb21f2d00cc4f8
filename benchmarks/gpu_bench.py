# ruff: noqa: B023  (every closure below is timed at once, inside its loop iteration)
"""GPU benchmarks for benchmarks/gpu_check.sh, and the report that gathers every step.

    python benchmarks/gpu_bench.py bench  --out DIR [--budget SECONDS]   -> DIR/bench.json
    python benchmarks/gpu_bench.py report --out DIR                      -> gpu_report.{json,md}

One function per section, registered with @section; each runs inside its own try block, so a
failing section is reported and the others still run. A section gets the shared context
(measured copy bandwidth, deadline) and returns a list of rows:
    {"section", "name", "ms", "floor_ms", "ratio", "target", "ok", ...}
ratio = ms / floor_ms where a floor exists (bytes that must move / measured copy bandwidth);
ok is None where no target applies. To add a section (fused heads, a full step), write a
function taking ``ctx`` and decorate it with @section.

Timing: torch.cuda events around each repetition, warm-up first, median of many; inputs that
fit in 4x the L2 cache rotate among several copies so repeats do not measure the cache.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SECTIONS = []


def section(fn):
    SECTIONS.append(fn)
    return fn


# ------------------------------------------------------------------------------ timing
def bench(fn, *, target_ms: float = 300.0, min_reps: int = 10, max_reps: int = 200):
    """Median / min / max milliseconds of fn(rep) over repetitions sized to ~target_ms."""
    for k in range(3):
        fn(k)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(0)
    torch.cuda.synchronize()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    reps = int(min(max_reps, max(min_reps, target_ms / est)))
    events = []
    for k in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(k)
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in events)
    return {"ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1], "reps": reps}


def copies(make, nbytes: int, ctx) -> list:
    """One input, or several to rotate among when they would sit in L2."""
    n = 1 if nbytes > 4 * ctx["l2_bytes"] else max(2, int(8 * ctx["l2_bytes"] // max(nbytes, 1)))
    return [make() for _ in range(min(n, 64))]


def row(section_name, name, timing, floor_ms=None, target=None, **extra):
    ms = timing["ms"]
    ratio = ms / floor_ms if floor_ms else None
    ok = None if target is None or ratio is None else bool(ratio <= target)
    return {"section": section_name, "name": name, **timing, "floor_ms": floor_ms,
            "ratio": ratio, "target": target, "ok": ok, **extra}


def has_kernels() -> bool:
    from mtlfast import _ext

    return _ext.has_cuda_kernels()


def free():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


ESIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
SIZES = [(8, 10**7), (8, 10**8), (32, 10**7), (32, 10**8)]


# ------------------------------------------------------------------------------ sections
@section
def copy_bandwidth(ctx):
    """Device-to-device copy of 2 GiB: bytes read + bytes written per second."""
    n = (1 << 31) // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    t = bench(lambda k: dst.copy_(src), min_reps=20)
    ctx["bw"] = 2 * n * 4 / (t["ms"] * 1e-3)
    src = dst = None
    free()
    return [row("copy", "d2d copy 2 GiB", t, gbps=ctx["bw"] / 1e9)]


@section
def gram_and_combine(ctx):
    """gram, combine and both vs torch (G @ G.T, w @ G) and vs the memory floor."""
    from mtlfast.ops import combine, gram

    rows = []
    bw = ctx["bw"]
    for dtype in (torch.float32, torch.bfloat16):
        es = ESIZE[dtype]
        for T, P in SIZES:
            if time.time() > ctx["deadline"]:
                rows.append({"section": "gram", "name": f"T={T} P={P:.0e}", "skipped": "budget"})
                continue
            tag = f"T={T} P={P:.0e} {str(dtype)[6:]}"
            G = torch.randn(T, P, device="cuda", dtype=dtype)
            w = torch.rand(T, device="cuda")
            out = torch.empty(P, device="cuda", dtype=dtype)
            read = T * P * es / bw * 1e3
            write = P * es / bw * 1e3
            rows.append(row("gram", f"torch G@G.T {tag}", bench(lambda k: G @ G.T), read))
            rows.append(row("combine", f"torch w@G {tag}",
                            bench(lambda k: torch.matmul(w.to(dtype), G, out=out)), read + write))
            if has_kernels():
                K = gram(G)
                ref = (G.float() @ G.float().T) if P <= 10**7 else None
                err = None if ref is None else ((K - ref).norm() / ref.norm()).item()
                rows.append(row("gram", f"mtlfast gram {tag}", bench(lambda k: gram(G)), read,
                                rel_err_vs_torch=err))
                rows.append(row("combine", f"mtlfast combine {tag}",
                                bench(lambda k: combine(w, G, out)), read + write))
                target = 1.25 if dtype == torch.float32 else None

                def step(k):
                    K = gram(G)
                    combine(K[0], G, out)

                rows.append(row("gram+combine", f"mtlfast gram+combine {tag}", bench(step),
                                2 * read + write, target))
            G = out = None
            free()
    return rows


@section
def gram_multi_vs_flat(ctx):
    """One launch over a list of per-parameter blocks (ResNet-18-like shapes) vs a flat G."""
    if not has_kernels():
        return [{"section": "gram_multi", "name": "skipped", "skipped": "no CUDA kernels"}]
    from mtlfast.ops import gram, gram_multi

    widths = [9408, 64, 64] + [36864, 64, 64] * 4 + [73728, 147456, 8192, 128, 128] \
        + [147456] * 3 + [294912, 589824, 32768] + [589824] * 3 + [1179648, 2359296, 131072] \
        + [2359296] * 3 + [512 * 1000, 1000]
    rows = []
    for T in (8, 32):
        Gs = [torch.randn(T, p, device="cuda") for p in widths]
        flat = torch.cat(Gs, dim=1)
        floor = flat.numel() * 4 / ctx["bw"] * 1e3
        rows.append(row("gram_multi", f"gram_multi T={T} {len(widths)} tensors "
                        f"P={flat.shape[1]}", bench(lambda k: gram_multi(Gs)), floor))
        rows.append(row("gram_multi", f"gram flat T={T} P={flat.shape[1]}",
                        bench(lambda k: gram(flat)), floor))
        Gs = flat = None
        free()
    return rows


@section
def graddrop_speed(ctx):
    from mtlfast.ops import graddrop, graddrop_reference

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for T, P in [(8, 10**7), (8, 10**8), (32, 10**7)]:
            G = torch.randn(T, P, device="cuda", dtype=dtype)
            floor = (T + 1) * P * ESIZE[dtype] / ctx["bw"] * 1e3
            tag = f"T={T} P={P:.0e} {str(dtype)[6:]}"
            if has_kernels():
                rows.append(row("graddrop", f"mtlfast graddrop {tag}",
                                bench(lambda k: graddrop(G, k)), floor))
            if P <= 10**7:
                rows.append(row("graddrop", f"torch reference {tag}",
                                bench(lambda k: graddrop_reference(G, k), max_reps=20), floor))
            G = None
            free()
    return rows


@section
def batched_solvers(ctx):
    """mtlfast.ops.solvers on random T x T Grams: one problem (T=8, 32) and a batch of 64."""
    try:
        from mtlfast.ops import solvers
    except ImportError as exc:
        return [{"section": "solvers", "name": "skipped", "skipped": f"no solvers: {exc}"}]
    cases = {  # name -> (function, arguments for a batch of Grams K (..., T, T) float64)
        "pcgrad_weights": lambda K: (solvers.pcgrad_weights,
                                     (K, torch.rand(K.shape, device="cuda").argsort(-1))),
        # MGDA's min-norm point: b = 0 over the simplex. UPGrad: b = K e_i for every task i.
        "nnqp simplex (MGDA)": lambda K: (solvers.nnqp,
                                          (K, K.new_zeros(K.shape[:-1]).unsqueeze(-2), True)),
        "nnqp (UPGrad)": lambda K: (solvers.nnqp, (K, K.clone(), False)),
    }
    rows = []
    for name, make in cases.items():
        for T, B in [(8, ()), (32, ()), (32, (64,))]:
            def fresh():
                A = torch.randn(*B, T, 2 * T, device="cuda", dtype=torch.float64)
                return make(solvers.normalize_gram(A @ A.mT)[0])

            tag = f"{name} T={T} batch={B[0] if B else 1}"
            try:
                inputs = copies(fresh, 8 * T * T * (B[0] if B else 1), ctx)
                t = bench(lambda k: inputs[k % len(inputs)][0](*inputs[k % len(inputs)][1]),
                          max_reps=100)
                ok = bool(t["ms"] * 1e3 <= 20.0) if not B and T == 32 else None
                rows.append(row("solvers", tag, t, target_us=20.0, ok=ok))
            except Exception as exc:
                rows.append({"section": "solvers", "name": tag,
                             "skipped": f"{type(exc).__name__}: {exc}"[:200]})
    return rows


@section
def solver_kernels_vs_torch(ctx):
    """Each CUDA solver kernel (one problem, T=8 and 32) vs the torch path it replaced."""
    from mtlfast.ops import solvers
    from mtlfast.ops import solvers_nonlinear as nl

    def eigh_imtl(K):  # IMTLG's torch path before the kernel (linalg.eigh syncs on its info)
        d = K.diagonal().clamp_min(0).sqrt()
        lam, V = torch.linalg.eigh(K)
        keep = lam > K.shape[-1] * torch.finfo(K.dtype).eps * lam.abs().amax()
        v = (V * torch.where(keep, 1 / torch.where(keep, lam, 1.0), 0.0)) @ (V.T @ d)
        return v / v.sum()

    def cases(K):
        T = K.shape[-1]
        p = torch.full((T,), 1.0 / T, dtype=K.dtype, device=K.device)
        zero = K.new_zeros(1, T)
        upgrad_b = p[:, None] * K
        dualproj_b = (K @ p)[None]
        return {  # name -> (kernel call, torch call)
            "nnqp simplex (MGDA)": (lambda: solvers.nnqp(K, zero, True),
                                    lambda: solvers.nnqp_reference(K, zero, True)),
            "nnqp x T (UPGrad)": (lambda: solvers.nnqp(K, upgrad_b),
                                  lambda: solvers.nnqp_reference(K, upgrad_b)),
            "nnqp (DualProj)": (lambda: solvers.nnqp(K, dualproj_b),
                                lambda: solvers.nnqp_reference(K, dualproj_b)),
            "cagrad c=0.4": (lambda: solvers.cagrad_weights(K, p, 0.4),
                             lambda: solvers.cagrad_weights_reference(K, p, 0.4)),
            "power_fixed_point a=1 (NashMTL)": (
                lambda: nl.power_fixed_point(K, 1.0, 20),
                lambda: nl.power_fixed_point_reference(K, 1.0, 20)),
            "power_fixed_point a=2 (FairGrad)": (
                lambda: nl.power_fixed_point(K, 2.0, 25),
                lambda: nl.power_fixed_point_reference(K, 2.0, 25)),
            "imtl_weights (IMTLG)": (lambda: nl.imtl_weights(K), lambda: eigh_imtl(K)),
            "sym_eig (AlignedMTL, ConFIG)": (lambda: nl.sym_eig(K),
                                             lambda: torch.linalg.eigh(K)),
        }

    rows = []
    for T in (8, 32):
        A = torch.randn(T, 2 * T, device="cuda", dtype=torch.float64)
        K = solvers.normalize_gram(A @ A.T)[0]
        for name, (kernel, reference) in cases(K).items():
            tag = f"{name} T={T}"
            if time.time() > ctx["deadline"]:
                rows.append({"section": "solver_kernels", "name": tag, "skipped": "budget"})
                continue
            try:
                ref = bench(lambda k: reference(), target_ms=100.0, min_reps=3, max_reps=50)
                if not has_kernels():
                    rows.append(row("solver_kernels", f"{tag} torch", ref))
                    continue
                t = bench(lambda k: kernel(), max_reps=200)
                ok = bool(t["ms"] * 1e3 <= 20.0) if T == 32 else None
                rows.append(row("solver_kernels", f"{tag} kernel", t, target_us=20.0, ok=ok,
                                torch_ms=ref["ms"], speedup_vs_torch=ref["ms"] / t["ms"]))
            except Exception as exc:
                rows.append({"section": "solver_kernels", "name": tag,
                             "skipped": f"{type(exc).__name__}: {exc}"[:200]})
    return rows


@section
def projection_step(ctx):
    """The projection part of a PCGrad / UPGrad step on G (T=8, P=1e8, fp32): gram + weights +
    combine into a flat .grad, vs the floor (2 reads of G + 1 write of P at the copy rate)
    and vs the pairwise PCGrad loop (benchmarks/baselines/pcgrad.py)."""
    from mtlfast import methods
    from mtlfast.ops import combine, gram

    sys.path.insert(0, ROOT)
    from benchmarks.baselines.pcgrad import pcgrad_pairwise

    T, P = 8, 10**8
    G = torch.randn(T, P, device="cuda")
    out = torch.empty(P, device="cuda")
    floor = (2 * T + 1) * P * 4 / ctx["bw"] * 1e3
    rows = []
    loop_ms = None
    for name in ("PCGrad", "UPGrad"):
        method = methods.PCGrad(seed=0) if name == "PCGrad" else methods.UPGrad()

        def step(k, method=method):
            combine(method.weights(gram(G)), G, out)

        t = bench(step, max_reps=50)
        extra = {}
        if name == "PCGrad":
            orders = method.last_orders.cpu().tolist()
            loop = bench(lambda k: pcgrad_pairwise(G, orders), target_ms=300.0, min_reps=3,
                         max_reps=10)
            loop_ms = loop["ms"]
            ref = pcgrad_pairwise(G, orders)
            extra = {"pairwise_loop_ms": loop_ms, "speedup_vs_pairwise": loop_ms / t["ms"],
                     "rel_err_vs_pairwise": ((out - ref).norm() / ref.norm()).item()}
            rows.append(row("projection_step", "PCGrad pairwise loop T=8 P=1e8", loop, floor))
            ref = None
        rows.append(row("projection_step", f"mtlfast {name} T=8 P=1e8 fp32", t, floor, 1.3,
                        **extra))
        if loop_ms is not None:
            speedup = loop_ms / t["ms"]
            rows.append({"section": "projection_step", "name": f"{name} speedup vs pairwise",
                         "ms": t["ms"], "min_ms": None, "max_ms": None, "reps": None,
                         "floor_ms": None, "ratio": None, "target": ">= 5x",
                         "ok": bool(speedup >= 5.0), "speedup_vs_pairwise": speedup})
    G = out = None
    free()
    return rows


@section
def fused_heads(ctx):
    """FusedHeads vs the ModuleList loop vs concatenated Linear + bmm, forward + backward."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_heads import run_heads_gpu_bench

    rows = []
    for r in run_heads_gpu_bench():
        for impl in ("fused", "loop", "concat_bmm"):
            t = {"ms": r[f"{impl}_ms"], "min_ms": None, "max_ms": None, "reps": None}
            rows.append(row("heads", f"{r['case']} {impl}", t,
                            speedup_vs_loop=r["loop_ms"] / r[f"{impl}_ms"]))
    return rows


@section
def full_step(ctx):
    """One training step (UPGrad, PCGrad) per variant: mtlfast modes vs sum().backward()."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_step import run_step_gpu_bench

    rows = []
    for r in run_step_gpu_bench():
        t = {"ms": r["median_ms"], "min_ms": r["min_ms"], "max_ms": None, "reps": None}
        rows.append(row("step", f"{r['model']} {r['method']} {r['variant']}", t,
                        peak_mib=r["peak_mib"], rel_err_vs_loop=r["update_rel_err_vs_loop"]))
    return rows


def environment():
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "python": sys.version.split()[0]}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton"] = f"unavailable: {exc}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sm_count=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,"
             "power.limit,temperature.gpu", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:
        env["nvidia_smi"] = f"failed: {exc}"
    try:
        from mtlfast import _ext

        env["mtlfast"] = _ext.info()
    except Exception as exc:
        env["mtlfast"] = f"import failed: {exc}"
    return env


def run_bench(out_dir: str, budget_s: float) -> None:
    ctx = {"deadline": time.time() + budget_s, "bw": None, "l2_bytes": 50 * 2**20}
    try:
        ctx["l2_bytes"] = torch.cuda.get_device_properties(0).L2_cache_size
    except Exception:
        pass
    result = {"environment": environment(), "sections": {}, "rows": []}
    for fn in SECTIONS:
        name = fn.__name__
        t0 = time.time()
        if time.time() > ctx["deadline"]:
            result["sections"][name] = {"status": "skipped (time budget)"}
            continue
        if ctx["bw"] is None and name != "copy_bandwidth":
            result["sections"][name] = {"status": "skipped (no bandwidth measured)"}
            continue
        try:
            rows = fn(ctx)
            result["rows"].extend(rows)
            result["sections"][name] = {"status": "ok", "seconds": round(time.time() - t0, 1)}
        except Exception as exc:
            result["sections"][name] = {"status": "error", "error": repr(exc),
                                        "traceback": traceback.format_exc()[-3000:]}
            free()
        print(f"[bench] {name}: {result['sections'][name]['status']} "
              f"({time.time() - t0:.1f} s)", flush=True)
        with open(os.path.join(out_dir, "bench.json"), "w") as f:  # partial results survive
            json.dump(result, f, indent=1, default=str)


# ------------------------------------------------------------------------------ report
def junit_summary(path: str) -> dict:
    if not os.path.exists(path):
        return {"status": "missing"}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"status": f"unreadable: {exc}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    s = {k: sum(int(x.get(k, 0)) for x in suites)
         for k in ("tests", "failures", "errors", "skipped")}
    s["passed"] = s["tests"] - s["failures"] - s["errors"] - s["skipped"]
    failed = []
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            msg = (bad.get("message") or "")[:300]
            failed.append(f"{case.get('classname')}::{case.get('name')}: {msg}")
    s["failed_tests"] = failed[:100]
    return s


def fmt(x, digits=3):
    return "" if x is None else (f"{x:.{digits}g}" if isinstance(x, float) else str(x))


def write_report(out_dir: str) -> int:
    steps = []
    path = os.path.join(out_dir, "steps.tsv")
    if os.path.exists(path):
        for line in open(path):
            name, rc, secs = line.rstrip("\n").split("\t")
            steps.append({"step": name, "rc": int(rc), "seconds": int(secs)})
    bench_path = os.path.join(out_dir, "bench.json")
    bench_data = json.load(open(bench_path)) if os.path.exists(bench_path) else {}
    tests = {os.path.basename(p)[:-4]: junit_summary(os.path.join(out_dir, p))
             for p in sorted(os.listdir(out_dir)) if p.startswith("pytest_") and p.endswith(".xml")}
    env = bench_data.get("environment") or environment()
    rows = bench_data.get("rows", [])
    checks = [{"check": s["step"], "ok": s["rc"] == 0, "detail": f"rc={s['rc']}, {s['seconds']} s"}
              for s in steps]
    for name, t in tests.items():
        # A run where nothing passed (every test skipped) proves nothing: it fails.
        ok = t.get("status") is None and t["failures"] == t["errors"] == 0 and t["passed"] > 0
        detail = (t.get("status") or f"{t['passed']} passed, {t['failures']} failed, "
                  f"{t['errors']} errors, {t['skipped']} skipped")
        checks.append({"check": name, "ok": ok, "detail": detail})
    for name, sec in bench_data.get("sections", {}).items():
        checks.append({"check": f"bench:{name}", "ok": sec["status"] in ("ok",) or
                       sec["status"].startswith("skipped"), "detail": sec["status"]})
    for r in rows:
        if r.get("ok") is not None:
            checks.append({"check": r["name"], "ok": r["ok"],
                           "detail": f"{fmt(r.get('ratio'))}x floor (target {r['target']})"
                           if r.get("ratio") is not None else f"{fmt(r['ms'])} ms"})
    report = {"environment": env, "steps": steps, "tests": tests, "checks": checks,
              "bench": bench_data}
    with open(os.path.join(out_dir, "gpu_report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)

    md = ["# mtlfast GPU report", ""]
    gpu = env.get("gpu", "no GPU")
    md.append(f"- date: {env.get('date')}\n- GPU: {gpu} ({env.get('nvidia_smi', '')})")
    md.append(f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), Triton "
              f"{env.get('triton')}, Python {env.get('python')}")
    bw = [r for r in rows if r.get("section") == "copy"]
    if bw:
        md.append(f"- measured copy bandwidth: {bw[0]['gbps']:.0f} GB/s (read + write)")
    md += ["", "## Pass / fail", "", "| check | ok | detail |", "|---|---|---|"]
    md += [f"| {c['check']} | {'PASS' if c['ok'] else 'FAIL'} | {c['detail']} |" for c in checks]
    for name, t in tests.items():
        if t.get("failed_tests"):
            md += ["", f"### {name} failures", ""] + [f"- `{x}`" for x in t["failed_tests"]]
    md += ["", "## Benchmarks (median of repetitions, CUDA events)", "",
           "| section | name | median ms | min ms | floor ms | x floor | target |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" in r:
            md.append(f"| {r['section']} | {r['name']} | {fmt(r['ms'], 4)} | "
                      f"{fmt(r.get('min_ms'), 4)} | {fmt(r.get('floor_ms'), 4)} | "
                      f"{fmt(r.get('ratio'))} | {fmt(r.get('target'))} |")
        else:
            md.append(f"| {r['section']} | {r['name']} | skipped: {r.get('skipped')} | | | | |")
    for name, sec in bench_data.get("sections", {}).items():
        if sec["status"] == "error":
            md += ["", f"### bench section {name} failed", "", "```", sec["traceback"], "```"]
    with open(os.path.join(out_dir, "gpu_report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md[: 12 + len(checks)]))
    return 0 if all(c["ok"] for c in checks) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["bench", "report"])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-report")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for all sections")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.mode == "bench":
        if not torch.cuda.is_available():
            print("gpu_bench: no CUDA device", file=sys.stderr)
            return 2
        run_bench(a.out, a.budget)
        return 0
    return write_report(a.out)


if __name__ == "__main__":
    sys.exit(main())
