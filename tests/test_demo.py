import importlib.util
import json
import shutil

import pytest
import torch

from mtlfast import data as datasets
from mtlfast import demo
from mtlfast.cli import main
from mtlfast.methods import Mean


def _available(name):
    if name == "speech" and shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng (system package) is not installed: apt-get install espeak-ng")
    if name == "qm9" and importlib.util.find_spec("qm9pack") is None:
        pytest.skip("qm9pack is not installed: pip install 'mtlfast[qm9]'")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # One cache for the whole module: speech is generated once, single-task runs per test.
    monkeypatch.setenv("MTLFAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.mark.parametrize("name", ["digits", "speech", "qm9"])
@pytest.mark.parametrize("way", ["mtlfast", "slow"])
def test_short_training_lowers_every_task_loss(name, way):
    _available(name)
    torch.set_num_threads(1)
    data = datasets.load(name, **demo.SIZES[name]["tiny"])
    method = Mean()
    step = demo.engine_step(method) if way == "mtlfast" else demo.slow_step(method)
    run = demo.train(data, way, step, epochs=4, batch_size=16, lr=5e-3, seed=0,
                     progress=False, method=method)
    assert run.steps == 4 * -(-len(data.train) // 16)
    # curve[0]: the untrained model; curve[-1]: the last epoch's mean training loss.
    for task, curve in run.loss_curves.items():
        assert curve[-1] < curve[0], (task, curve)
    first = sum(c[0] for c in run.loss_curves.values())
    last = sum(c[-1] for c in run.loss_curves.values())
    assert last < 0.9 * first, run.loss_curves
    assert set(run.test) == {t.name for t in data.tasks}


def test_mtlfast_and_slow_way_train_the_same_model():
    """Same seed, same method: the engine and the per-task loop give the same update."""
    data = datasets.load("digits", **demo.SIZES["digits"]["tiny"])
    torch.set_num_threads(1)
    runs = [demo.train(data, way, step(Mean()), epochs=1, batch_size=64, lr=1e-3, seed=3,
                       progress=False)
            for way, step in (("mtlfast", demo.engine_step), ("slow", demo.slow_step))]
    for task in runs[0].loss_curves:
        assert runs[0].loss_curves[task] == pytest.approx(runs[1].loss_curves[task], rel=1e-4)


@pytest.mark.parametrize("name", ["digits", "qm9"])
@pytest.mark.parametrize("arch", ["mmoe", "ple"])
def test_expert_models_train_and_match_their_loop_definition(name, arch):
    """--arch: the fused expert model trains every task, and its first update equals the
    loop definition's (LibMTL's) with the per-task loop, from the same weights."""
    _available(name)
    torch.set_num_threads(1)
    data = datasets.load(name, **demo.SIZES[name]["tiny"])
    method = Mean()
    run = demo.train(data, arch, demo.engine_step(method), epochs=3, batch_size=16, lr=5e-3,
                     seed=0, progress=False, method=method, arch=arch)
    for task, curve in run.loss_curves.items():
        assert curve[-1] < curve[0], (task, curve)
    assert demo.first_step_difference(data, "upgrad", 32, 0, "cpu", arch) < 1e-4


@pytest.mark.parametrize("arch", ["mmoe", "ple"])
def test_expert_models_share_what_libmtl_shares(arch):
    """shared_parameters(): the stem and the shared experts (+ PLE's shared gates), never a
    gate or expert of one task; the fused model and its loop definition agree."""
    data = datasets.load("digits", **demo.SIZES["digits"]["tiny"])
    counts = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = demo.make_model(data, data.tasks, arch, fused)
        shared = {id(p) for p in model.shared_parameters()}
        x = next(data.train.batches(8))[0]
        _, out = model(x)
        for p in model.parameters():
            reach = sum(torch.autograd.grad(o.sum(), p, retain_graph=True, allow_unused=True)[0]
                        is not None for o in out.values())
            if id(p) in shared:
                assert reach == len(out), (arch, fused, p.shape)
        counts.append(sum(p.numel() for p in model.shared_parameters()))
    assert counts[0] == counts[1]


def test_demo_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--size", "tiny", "--epochs", "1", "--no-progress",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Delta_m%" in text and "speedup" in text
    assert "Why these speeds" in text and "Why the slow way may end elsewhere" in text
    summary = json.loads((out / "results.json").read_text())
    names = ["mtlfast UPGrad", "linear scalarization", "slow UPGrad", "mtlfast UPGrad features"]
    if importlib.util.find_spec("torchjd") is not None:
        names.append("torchjd UPGrad")
        assert summary["speedup_over_torchjd"] > 0
    assert [r["name"] for r in summary["runs"]] == names
    assert summary["notes"]["first_step_difference"] < 1e-4
    assert set(summary["single_task"]) == {"left", "right", "sum_parity", "larger"}
    for run in summary["runs"]:
        assert run["steps_per_second"] > 0
        assert all(0.0 <= v <= 1.0 for v in run["test"].values())
    assert summary["speedup_over_slow"] > 0
    for png in ("curves.png", "table.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_command_with_an_expert_model(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--arch", "ple", "--method", "mgda", "--size", "tiny", "--epochs", "1",
                 "--no-progress", "--out", str(out)]) == 0
    assert "model ple" in capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["mtlfast MGDA", "linear scalarization",
                                                    "slow MGDA", "mtlfast MGDA features"]
    assert summary["notes"]["first_step_difference"] < 1e-4
    assert "hard parameter sharing only" in summary["notes"]["torchjd"]
    assert summary["config"]["arch"] == "ple"


def test_format_table_delta_m_row():
    summary = {
        "tasks": [{"name": "a", "metric": "accuracy", "higher_is_better": True},
                  {"name": "b", "metric": "mae", "higher_is_better": False}],
        "single_task": {"a": 0.5, "b": 2.0},
        "runs": [{"name": "x", "test": {"a": 0.6, "b": 1.0}, "delta_m": -35.0,
                  "steps_per_second": 12.5}],
    }
    table = demo.format_table(summary)
    assert "a (acc up)" in table and "b (mae down)" in table
    assert "-35.00" in table and "12.5" in table and "speedup" not in table


def test_resolve_method_names():
    assert type(demo.resolve_method("upgrad", 3)).__name__ == "UPGrad"
    assert type(demo.resolve_method("PCGrad", 3)).__name__ == "PCGrad"
    uw = demo.resolve_method("uw", 3)
    assert sum(p.numel() for p in uw.parameters()) == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        demo.resolve_method("nosuch", 2)
    with pytest.raises(SystemExit):
        main(["demo", "--data", "cifar"])


def test_demo_methods_script_runs_and_tabulates(tmp_path, capsys):
    demo_methods = _benchmark_script("demo_methods")
    out = tmp_path / "runs.json"
    assert demo_methods.main(["--data", "digits", "--size", "tiny", "--methods", "ls", "upgrad",
                              "--seeds", "0", "--epochs", "1", "--out", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert [r["method"] for r in records] == ["ls", "upgrad"]
    capsys.readouterr()
    assert demo_methods.main(["--table", str(out), str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| method | left | right |")
    # Two copies of the same run: mean equals the run, spread zero.
    upgrad = next(line for line in table if line.startswith("| upgrad |"))
    assert f"{records[1]['test']['left']:.4f} ± 0.0000" in upgrad


def test_demo_step_time_script_checks_and_times_every_variant(capsys):
    demo_step_time = _benchmark_script("demo_step_time")
    assert demo_step_time.main(["--data", "digits", "--rounds", "1", "--steps", "1"]) == 0
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.startswith("| digits |")]
    assert len(rows) == len(demo_step_time.VARIANTS)
    assert "chose " in rows[-1]
    errors = [float(line.rsplit(" ", 1)[-1]) for line in captured.err.splitlines()
              if "rel err" in line]
    assert len(errors) == 2 and max(errors) < 1e-4


def _benchmark_script(name):
    """A script of benchmarks/ imported as a module (the folder is not a package on the path)."""
    import importlib
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
