"""Exact gradient accumulation: k micro-batches, one solve == one batch of k x B."""

import functools

import pytest
import torch

import mtlfast
import mtlfast.methods as M

from ..conftest import GRAM_METHODS
from ..methods.test_properties_loss_jacobian import JACOBIAN_FACTORIES
from .models import MLPModel, data
from .test_trust import _same, _snapshot, make_gram

T = 3


def _factories():
    out = [pytest.param(make_gram(c), id=c.__name__) for c in GRAM_METHODS]
    out.append(pytest.param(functools.partial(M.GradVac, granularity="parameter", seed=2),
                            id="GradVac-parameter"))
    out += [pytest.param(functools.partial(f, T), id=name)
            for name, f in JACOBIAN_FACTORIES.items()]
    return out


def _batches(k, batch=6, seed=0):
    model = MLPModel()
    parts = [data(model, batch=batch, seed=seed + i) for i in range(k)]
    return parts, (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))


def _grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _run(make, batches, accumulate, with_features, steps=2, **kw):
    torch.manual_seed(0)
    model = MLPModel()
    method = make()
    engine = mtlfast.MTLBackward(model.trunk, method, mode="jacobian", accumulate=accumulate)
    infos = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        for x, y in batches:
            losses, z = model(x, y)
            infos.append(engine.backward(losses, features=z if with_features else None, **kw))
    return model, method, infos


@pytest.mark.parametrize("with_features", [False, True], ids=["no-features", "features"])
@pytest.mark.parametrize("make", _factories())
def test_two_micro_batches_equal_one_batch_of_twice_the_size(make, with_features):
    parts, whole = _batches(2)
    model_a, method_a, infos = _run(make, parts, 2, with_features)
    model_b, method_b, _ = _run(make, [whole], 1, with_features)
    assert [i.mode for i in infos] == ["accumulating", "jacobian"] * 2
    torch.testing.assert_close(_grads(model_a), _grads(model_b), rtol=1e-10, atol=1e-12)
    a, b = _snapshot(method_a.state_dict()), _snapshot(method_b.state_dict())
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor) and a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)
        else:
            _same(a[k], b[k], k)


def test_a_micro_batch_writes_nothing():
    torch.manual_seed(0)
    model = MLPModel()
    engine = mtlfast.MTLBackward(model.trunk, M.UPGrad(), accumulate=3)
    losses, _ = model(*data(model))
    info = engine.backward(losses)
    assert info.mode == "accumulating" and info.weights is None
    assert all(p.grad is None for p in model.parameters())


def test_step_true_closes_a_short_group():
    parts, _ = _batches(2)
    _, whole = _batches(2)
    torch.manual_seed(0)
    model = MLPModel()
    engine = mtlfast.MTLBackward(model.trunk, M.MGDA(), accumulate=4)
    for i, (x, y) in enumerate(parts):
        losses, _ = model(x, y)
        info = engine.backward(losses, step=i == 1)
    assert info.mode == "jacobian"
    model_b, _, _ = _run(M.MGDA, [whole], 1, False, steps=1)
    torch.testing.assert_close(_grads(model), _grads(model_b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_bad_micro_batch(policy):
    parts, _ = _batches(3)
    torch.manual_seed(0)
    model = MLPModel()
    engine = mtlfast.MTLBackward(model.trunk, M.UPGrad(), accumulate=2, on_nonfinite=policy)
    x, y = parts[0]
    losses, _ = model(x, y)
    engine.backward(losses)
    bad = [losses_i * float("nan") if t == 1 else losses_i
           for t, losses_i in enumerate(model(*parts[1])[0])]
    if policy == "raise":  # the sums are left as they were: the group continues
        with pytest.raises(ValueError, match="NaN or Inf"):
            engine.backward(bad)
        losses, _ = model(*parts[1])
        assert engine.backward(losses).mode == "jacobian"
        model_b, _, _ = _run(M.UPGrad, parts[:2], 2, False, steps=1)
        torch.testing.assert_close(_grads(model), _grads(model_b), rtol=1e-12, atol=0)
    else:  # the NaN reaches the sums: the accumulated step is skipped as a whole
        info = engine.backward(bad)
        assert info.mode == "jacobian" and bool(info.skipped)
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())
        assert engine._engine.accumulator.count == 0


@pytest.mark.parametrize(("method", "mode"), [(M.UPGrad, "gramian"), (M.UPGrad, "features"),
                                              (lambda: M.RLW(seed=0), "auto")])
def test_modes_that_cannot_accumulate_say_so(method, mode):
    model = MLPModel()
    losses, z = model(*data(model))
    engine = mtlfast.MTLBackward(model.trunk, method(), mode=mode, accumulate=2)
    with pytest.raises(ValueError, match="accumulate=2"):
        engine.backward(losses, features=z)


def test_step_needs_accumulation_and_accumulate_is_checked():
    model = MLPModel()
    losses, _ = model(*data(model))
    with pytest.raises(ValueError, match="accumulate > 1"):
        mtlfast.MTLBackward(model.trunk, M.Mean()).backward(losses, step=True)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="accumulate must be a positive int"):
            mtlfast.MTLBackward(model.trunk, accumulate=bad)
