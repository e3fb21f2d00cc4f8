"""The public training API: drop-in use with optimizers, accumulation, state, AMP."""

import copy

import pytest
import torch

import mtlfast
from mtlfast.methods import Mean, Sum

from .conftest import rel_err
from .engine.models import (
    FixedLossWeights,
    MLPModel,
    Normalized,
    Projected,
    RunningMean,
    data,
    reference_step,
    shared_params,
)


def _heads(model):
    return [p for n, p in model.named_parameters() if n.startswith("heads.")]


def _flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
def test_gradient_accumulation_over_two_micro_batches(mode):
    torch.manual_seed(0)
    model = MLPModel()
    twin = copy.deepcopy(model)
    batches = [data(model, seed=s) for s in (1, 2)]
    for x, y in batches:
        losses, _ = model(x, y)
        mtlfast.backward(losses, model.trunk, Projected(), mode=mode)
    for x, y in batches:
        losses, _ = twin(x, y)
        reference_step(losses, shared_params(twin), Projected(), head_params=_heads(twin))
    assert rel_err(_flat_grads(model), _flat_grads(twin)) < 1e-10


def test_existing_foreign_grad_is_accumulated_in_place():
    torch.manual_seed(0)
    model = MLPModel()
    twin = copy.deepcopy(model)
    x, y = data(model)
    first = model.trunk[0].weight
    first.grad = torch.ones_like(first).t().contiguous().t()  # a user tensor, odd strides
    before = first.grad
    losses, _ = model(x, y)
    mtlfast.backward(losses, model.trunk, Normalized())
    assert model.trunk[0].weight.grad is before
    twin.trunk[0].weight.grad = torch.ones_like(first)
    losses, _ = twin(x, y)
    reference_step(losses, shared_params(twin), Normalized(), head_params=_heads(twin))
    assert rel_err(_flat_grads(model), _flat_grads(twin)) < 1e-10


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_training_with_any_optimizer_matches_the_per_task_loop(opt, set_to_none):
    torch.manual_seed(0)
    model = MLPModel()
    twin = copy.deepcopy(model)

    def make(m):
        if opt == "sgd":
            return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        return torch.optim.Adam(m.parameters(), lr=0.01, foreach=True)

    optim, twin_optim = make(model), make(twin)
    engine = mtlfast.MTLBackward(model.trunk, Projected())
    for step in range(3):
        x, y = data(model, seed=step)
        optim.zero_grad(set_to_none=set_to_none)
        losses, _ = model(x, y)
        engine.backward(losses)
        optim.step()
        twin_optim.zero_grad(set_to_none=set_to_none)
        losses, _ = twin(x, y)
        reference_step(losses, shared_params(twin), Projected(), head_params=_heads(twin))
        twin_optim.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_shared_grads_are_views_of_one_flat_buffer():
    torch.manual_seed(0)
    model = MLPModel()
    x, y = data(model)
    engine = mtlfast.MTLBackward(model.trunk, Sum())
    losses, _ = model(x, y)
    engine.backward(losses)
    flat = engine._shared._grad
    assert flat is not None and flat.numel() == sum(p.numel() for p in model.trunk.parameters())
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    for p in model.trunk.parameters():
        assert start <= p.grad.data_ptr() < end
    # The Jacobian buffer is allocated once and reused across steps.
    J = engine._shared._jacobian
    losses, _ = model(x, y)
    engine.backward(losses)
    assert engine._shared._jacobian is J


def test_functional_backward_reuses_its_engine():
    torch.manual_seed(0)
    model = MLPModel()
    x, y = data(model)
    method = Projected()
    losses, _ = model(x, y)
    mtlfast.backward(losses, model.trunk, method)
    J = mtlfast.api._CACHE[0]._shared._jacobian
    losses, _ = model(x, y)
    mtlfast.backward(losses, model.trunk, method)
    assert mtlfast.api._CACHE[0]._shared._jacobian is J


def test_losses_as_dict_list_or_tensor_agree():
    torch.manual_seed(0)
    model = MLPModel()
    x, y = data(model)
    results = []
    for kind in ("list", "dict", "tensor"):
        model.zero_grad(set_to_none=True)
        losses, _ = model(x, y)
        arg = {"list": losses, "dict": dict(zip("abc", losses, strict=True)),
               "tensor": torch.stack(losses)}[kind]
        info = mtlfast.backward(arg, model.trunk, Normalized())
        results.append((_flat_grads(model), info.weights))
    for g, w in results[1:]:
        torch.testing.assert_close(g, results[0][0])
        torch.testing.assert_close(w, results[0][1])


def test_step_info_and_retain_graph():
    torch.manual_seed(0)
    model = MLPModel()
    x, y = data(model)
    losses, _ = model(x, y)
    info = mtlfast.backward(losses, model.trunk, Mean(), retain_graph=True)
    assert info.weights.shape == (3,) and info.gram.shape == (3, 3)
    torch.testing.assert_close(info.losses, torch.stack(losses).detach())
    assert not bool(info.skipped) and info.mode == "jacobian"
    mtlfast.backward(losses, model.trunk, Mean())  # the graph was kept
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        mtlfast.backward(losses, model.trunk, Mean())


