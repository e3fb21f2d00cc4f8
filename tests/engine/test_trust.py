"""A failed or skipped call changes nothing (``.grad``, method state, engine state), for every
method in every mode it runs in; and the engine's classes of silent wrong answers now raise."""

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

import mtlfast
import mtlfast.methods as M

from ..conftest import GRAM_METHODS
from ..methods.test_properties_loss_jacobian import JACOBIAN_FACTORIES, LOSS_FACTORIES
from .models import MLPModel, data

T = 3


def make_gram(cls):
    """A factory of the Gram method ``cls`` (randomized ones seeded)."""
    return functools.partial(cls, seed=5) if cls in (M.PCGrad, M.GradVac) else cls


def _cases():
    """(id, factory, mode) for every exported method and every mode it can run in."""
    out = []
    for cls in GRAM_METHODS:
        for mode in ("jacobian", "gramian", "features"):
            if mode == "features" and getattr(cls(), "granularity", "matrix") == "parameter":
                continue
            out.append(pytest.param(make_gram(cls), mode, id=f"{cls.__name__}-{mode}"))
    for name, factory in {**JACOBIAN_FACTORIES, **LOSS_FACTORIES}.items():
        mode = "jacobian" if name in JACOBIAN_FACTORIES else "auto"
        out.append(pytest.param(functools.partial(factory, T), mode, id=f"{name}-{mode}"))
    return out


def _snapshot(obj):
    """A deep, comparable copy of a state_dict (tensors, generator states, host values)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return copy.deepcopy(obj)


def _same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _engine_state(engine):
    return {k: copy.deepcopy(v.__dict__) for k, v in (("heads", engine._heads),
                                                      ("trunk", engine._trunk))}


def _step(engine, model, seed, bad=False):
    losses, z = model(*data(model, seed=seed))
    if bad:
        losses = [losses[0], losses[1] * float("nan"), losses[2]]
    if isinstance(engine.method, M.FAMO) and engine.method.post_step_losses == "extra_forward":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return engine.backward(losses, features=z)
    return engine.backward(losses, features=z)


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize(("make", "mode"), _cases())
def test_failed_or_skipped_call_changes_nothing(make, mode, policy):
    torch.manual_seed(0)
    model = MLPModel()
    method = make()
    # A failed call restores even the vjp="auto" timing trials; a skipped step did run its
    # backward passes, and their timings count (the rest of the engine is left as it was).
    engine = mtlfast.MTLBackward(model.trunk, method, mode=mode, on_nonfinite=policy,
                                 vjp="auto" if policy == "raise" else "batched")
    _step(engine, model, seed=1)
    grads, state, eng = _grads(model), _snapshot(method.state_dict()), _engine_state(engine)
    if policy == "raise":
        with pytest.raises(ValueError, match="NaN or Inf"):
            _step(engine, model, seed=2, bad=True)
    else:
        assert bool(_step(engine, model, seed=2, bad=True).skipped)
    for a, b in zip(grads, _grads(model), strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    _same(state, _snapshot(method.state_dict()))
    _same(eng, _engine_state(engine), "engine")


@pytest.mark.parametrize(("make", "mode"), _cases())
def test_a_skipped_step_is_as_if_it_never_happened(make, mode):
    """good, skipped, good == good, good: same .grad and state (random streams included)."""
    runs = []
    for with_bad in (True, False):
        torch.manual_seed(0)
        model = MLPModel()
        method = make()
        engine = mtlfast.MTLBackward(model.trunk, method, mode=mode, on_nonfinite="skip",
                                     vjp="loop")
        _step(engine, model, seed=1)
        if with_bad:
            _step(engine, model, seed=2, bad=True)
        model.zero_grad(set_to_none=True)
        _step(engine, model, seed=3)
        runs.append((_grads(model), _snapshot(method.state_dict())))
    for a, b in zip(runs[0][0], runs[1][0], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    _same(runs[0][1], runs[1][1])


def test_backward_twice_on_the_same_losses_raises_like_torch():
    torch.manual_seed(0)
    model = MLPModel()
    engine = mtlfast.MTLBackward(model.trunk, M.Mean())
    losses, _ = model(*data(model))
    engine.backward(losses)
    grads = _grads(model)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        engine.backward(losses)
    assert all(torch.equal(a, b) for a, b in zip(grads, _grads(model), strict=True))


def test_a_user_error_does_not_switch_the_engine_to_the_loop():
    torch.manual_seed(0)
    model = MLPModel()
    engine = mtlfast.MTLBackward(model.trunk, M.UPGrad(), vjp="batched")
    losses, _ = model(*data(model))
    sum(losses).backward()  # frees the graph: the engine's call is a user error
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError):
            engine.backward(losses)
        assert engine._trunk.enabled and not engine._trunk.verified
        losses, _ = model(*data(model))
        engine.backward(losses)  # batched, no fallback warning
    assert engine._trunk.enabled and engine._trunk.verified


class _Net(nn.Module):
    """Trunk -> features h -> a shared "neck" -> z -> heads (the shared-above-features case)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 6).double()
        self.neck = nn.Linear(6, 6).double()
        self.heads = nn.ModuleList(nn.Linear(6, 1).double() for _ in range(T))

    def forward(self, x, y):
        h = torch.tanh(self.trunk(x))
        z = torch.tanh(self.neck(h))
        return [((head(z).squeeze(-1) - y[:, t]) ** 2).mean()
                for t, head in enumerate(self.heads)], h, z


