"""UPGrad (the default), PCGrad and layer-wise GradVac against torchjd 0.18 and the task loop."""

import copy

import pytest
import torch

import mtlfast
from mtlfast.methods import GradVac, PCGrad, UPGrad

from ..conftest import rel_err
from .models import CNNModel, MLPModel, data, reference_step, shared_params


def _heads(model):
    return [p for n, p in model.named_parameters() if n.startswith("heads.")]


def _flat_grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
def test_default_upgrad_matches_torchjd_mtl_backward(mode):
    autojac = pytest.importorskip("torchjd.autojac")
    aggregation = pytest.importorskip("torchjd.aggregation")
    from torchjd._linalg import QuadprogProjector
    torch.manual_seed(0)
    model = MLPModel(d_hidden=16)
    twin = copy.deepcopy(model)
    x, y = data(model, batch=16)
    losses, z = model(x, y)
    info = mtlfast.backward(losses, model.trunk, features=z, mode=mode)  # method: UPGrad()
    losses, z = twin(x, y)
    shared = list(twin.trunk.parameters())
    autojac.mtl_backward(losses, features=z, shared_params=shared)
    # torchjd regularizes the Gram by 1e-4 by default; unregularized, both are the exact UPGrad.
    exact = aggregation.UPGrad(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))
    weights = autojac.jac_to_grad(shared, exact)
    assert rel_err(_flat_grads(model), _flat_grads(twin)) < 1e-7
    if weights is not None:
        torch.testing.assert_close(info.weights.to(weights), weights, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", [lambda: UPGrad(), lambda: PCGrad(seed=3)],
                         ids=["UPGrad", "PCGrad"])
@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
def test_matches_hand_written_loop(method, mode):
    torch.manual_seed(0)
    model = CNNModel(tasks=5)
    twin = copy.deepcopy(model)
    x, y = data(model)
    torch.manual_seed(1)
    losses, z = model(x, y)
    mtlfast.backward(losses, model.trunk, method(), features=z, mode=mode)
    torch.manual_seed(1)
    losses, _ = twin(x, y)
    reference_step(losses, shared_params(twin), method(), head_params=_heads(twin))
    assert rel_err(_flat_grads(model), _flat_grads(twin)) < 1e-8


@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
def test_layerwise_gradvac(mode):
    torch.manual_seed(0)
    model = MLPModel()
    twin = copy.deepcopy(model)
    engine = mtlfast.MTLBackward(model.trunk, GradVac(granularity="parameter", seed=0),
                                 mode=mode)
    reference = GradVac(granularity="parameter", seed=0)
    for step in range(2):  # the EMA state carries over
        x, y = data(model, seed=step)
        losses, _ = model(x, y)
        info = engine.backward(losses)
        assert info.weights.shape == (4, 3) and info.gram.shape == (4, 3, 3)
        losses, _ = twin(x, y)
        reference_step(losses, shared_params(twin), reference, head_params=_heads(twin))
        assert rel_err(_flat_grads(model), _flat_grads(twin)) < 1e-10