def test_loss_based_method_is_one_weighted_backward():
    torch.manual_seed(0)
    model = MLPModel()
    twin = copy.deepcopy(model)
    x, y = data(model)
    losses, _ = model(x, y)
    info = mtlfast.backward(losses, model.trunk, FixedLossWeights())
    assert info.mode == "losses" and info.gram is None
    torch.testing.assert_close(info.weights, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    losses, _ = twin(x, y)
    sum((t + 1) * loss for t, loss in enumerate(losses)).backward()
    assert rel_err(_flat_grads(model), _flat_grads(twin)) < 1e-12


def test_bfloat16_jacobian_is_close_to_float32():
    torch.manual_seed(0)
    model = MLPModel(dtype=torch.float32)
    x, y = data(model)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        losses, _ = model(x, y)
        mtlfast.backward(losses, model.trunk, Normalized(), jacobian_dtype=dtype)
        out.append(_flat_grads(model))
    assert rel_err(out[1], out[0]) < 2e-2


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(0)
    model = MLPModel()
    x, y = data(model)
    engine = mtlfast.MTLBackward(model.trunk, RunningMean())
    for _ in range(2):
        losses, _ = model(x, y)
        engine.backward(losses)
    state = copy.deepcopy(engine.state_dict())
    assert any(k.endswith("avg") for k in state)
    resumed = mtlfast.MTLBackward(model.trunk, RunningMean())
    resumed.load_state_dict(state)
    weights = []
    for e in (engine, resumed):
        losses, _ = model(x, y)
        weights.append(e.backward(losses).weights)
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)
    fresh = mtlfast.MTLBackward(model.trunk, RunningMean())
    losses, _ = model(x, y)
    assert not torch.equal(fresh.backward(losses).weights, weights[0])


def _amp_model():
    torch.manual_seed(0)
    return MLPModel(dtype=torch.float32)


@pytest.mark.parametrize("overflow", [False, True])
@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
def test_grad_scaler_matches_scaled_backward(overflow, mode):
    model = _amp_model()
    twin = copy.deepcopy(model)
    x, y = data(model)
    runs = []
    for m, use_engine in ((model, True), (twin, False)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses, _ = m(x, y)
        if overflow:
            losses[1] = losses[1] * float("inf")
        if use_engine:
            info = mtlfast.backward(losses, m.trunk, Sum(), mode=mode, grad_scaler=scaler)
            assert bool(info.skipped) == overflow
        else:
            scaler.scale(sum(losses)).backward()
        scaler.step(opt)
        scaler.update()
        runs.append((scaler.get_scale(), [p.detach().clone() for p in m.parameters()]))
    assert runs[0][0] == runs[1][0] == (2.0**11 if overflow else 2.0**12)
    start = [p.detach() for p in _amp_model().parameters()]
    moved = [torch.cat([(p - p0).reshape(-1) for p, p0 in zip(run[1], start, strict=True)])
             for run in runs]
    if overflow:  # the scaler skipped optimizer.step() in both
        assert not moved[0].any() and not moved[1].any()
    else:  # bf16 activations: per-task then summed vs summed then back-propagated
        assert rel_err(moved[0], moved[1]) < 2e-2


def test_grad_scaler_method_sees_unscaled_gradients():
    model = _amp_model()
    x, y = data(model)
    losses, _ = model(x, y)
    plain = mtlfast.backward(losses, model.trunk, Normalized(), retain_graph=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled = mtlfast.backward(losses, model.trunk, Normalized(), grad_scaler=scaler)
    torch.testing.assert_close(scaled.gram, plain.gram, rtol=1e-5, atol=0)
    torch.testing.assert_close(scaled.weights, plain.weights, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["NashMTL", "GradVac", "GradNorm"])
def test_engine_skip_keeps_a_raise_methods_state_on_a_skipped_step(name):
    # The engine's skip flag governs the method (whatever its own policy): a non-finite step
    # writes nothing and leaves the stateful method's buffers as the last good step left them.
    from mtlfast import methods

    torch.manual_seed(0)
    model = MLPModel()
    x, y = data(model)
    method = getattr(methods, name)()  # on_nonfinite="raise"
    engine = mtlfast.MTLBackward(model.trunk, method, on_nonfinite="skip")
    losses, _ = model(x, y)
    assert not bool(engine.backward(losses).skipped)
    state = copy.deepcopy(method.state_dict())
    grads = _flat_grads(model).clone()
    losses, _ = model(x, y)
    losses = [losses[0] * float("nan"), *losses[1:]]
    assert bool(engine.backward(losses).skipped)
    assert torch.equal(_flat_grads(model), grads)
    # State tensors (buffers); host-side counters and generators advance on any call, as under
    # the method's own skip policy (tests/methods/test_properties.py).
    after = method.state_dict()
    tensors = {k for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert tensors and tensors == {k for k, v in after.items() if isinstance(v, torch.Tensor)}
    for k in tensors:
        assert torch.equal(after[k], state[k]), k
