"""Every mode against the hand-written per-task loop and against plain ``loss.backward()``."""

import copy
import warnings

import pytest
import torch

import mtlfast
from mtlfast.methods import Mean, Sum

from ..conftest import no_host_sync, rel_err
from .models import (
    CNNModel,
    LayerwiseNormalized,
    LSTMModel,
    Median,
    MLPModel,
    Normalized,
    Projected,
    data,
    reference_step,
    shared_params,
)

MODELS = [MLPModel, CNNModel, LSTMModel]


def _flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _twins(model_cls, seed=0):
    torch.manual_seed(seed)
    model = model_cls()
    return model, copy.deepcopy(model), data(model)


def _forward(model, x, y, seed=1):
    torch.manual_seed(seed)  # same dropout masks in both twins
    return model(x, y)


def _heads(model):
    return [p for n, p in model.named_parameters() if n.startswith("heads.")]


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("mode", ["jacobian", "gramian", "features", "auto"])
@pytest.mark.parametrize("scalarization", ["sum", "mean"])
def test_linear_scalarization_matches_plain_backward(model_cls, mode, scalarization):
    # Sum: exactly sum(losses).backward(). Mean: the shared parameters get mean(losses)'s
    # gradient, the heads their own task's gradient (as always), i.e. sum(losses)'s.
    model, twin, (x, y) = _twins(model_cls)
    method = Sum() if scalarization == "sum" else Mean()
    losses, z = _forward(model, x, y)
    info = mtlfast.backward(losses, shared_params(model), method, features=z, mode=mode)
    assert info.mode == ("jacobian" if mode == "auto" else mode)
    losses, _ = _forward(twin, x, y)
    scale = 1.0 if scalarization == "sum" else 1.0 / len(losses)
    shared = shared_params(twin)
    for p, g in zip(shared, torch.autograd.grad(sum(losses) * scale, shared, retain_graph=True),
                    strict=True):
        p.grad = g
    sum(losses).backward(inputs=_heads(twin))
    assert rel_err(_flat_grads(model), _flat_grads(twin)) < 1e-12


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("method_cls", [Normalized, Projected, LayerwiseNormalized, Median])
@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
@pytest.mark.parametrize("with_features", [False, True])
def test_matches_per_task_loop(model_cls, method_cls, mode, with_features):
    if method_cls is Median and mode == "gramian":
        pytest.skip("whole-Jacobian method")
    model, twin, (x, y) = _twins(model_cls)
    losses, z = _forward(model, x, y)
    info = mtlfast.backward(losses, shared_params(model), method_cls(),
                            features=z if with_features else None, mode=mode)
    assert not info.skipped
    losses, _ = _forward(twin, x, y)
    reference_step(losses, shared_params(twin), method_cls(), head_params=_heads(twin))
    assert rel_err(_flat_grads(model), _flat_grads(twin)) < 1e-10


@pytest.mark.parametrize("method_cls", [Normalized, Projected, LayerwiseNormalized])
@pytest.mark.parametrize("chunk_size", [1, 2])
def test_jacobian_and_gramian_agree_in_float32(method_cls, chunk_size):
    updates, grams = [], []
    for mode, chunks in [("jacobian", None), ("gramian", None), ("jacobian", chunk_size),
                         ("gramian", chunk_size)]:
        torch.manual_seed(0)
        model = CNNModel(tasks=5, dtype=torch.float32)
        x, y = data(model, batch=8)
        losses, z = _forward(model, x, y)
        info = mtlfast.backward(losses, model.trunk, method_cls(), mode=mode, chunk_size=chunks)
        updates.append(_flat_grads(model))
        grams.append(info.gram)
    for u, K in zip(updates[1:], grams[1:], strict=True):
        assert rel_err(u, updates[0]) < 1e-5
        assert rel_err(K, grams[0]) < 1e-5


@pytest.mark.parametrize("model_cls", MODELS)
def test_features_mode_is_the_gram_of_the_feature_jacobian(model_cls):
    model, twin, (x, y) = _twins(model_cls)
    losses, z = _forward(model, x, y)
    info = mtlfast.backward(losses, shared_params(model), Projected(), features=z,
                            mode="features")
    losses, z = _forward(twin, x, y)
    L = torch.stack(losses)
    J = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1)
                     for loss in losses])
    w = Projected().weights(J @ J.T, L.detach())
    torch.testing.assert_close(info.gram, J @ J.T)
    torch.testing.assert_close(info.weights, w)
    shared = shared_params(twin)
    for p, g in zip(shared, torch.autograd.grad((w * L).sum(), shared, retain_graph=True),
                    strict=True):
        p.grad = g
    for p, g in zip(_heads(twin), torch.autograd.grad(L.sum(), _heads(twin)), strict=True):
        p.grad = g
    assert rel_err(_flat_grads(model), _flat_grads(twin)) < 1e-12


