"""Bad input: each a clear error naming the argument, and nothing written into ``.grad``."""

import pytest
import torch

import mtlfast
from mtlfast.methods import Sum

from .models import FixedLossWeights, Median, MLPModel, Normalized, RunningMean, data


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = MLPModel()
    x, y = data(model)
    losses, z = model(x, y)
    return model, losses, z


def _no_grads(model):
    return all(p.grad is None for p in model.parameters())


def _raises(exc, match, model, **kwargs):
    with pytest.raises(exc, match=match):
        mtlfast.backward(**kwargs)
    assert _no_grads(model)


def test_non_scalar_loss(setup):
    model, losses, _ = setup
    losses[1] = losses[1].expand(2)
    _raises(ValueError, r"losses\['task 1'\] must be a scalar", model, losses=losses,
            shared=model.trunk, method=Sum())


def test_non_floating_loss(setup):
    model, losses, _ = setup
    _raises(TypeError, "floating", model, losses=[losses[0], torch.tensor(1)],
            shared=model.trunk, method=Sum())


def test_losses_wrong_type_and_empty(setup):
    model, _, _ = setup
    _raises(TypeError, "losses must be", model, losses=3.0, shared=model.trunk, method=Sum())
    _raises(ValueError, "T = 0", model, losses=[], shared=model.trunk, method=Sum())
    _raises(ValueError, "1-D", model, losses=torch.ones(2, 2, requires_grad=True),
            shared=model.trunk, method=Sum())


def test_loss_not_connected_to_shared_names_the_task(setup):
    model, losses, _ = setup
    head_only = model.heads[0].weight.sum()
    named = {"depth": losses[0], "normals": head_only}
    _raises(ValueError, r"losses\['normals'\] is not connected to any shared parameter", model,
            losses=named, shared=model.trunk, method=Sum())
    _raises(ValueError, r"losses\['task 1'\] does not require grad", model,
            losses=[losses[0], torch.tensor(1.0)], shared=model.trunk, method=Sum())


def test_shared_errors(setup):
    model, losses, _ = setup
    _raises(ValueError, "shared is empty", model, losses=losses, shared=[], method=Sum())
    _raises(ValueError, "has no parameters", model, losses=losses, shared=torch.nn.ReLU(),
            method=Sum())
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    _raises(ValueError, r"shared\[1\] .* does not require grad", model, losses=losses,
            shared=[model.trunk[0].weight, frozen], method=Sum())
    _raises(TypeError, "shared must be", model, losses=losses, shared=model.trunk[0].weight,
            method=Sum())
    _raises(ValueError, "not a leaf", model, losses=losses,
            shared=[model.trunk[0].weight * 2], method=Sum())


def test_features_errors(setup):
    model, losses, z = setup
    _raises(ValueError, r"features\[0\] does not require grad", model, losses=losses,
            shared=model.trunk, method=Sum(), features=z.detach())
    _raises(ValueError, "leaf", model, losses=losses, shared=model.trunk, method=Sum(),
            features=z.detach().requires_grad_())
    other = model.trunk(torch.randn(2, 5, dtype=torch.float64))
    _raises(ValueError, r"features\[0\] is not on the graph of the losses|does not depend",
            model, losses=losses, shared=model.trunk, method=Sum(), features=other)
    _raises(TypeError, "features must be", model, losses=losses, shared=model.trunk,
            method=Sum(), features=[])


def test_method_forced_into_a_mode_it_cannot_run_in(setup):
    model, losses, z = setup
    _raises(ValueError, "needs the whole", model, losses=losses, shared=model.trunk,
            method=Median(), mode="gramian")
    _raises(ValueError, "needs features=", model, losses=losses, shared=model.trunk,
            method=Normalized(), mode="features")
    _raises(ValueError, "loss-based", model, losses=losses, shared=model.trunk,
            method=FixedLossWeights(), mode="jacobian")
    _raises(ValueError, "mode must be one of", model, losses=losses, shared=model.trunk,
            method=Sum(), mode="fast")
    _raises(TypeError, "method must be", model, losses=losses, shared=model.trunk,
            method=torch.nn.Linear(2, 2))
    _raises(ValueError, "chunk_size", model, losses=losses, shared=model.trunk, method=Sum(),
            chunk_size=0)
    _raises(TypeError, "grad_scaler", model, losses=losses, shared=model.trunk, method=Sum(),
            grad_scaler=object())


def test_task_count_mismatch_with_stateful_method(setup):
    model, losses, _ = setup
    engine = mtlfast.MTLBackward(model.trunk, RunningMean())
    engine.backward(losses)
    model.zero_grad(set_to_none=True)
    x, y = data(model)
    losses, _ = model(x, y)
    with pytest.raises(ValueError, match="T=3 tasks .* got T=2"):
        engine.backward(losses[:2])
    assert _no_grads(model)


@pytest.mark.parametrize("mode", ["jacobian", "gramian", "features"])
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_raises_before_writing(setup, mode, where):
    model, losses, z = setup
    if where == "loss":
        losses[2] = losses[2] * float("nan")
        match = r"losses \(tasks \[2\]\)"
    else:  # finite losses, infinite gradient in the trunk
        x, y = data(model)
        z = model.trunk[:2](x)
        z = model.trunk[2:](_InfGrad.apply(z))
        losses = [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(model.heads)]
        match = "gradients of the shared parameters contain NaN or Inf"
    with pytest.raises(ValueError, match=match):
        mtlfast.backward(losses, model.trunk, Normalized(), features=z, mode=mode)
    assert _no_grads(model)


@pytest.mark.parametrize("mode", ["jacobian", "gramian", "features"])
@pytest.mark.parametrize("method_cls", [Normalized, Median, FixedLossWeights])
def test_nonfinite_skip_leaves_grads_unchanged(setup, mode, method_cls):
    model, losses, z = setup
    if method_cls is not Normalized and mode != "jacobian":
        pytest.skip("mode not available for this method")
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    losses[0] = losses[0] * float("inf")
    info = mtlfast.backward(losses, model.trunk, method_cls(), features=z,
                            mode="auto" if method_cls is FixedLossWeights else mode,
                            on_nonfinite="skip")
    assert bool(info.skipped)
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 0.5))
    if info.weights is not None:
        assert torch.equal(info.weights, torch.zeros_like(info.weights))
