"""``python -m mtlfast bench`` end to end on tiny sizes (nothing here checks a timing)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_report, make_results
from mtlfast.baselines import ConcatBmmHeads, heads_loop, pcgrad_pairwise
from mtlfast.bench import SUITES, Case, Config, Contender, run_case
from mtlfast.bench.heads_suite import make_heads
from mtlfast.bench.methods_suite import discover_methods
from mtlfast.bench.step_models import MODELS, build
from mtlfast.bench.step_suite import _contenders_for
from mtlfast.cli import main
from tests.conftest import devices

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--sizes", "tiny", "--threads", "1", "--out", str(out)]) == 0
    return out


def test_every_suite_ran_and_every_available_contender_was_timed(bench_out):
    doc = json.loads((bench_out / "bench.json").read_text())
    records = doc["records"]
    assert {r["suite"] for r in records} == set(SUITES)
    assert doc["machine"]["device"] == "cpu" and doc["command"].startswith("python -m mtlfast")
    for r in records:
        assert r["status"] in ("ok", "floor", "unavailable", "differs", "unchecked"), r
        if r["status"] in ("ok", "floor"):
            assert r["median_s"] is not None and r["median_s"] > 0 and r["times_s"], r
        else:  # not timed, and says why
            assert r["median_s"] is None and not r["times_s"] and r["note"], r
        if r["status"] == "differs":  # e.g. torchjd's MGDA stops its Frank-Wolfe loop early
            assert r["rel_err"] > 1e-3 and r["contender"] != "mtlfast", r
    # mtlfast itself ran everywhere (its pieces are all on main)
    assert all(r["status"] == "ok" for r in records if r["reference"])
    by_case: dict = {}
    for r in records:
        by_case.setdefault((r["suite"], r["method"], r["case"]), []).append(r)
    for recs in by_case.values():
        timed = [r for r in recs if r["status"] == "ok"]
        checked = [r for r in timed if r["rel_err"] is not None]
        # every timed contender but the one checked against was compared with it first
        assert len(checked) >= len(timed) - 1
        assert all(r["rel_err"] <= 1e-3 for r in checked)
    # the methods suite has its reference everywhere, so every other timed contender has a ratio
    methods = [r for r in records if r["suite"] == "methods" and r["status"] == "ok"]
    assert methods and all(r["speedup"] is not None for r in methods)


def _records(out, suite):
    return [r for r in json.loads((out / "bench.json").read_text())["records"]
            if r["suite"] == suite]


def test_every_kernel_equals_its_torch_path(bench_out):
    records = _records(bench_out, "ops")
    assert {"copy", "gram", "combine", "gram+combine", "graddrop", "grouped_linear",
            "nnqp x T (UPGrad)", "sym_eig (AlignedMTL, ConFIG)"} <= {r["method"] for r in records}
    for r in records:
        assert r["status"] == "ok", r  # checked equal (or the reference), then timed
        assert r["params"].get("bytes", 1) > 0


def test_arch_suite_checks_every_loop_definition_before_timing_it(bench_out):
    recs = _records(bench_out, "arch")
    assert {r["method"] for r in recs} == {"mmoe", "ple", "LS step", "cross-stitch", "mtan", "ltb"}
    loops = [r for r in recs if r["contender"].startswith("loop")]
    assert len(loops) == len({(r["method"], r["case"]) for r in recs})
    assert all(r["status"] == "ok" and r["rel_err"] is not None for r in loops), loops


def test_methods_have_their_floor_and_weights_their_solver(bench_out):
    methods = _records(bench_out, "methods")
    cases = {(r["method"], r["case"]) for r in methods}
    floors = {(r["method"], r["case"]) for r in methods if r["contender"] == "floor"}
    assert floors == cases and all(r["status"] == "floor" for r in methods
                                   if r["contender"] == "floor")
    weights = _records(bench_out, "weights")
    assert {"UPGrad", "MGDA"} <= {r["method"] for r in weights}
    upgrad = [r for r in weights if r["method"] == "UPGrad" and r["contender"] == "torchjd"]
    if upgrad[0]["status"] != "unavailable":  # torchjd installed: same weights, timed
        assert all(r["status"] == "ok" and r["rel_err"] <= 1e-2 for r in upgrad)


def test_demo_suite_checks_every_strategy_against_auto(bench_out):
    demo = {r["contender"]: r for r in _records(bench_out, "demo")}
    assert demo["mtlfast vjp=auto"]["reference"] and "chose " in demo["mtlfast vjp=auto"]["note"]
    for name in ("slow way", "mtlfast vjp=batched", "mtlfast vjp=loop"):
        assert demo[name]["status"] == "ok" and demo[name]["rel_err"] <= 1e-4, demo[name]
    assert demo["LS (sum().backward())"]["status"] == "floor"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("method", ["UPGrad", "PCGrad", "MGDA"])
@pytest.mark.parametrize("model", list(MODELS))
def test_named_step_models_at_tiny_size(model, method, device):
    """The step suite's named models (CUDA or full runs) scaled down: every mtlfast mode, the
    per-task loop (PCGrad's seeded orders let it be checked) and torchjd (except MGDA, whose
    torchjd solver stops short of the optimum) agree; on CUDA the captured step replays like
    its eager twin."""
    cfg = Config.for_sizes("tiny", device)
    spec = MODELS[model]["tiny"]
    case = Case("step", method, model, {}, rtol=1e-3, build=lambda: _contenders_for(
        method, discover_methods()[method], *build(spec, cfg.device), cfg))
    recs = {r.contender: r for r in run_case(case, cfg)}
    for name in ("mtlfast jacobian", "mtlfast gramian", "per-task loop"):
        assert recs[name].status == "ok" and recs[name].median_s is not None, recs[name]
    assert recs["per-task loop"].rel_err <= 1e-3
    assert recs["mtlfast features"].status == recs["sum().backward()"].status == "floor"
    if method != "MGDA" and recs["torchjd"].status != "unavailable":
        assert recs["torchjd"].status == "ok", recs["torchjd"]
    if device == "cuda":
        assert recs["mtlfast CUDA graph"].status == "ok", recs["mtlfast CUDA graph"]
    else:
        assert "mtlfast CUDA graph" not in recs


@pytest.mark.parametrize("model", list(MODELS))
def test_named_step_models_give_finite_losses_and_trunk_features(model):
    spec = MODELS[model]["tiny"]
    net, x, y = build(spec, torch.device("cpu"))
    losses, z = net(x, y)
    assert len(losses) == spec.tasks and all(torch.isfinite(v) and v.dim() == 0 for v in losses)
    assert z.shape[0] == spec.batch and z.requires_grad


def _write_run(folder, records):
    folder.mkdir(exist_ok=True)
    (folder / "bench.json").write_text(json.dumps({"records": records}))


def test_gpu_report_gathers_steps_tests_and_suites(bench_out, tmp_path):
    run = tmp_path / "bench_ops"
    doc = json.loads((bench_out / "bench.json").read_text())
    records = [r for r in doc["records"] if r["suite"] in ("ops", "methods")]
    _write_run(run, records)
    (tmp_path / "steps.tsv").write_text("build\t0\t12\nbench_ops\t0\t30\n")
    (tmp_path / "pytest_cuda.xml").write_text(
        '<testsuite tests="3" failures="0" errors="0" skipped="1"><testcase classname="t" '
        'name="a"/></testsuite>')
    # the training-step targets were not measured (no step records): the report fails
    assert gpu_report.main(["--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["bandwidth_bytes_per_s"] > 0
    checks = {c["check"]: c for c in report["checks"]}
    assert [c["check"] for c in report["checks"]][:3] == ["build", "bench_ops", "pytest_cuda"]
    assert all(checks[c]["ok"] for c in ("build", "bench_ops", "pytest_cuda"))
    missing = [c for c in report["checks"] if c["detail"].startswith("not measured")]
    assert "features mode at most 1.2x sum().backward()" in {c["check"] for c in missing}
    assert not any(c["ok"] for c in missing)
    md = (tmp_path / "gpu_report.md").read_text()
    assert "## Pass / fail" in md and "| ops | gram |" in md and "measured copy bandwidth" in md

    # a kernel that disagrees with its torch path, and a missed target, fail the report
    gram = next(r for r in records if r["method"] == "gram" and not r["reference"])
    gram.update(status="differs", median_s=None, note="rel err 1e-1")
    solve = next(r for r in records if r["method"] == "nnqp x T (UPGrad)" and r["reference"])
    solve["params"].update(T=32, batch=1)
    solve["median_s"] = 1.0
    _write_run(run, records)
    assert gpu_report.main(["--out", str(tmp_path)]) == 1
    failed = [c["check"] for c in json.loads((tmp_path / "gpu_report.json").read_text())
              ["checks"] if not c["ok"]]
    assert any("gram" in c for c in failed) and any("20 us" in c for c in failed)


def _step_record(model, contender, median_ms, speedup, peak_mib):
    return {"suite": "step", "method": "UPGrad", "case": f"({model}) case",
            "params": {"model": model}, "contender": contender, "status": "ok",
            "reference": contender == "mtlfast jacobian", "median_s": median_ms / 1e3,
            "speedup": speedup, "peak_bytes": peak_mib * 2**20, "note": ""}


def test_gpu_report_step_targets(tmp_path):
    """The issue-14 targets on the named models: each computed from the right pair of
    records of one case (speedups against mtlfast's jacobian step, features time and gramian
    peak memory against sum().backward()'s)."""
    recs = []
    for model, loop_x, jd_x, feat_ms, gram_peak, graph_x in (
            ("resnet", 4.0, 1.6, 11.0, 140, 0.9), ("ranking", 4.0, 1.2, 13.0, 160, 0.7)):
        recs += [_step_record(model, "mtlfast jacobian", 100.0, 1.0, 300),
                 _step_record(model, "mtlfast gramian", 110.0, 1.1, gram_peak),
                 _step_record(model, "mtlfast features", feat_ms, feat_ms / 100, 90),
                 _step_record(model, "per-task loop", 100.0 * loop_x, loop_x, 120),
                 _step_record(model, "torchjd", 100.0 * jd_x, jd_x, 400),
                 _step_record(model, "mtlfast CUDA graph", 100.0 * graph_x, graph_x, 10),
                 _step_record(model, "sum().backward()", 10.0, 0.1, 100)]
    _write_run(tmp_path / "bench_step", recs)
    gpu_report.main(["--out", str(tmp_path)])
    checks = json.loads((tmp_path / "gpu_report.json").read_text())["checks"]

    def ok(what, model):
        found = [c["ok"] for c in checks if c["check"].startswith(what) and f"({model})" in
                 c["check"]]
        assert len(found) == 1, (what, model, checks)
        return found[0]

    assert ok("(a) jacobian step at most 0.3x", "resnet")  # loop 4x the jacobian step
    assert not ok("(c) jacobian step at most 0.2x", "ranking")  # 4x < 5x
    assert ok("at least 1.5x faster than torchjd", "resnet")
    assert not ok("at least 1.5x faster than torchjd", "ranking")
    assert ok("features mode at most 1.2x", "resnet")  # 11 / 10 ms
    assert not ok("features mode at most 1.2x", "ranking")  # 13 / 10 ms
    assert ok("gramian mode peak memory", "resnet")  # 140 / 100 MiB
    assert not ok("gramian mode peak memory", "ranking")  # 160 / 100 MiB
    assert ok("(c) CUDA-graph replay", "ranking")  # 0.7x the eager step


def test_plots_and_json_are_written(bench_out):
    assert (bench_out / "bench.json").stat().st_size > 0
    pngs = sorted(p.name for p in bench_out.glob("*.png"))
    assert {"methods_time_vs_T.png", "methods_time_vs_P.png", "speedup.png"} <= set(pngs)
    for name in pngs:
        data = (bench_out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_results_section_is_regenerated_in_place(bench_out, tmp_path):
    results = tmp_path / "RESULTS.md"
    readme = tmp_path / "README.md"
    results.write_text("# Benchmark results\n\nkept\n")
    readme.write_text("# x\n\n## Performance\n\nkept too\n")
    args = [str(bench_out / "bench.json"), "--results", str(results), "--readme", str(readme),
            "--plot", "p.png", "--note", "shared machine"]
    for _ in range(2):  # a rerun replaces its section instead of adding another
        assert make_results.main(args) == 0
    text = results.read_text()
    assert text.count("<!-- mtlfast-bench:cpu:begin -->") == 1 and "kept" in text
    assert "### methods" in text and "shared machine" in text and "| method | case |" in text
    assert readme.read_text().count("![mtlfast speedup") == 1 and "kept too" in readme.read_text()


def _counting(fn):
    calls = []

    def run():
        calls.append(1)
        return fn()

    return run, calls


def test_a_wrong_contender_is_flagged_and_not_timed(monkeypatch, tmp_path):
    G = torch.randn(4, 50)
    wrong, wrong_calls = _counting(lambda: G.sum(0) * 1.01)
    right, right_calls = _counting(lambda: G.sum(0).clone())

    def suite(cfg):
        yield Case("wrong", "Sum", "T=4 P=50", {"T": 4, "P": 50}, sweeps=("T",), build=lambda: [
            Contender("mtlfast", run=lambda: G.sum(0), reference=True),
            Contender("right", run=right), Contender("wrong", run=wrong)])

    monkeypatch.setitem(SUITES, "wrong", suite)
    assert main(["bench", "--sizes", "tiny", "--threads", "1", "--suite", "wrong",
                 "--out", str(tmp_path), "--no-plots"]) == 0
    recs = {r["contender"]: r for r in json.loads((tmp_path / "bench.json").read_text())
            ["records"]}
    assert recs["wrong"]["status"] == "differs" and recs["wrong"]["median_s"] is None
    assert recs["wrong"]["rel_err"] == pytest.approx(0.01, rel=1e-3)
    assert len(wrong_calls) == 1  # the check only, never timed
    assert recs["right"]["status"] == "ok" and len(right_calls) >= 2  # checked, then timed


def test_bench_json_holds_every_finished_case_during_the_run(monkeypatch, tmp_path):
    """A run stopped from outside (gpu_check.sh's time limits) keeps the cases it finished."""
    seen = []

    def second() -> torch.Tensor:
        seen.append([r["case"] for r in json.loads((tmp_path / "bench.json").read_text())
                     ["records"]])
        return torch.ones(2)

    def suite(cfg):
        for label, fn in (("first", lambda: torch.ones(2)), ("second", second)):
            yield Case("two", "Ones", label, {"T": 1},
                       build=lambda fn=fn: [Contender("mtlfast", run=fn, reference=True)])

    monkeypatch.setitem(SUITES, "two", suite)
    assert main(["bench", "--sizes", "tiny", "--suite", "two", "--out", str(tmp_path),
                 "--no-plots"]) == 0
    assert seen and seen[0] == ["first"]


def test_nothing_is_compared_with_a_random_answer():
    case = Case("s", "Random", "T=2", {"T": 2}, build=lambda: [
        Contender("mtlfast", run=lambda: torch.rand(3), reference=True),
        Contender("other", run=lambda: torch.rand(3))])
    recs = {r.contender: r for r in run_case(case, Config.for_sizes("tiny", "cpu"))}
    assert recs["mtlfast"].status == "ok" and recs["mtlfast"].median_s is not None
    assert recs["other"].status == "unchecked" and recs["other"].median_s is None


def test_pairwise_pcgrad_loop_matches_torchjd_where_the_order_cannot_matter():
    torchjd = pytest.importorskip("torchjd.aggregation")
    G = torch.tensor([[1.0, 2.0, -1.0], [-2.0, 0.5, 1.0]], dtype=torch.float64)
    assert (G[0] @ G[1]) < 0  # a real conflict
    expected = torchjd.PCGrad()(G)
    torch.testing.assert_close(pcgrad_pairwise(G), expected)
    torch.testing.assert_close(pcgrad_pairwise(G, reduction="mean"), expected / 2)


def test_pairwise_pcgrad_follows_the_given_orders():
    G = torch.randn(3, 20, dtype=torch.float64)
    orders = [[1, 2], [0, 2], [1, 0]]
    rows = []
    for i, order in enumerate(orders):
        g = G[i].clone()
        for j in order:
            d = g @ G[j]
            g = g - min(d, 0.0) / (G[j] @ G[j]) * G[j]
        rows.append(g)
    torch.testing.assert_close(pcgrad_pairwise(G, orders=orders), sum(rows))


@pytest.mark.parametrize("hidden", [None, 6])
def test_concat_bmm_heads_equal_the_loop(hidden):
    heads = make_heads(5, hidden, (1, 3, 2), torch.device("cpu"))
    z = torch.randn(4, 5, requires_grad=True)
    fused = ConcatBmmHeads(heads)
    a, b = heads_loop(heads, z), fused(z)
    for name in a:
        torch.testing.assert_close(b[name], a[name])
    ga = torch.autograd.grad(sum(o.sum() for o in a.values()), z)[0]
    gb = torch.autograd.grad(sum(o.sum() for o in b.values()), z)[0]
    torch.testing.assert_close(gb, ga)


def test_bad_arguments_fail_clearly(tmp_path, capsys):
    assert main(["bench", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_heads_op_device_script_forces_the_op_and_reports(monkeypatch, tmp_path):
    """benchmarks/heads_op_device.py (the GPU proof's measurement of the heads op on CUDA)
    runs on the CPU: every contender checked equal, the forced FusedHeads on the op's route,
    the dispatch rule restored."""
    from benchmarks import heads_op_device

    rule = heads_op_device._dispatch.RULES["mlp_heads"]
    monkeypatch.setattr("sys.argv", ["heads_op_device.py", "--device", "cpu", "--quick",
                                     "--rounds", "1", "--min-ms", "0.1", "--out", str(tmp_path)])
    heads_op_device.main()
    doc = json.loads((tmp_path / "heads_op.json").read_text())
    assert [(r["T"], r["B"]) for r in doc["rows"]] == [(2, 32), (2, 1024)]
    assert all(set(r["ms"]) == {"fused", "default", "loop", "concat+bmm"} for r in doc["rows"])
    assert (tmp_path / "heads_op.md").read_text().count("\n| 2 |") == 2
    assert heads_op_device._dispatch.RULES["mlp_heads"] is rule