def test_auto_picks_gramian_over_budget():
    model, twin, (x, y) = _twins(MLPModel)
    losses, _ = _forward(model, x, y)
    info = mtlfast.backward(losses, model.trunk, Projected(), jacobian_budget=0)
    assert info.mode == "gramian"
    losses, _ = _forward(twin, x, y)
    reference_step(losses, shared_params(twin), Projected(), head_params=_heads(twin))
    assert rel_err(_flat_grads(model), _flat_grads(twin)) < 1e-10


def test_dropout_masks_are_shared_by_all_tasks():
    # Dropout on the trunk input: per-task gradients from one forward = one mask for all tasks.
    torch.manual_seed(0)
    model = CNNModel(tasks=3)
    x, y = data(model)
    losses, _ = _forward(model, x, y)
    engine = mtlfast.MTLBackward(model.trunk, Normalized(), mode="jacobian")
    engine.backward(losses)
    got = _flat_grads(model)
    model.zero_grad(set_to_none=True)
    losses, _ = _forward(model, x, y)  # same seed -> same masks; another seed would differ
    reference_step(losses, shared_params(model), Normalized(), head_params=_heads(model))
    assert rel_err(got, _flat_grads(model)) < 1e-10


class _HostDouble(torch.autograd.Function):
    """2x, with a backward through NumPy: no batching rule can exist for it."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return torch.from_numpy(g.detach().numpy() * 2)


class _HostModel(MLPModel):
    def forward(self, x, y):
        z = _HostDouble.apply(self.trunk[:2](x))
        z = self.trunk[2:](z)
        losses = [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(self.heads)]
        return losses, z


@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
def test_loop_fallback_warns_once_and_matches(mode):
    model, twin, (x, y) = _twins(_HostModel)
    engine = mtlfast.MTLBackward(shared_params(model), Projected(), mode=mode)
    for step in range(2):
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        losses, _ = model(x, y)
        if step == 0:
            with pytest.warns(RuntimeWarning, match="loop of backward passes"):
                engine.backward(losses)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                engine.backward(losses)
        losses, _ = twin(x, y)
        reference_step(losses, shared_params(twin), Projected(), head_params=_heads(twin))
        assert rel_err(_flat_grads(model), _flat_grads(twin)) < 1e-10


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_trunk_gives_the_same_gradients(backend):
    # Batched backward may or may not work through a compiled graph (inductor: it does not,
    # and the loop fallback takes over); the gradients are the same either way.
    torch.manual_seed(0)
    model = MLPModel(dtype=torch.float32)
    twin = copy.deepcopy(model)
    x, y = data(model)
    model.trunk = torch.compile(model.trunk, backend=backend)
    engine = mtlfast.MTLBackward(model.trunk, Projected(), mode="jacobian")
    for _ in range(2):
        model.zero_grad()
        twin.zero_grad()
        losses, z = model(x, y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            engine.backward(losses, features=z)
        losses, _ = twin(x, y)
        reference_step(losses, shared_params(twin), Projected(), head_params=_heads(twin))
        assert rel_err(_flat_grads(model), _flat_grads(twin)) < 1e-5


@pytest.mark.parametrize("mode", ["jacobian", "gramian", "features"])
def test_features_as_a_tuple_of_tensors(mode):
    model, twin, (x, y) = _twins(MLPModel)
    z = model.trunk(x)
    za, zb = z[:, :3] * 1.0, z[:, 3:] * 1.0
    zz = torch.cat([za, zb], dim=1)
    losses = [((h(zz).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(model.heads)]
    info = mtlfast.backward(losses, model.trunk, Projected(), features=(za, zb), mode=mode)
    losses, z = twin(x, y)
    if mode == "features":
        J = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1)
                         for loss in losses])
        torch.testing.assert_close(info.gram, J @ J.T)
        return
    reference_step(losses, shared_params(twin), Projected(), head_params=_heads(twin))
    assert rel_err(_flat_grads(model), _flat_grads(twin)) < 1e-10


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["jacobian", "gramian", "features"])
def test_cuda_matches_cpu(mode):
    torch.manual_seed(0)
    cpu = CNNModel(tasks=5, dtype=torch.float32)
    gpu = copy.deepcopy(cpu).cuda()
    x, y = data(cpu, batch=8)
    infos = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        model.eval()  # no dropout: identical forward on both devices
        losses, z = model(x.to(dev), y.to(dev))
        infos.append(mtlfast.backward(losses, model.trunk, Projected(), features=z, mode=mode,
                                      on_nonfinite="skip"))
    assert not bool(infos[1].skipped)
    assert rel_err(infos[1].gram, infos[0].gram) < 1e-4
    assert rel_err(_flat_grads(gpu), _flat_grads(cpu)) < 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["jacobian", "gramian", "features"])
def test_cuda_skip_policy_step_never_syncs(mode):
    torch.manual_seed(0)
    model = CNNModel(tasks=5, dtype=torch.float32).cuda()
    x, y = (t.cuda() for t in data(model, batch=8))
    engine = mtlfast.MTLBackward(model.trunk, Projected(), mode=mode, on_nonfinite="skip")
    losses, z = model(x, y)
    engine.backward(losses, features=z)  # warm-up: buffers, batching decision
    losses, z = model(x, y)
    with no_host_sync():
        engine.backward(losses, features=z)
