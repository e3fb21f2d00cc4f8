"""The per-task backward strategies: batched, loop, and "auto" choosing by time on a CPU."""

import pytest
import torch

import mtlfast
from mtlfast.engine import Batching
from mtlfast.engine import vjp as vjp_module

from ..conftest import rel_err
from .models import CNNModel, LSTMModel, MLPModel, Projected, data, reference_step, shared_params
from .test_modes import _flat_grads, _forward, _heads, _twins


@pytest.mark.parametrize("model_cls", [MLPModel, CNNModel, LSTMModel])
@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
@pytest.mark.parametrize("vjp", ["batched", "loop"])
def test_each_strategy_matches_per_task_loop(model_cls, mode, vjp):
    model, twin, (x, y) = _twins(model_cls)
    losses, z = _forward(model, x, y)
    mtlfast.backward(losses, shared_params(model), Projected(), features=z, mode=mode, vjp=vjp)
    losses, _ = _forward(twin, x, y)
    reference_step(losses, shared_params(twin), Projected(), head_params=_heads(twin))
    assert rel_err(_flat_grads(model), _flat_grads(twin)) < 1e-10


def _spy_on_runs(monkeypatch):
    used: list[bool] = []
    real = vjp_module._run

    def run(*args, batched, **kwargs):
        used.append(batched)
        return real(*args, batched=batched, **kwargs)

    monkeypatch.setattr(vjp_module, "_run", run)
    return used


@pytest.mark.parametrize("faster", ["batched", "loop"])
def test_auto_alternates_then_keeps_the_faster(monkeypatch, faster):
    # A fake clock: each call of the slower strategy "takes" 10 s, the faster 1 s.
    used = _spy_on_runs(monkeypatch)
    now = [0.0]

    def clock():
        if used:
            now[0] += 1.0 if used[-1] == (faster == "batched") else 10.0
        return now[0]

    monkeypatch.setattr(vjp_module.time, "perf_counter", clock)
    torch.manual_seed(0)
    model = MLPModel()
    x, y = data(model)
    engine = mtlfast.MTLBackward(shared_params(model), Projected(), mode="jacobian")
    T = None
    for _ in range(2 * (vjp_module.AUTO_TRIALS + 1) + 2):
        losses, _ = model(x, y)
        T = len(losses)
        engine.backward(losses)
    # One call per batched pass, T per looped pass: compress to one flag per step.
    steps, i = [], 0
    while i < len(used):
        steps.append(used[i])
        i += 1 if used[i] else T
    trials = [True, False] * (vjp_module.AUTO_TRIALS + 1)
    assert steps == trials + [faster == "batched"] * 2
    assert engine._trunk.choice == faster


def test_auto_is_batched_off_the_cpu():
    b = Batching("x", "auto")
    assert b.use_batched(torch.device("meta"))
    b.record(False, 0.0)  # decided: further timings change nothing
    assert b.choice == "batched" and b.use_batched(torch.device("cpu"))


def test_fixed_strategies_never_time():
    for strategy in ("batched", "loop"):
        b = Batching("x", strategy)
        for _ in range(2 * (vjp_module.AUTO_TRIALS + 1)):
            b.record(strategy == "loop", 1.0)
        assert b.times == {"batched": [], "loop": []}
        assert b.use_batched(torch.device("cpu")) == (strategy == "batched")


def test_bad_vjp_is_a_value_error():
    model = MLPModel()
    with pytest.raises(ValueError, match="vjp must be one of"):
        mtlfast.MTLBackward(shared_params(model), Projected(), vjp="vmap")