def _net_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, generator=g, dtype=torch.float64), \
        torch.randn(8, T, generator=g, dtype=torch.float64)


def test_shared_parameter_between_features_and_losses_raises():
    net = _Net()
    losses, h, _ = net(*_net_data())
    shared = [*net.trunk.parameters(), *net.neck.parameters()]
    with pytest.raises(ValueError, match=r"shared\[2\].*between the features and the losses"):
        mtlfast.backward(losses, shared, M.Mean(), features=h)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("how", ["twice", "nested"])
def test_features_counted_twice_raise(how):
    net = _Net()
    losses, h, z = net(*_net_data())
    shared = [*net.trunk.parameters(), *net.neck.parameters()]
    features = (z, z) if how == "twice" else (h, z)
    match = "features\\[1\\] is features\\[0\\]" if how == "twice" else "computed from features"
    with pytest.raises(ValueError, match=match):
        mtlfast.backward(losses, shared, M.Mean(), features=features)


@pytest.mark.parametrize("which", ["whole model", "heads only"])
def test_head_parameters_passed_as_shared_raise(which):
    net = _Net()
    losses, _, _ = net(*_net_data())
    shared = net if which == "whole model" else net.heads
    with pytest.raises(ValueError, match="reached by the loss of task .* only"):
        mtlfast.MTLBackward(shared, M.UPGrad()).backward(losses)
    assert all(p.grad is None for p in net.parameters())


def test_distributed_mode_is_checked_without_a_process_group():
    with pytest.raises(ValueError, match="distributed_mode must be one of"):
        mtlfast.MTLBackward(nn.Linear(2, 2), distributed_mode="exakt")


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_backward_under_no_grad_says_so(context):
    model = MLPModel()
    with context():
        losses, _ = model(*data(model))
        with pytest.raises(ValueError, match=context.__name__):
            mtlfast.backward(losses, model.trunk)


def test_model_on_the_meta_device_says_so():
    with torch.device("meta"):
        model = MLPModel()
        losses, _ = model(torch.randn(6, 5, dtype=torch.float64),
                          torch.randn(6, T, dtype=torch.float64))
    with pytest.raises(ValueError, match="meta device"):
        mtlfast.backward(losses, model.trunk)


@pytest.mark.parametrize("factory", [M.MoCo, M.DBMTL, lambda: M.GradDrop(seed=1)],
                         ids=["MoCo", "DBMTL", "GradDrop"])
def test_engine_skip_runs_raise_policy_whole_jacobian_methods(factory):
    model = MLPModel()
    engine = mtlfast.MTLBackward(model.trunk, factory(), on_nonfinite="skip")
    assert bool(_step(engine, model, seed=0, bad=True).skipped)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_graddrop_update_is_detached():
    G = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    assert not M.GradDrop(seed=0)(G).requires_grad


def test_gradvac_default_seed_follows_torch_manual_seed():
    K = torch.randn(4, 9, dtype=torch.float64)
    K = K @ K.T
    torch.manual_seed(3)
    a = M.GradVac().weights(K)
    torch.manual_seed(3)
    b = M.GradVac().weights(K)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_famo_used_as_a_drop_in_learns():
    method = M.FAMO(lr=0.1)
    with pytest.warns(RuntimeWarning, match="update"):
        _train(method, steps=5)
    assert method.logits.abs().sum() > 0


def test_uw_parameters_outside_the_optimizer_are_detected():
    with pytest.warns(RuntimeWarning, match="not being optimized"):
        _train(M.UW(T), steps=3)  # the optimizer gets the model only, not UW's log-variances


def _train(method, steps):
    """``steps`` SGD steps of the model alone (not the method's parameters) with ``method``."""
    torch.manual_seed(0)
    model = MLPModel()
    engine = mtlfast.MTLBackward(model.trunk, method)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        opt.zero_grad()
        losses, _ = model(*data(model, seed=step))
        engine.backward(losses)
        opt.step()
