"""Issue 6, "a step with no host sync": on CUDA, ``mtlfast.backward`` in jacobian mode for every
Gram method makes no host synchronization (``on_nonfinite="skip"``), and the backward-projection
step can be captured in a CUDA graph and replayed (the recipe in ``mtlfast.api``'s docstring).
On the CPU: no Python-level host read of a tensor during the same step."""

import copy

import pytest
import torch
from torch import nn

import mtlfast
from mtlfast import methods

from .conftest import GRAM_METHODS, no_host_sync, rel_err

# Without host-side state: what a replayed graph reproduces exactly (PCGrad: its orders come
# from a device-side counter, so each replay draws the orders an eager step would).
CAPTURABLE = ["UPGrad", "DualProj", "MGDA", "CAGrad", "IMTLG", "FairGrad", "AlignedMTL",
              "ConFIG", "Mean", "Sum", "PCGrad", "MoDo", "SDMGrad", "RGW"]


def _method(name):
    return methods.PCGrad(seed=11) if name == "PCGrad" else getattr(methods, name)()


class Net(nn.Module):
    def __init__(self, tasks: int = 5) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(32, 1) for _ in range(tasks))

    def forward(self, x, y):
        z = self.trunk(x)
        return [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() for t, h in enumerate(self.heads)], z


def _setup(name):
    torch.manual_seed(0)
    model = Net().cuda()
    method = _method(name)  # its default "raise": the engine's skip flag governs
    engine = mtlfast.MTLBackward(list(model.trunk.parameters()), method, mode="jacobian",
                                 on_nonfinite="skip")
    x = torch.randn(32, 16, device="cuda")
    y = torch.randn(32, len(model.heads), device="cuda")
    return model, engine, x, y


def _grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("cls", GRAM_METHODS, ids=lambda c: c.__name__)
def test_backward_reads_nothing_back_on_cpu(cls, policy, monkeypatch):
    """The CPU stand-in for the CUDA check below: in skip mode no Python-level host read
    (bool/item/tolist/nonzero/int/float of a tensor, which on CUDA would each sync) happens in
    ``backward``, whatever kernels run underneath."""
    torch.manual_seed(0)
    model = Net()
    engine = mtlfast.MTLBackward(list(model.trunk.parameters()), cls(on_nonfinite=policy),
                                 mode="jacobian", on_nonfinite="skip")
    x, y = torch.randn(8, 16), torch.randn(8, len(model.heads))
    losses, z = model(x, y)
    engine.backward(losses, features=z)  # warm-up: buffers, method state
    model.zero_grad(set_to_none=True)
    losses, z = model(x, y)

    def host_read(*args, **kwargs):
        raise AssertionError("a host read of a tensor during backward")

    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    engine.backward(losses, features=z)
    monkeypatch.undo()
    assert torch.isfinite(_grads(model)).all()


@pytest.mark.cuda
@pytest.mark.parametrize("cls", GRAM_METHODS, ids=lambda c: c.__name__)
def test_backward_makes_no_host_sync(cls):
    model, engine, x, y = _setup(cls.__name__)
    for _ in range(2):  # warm-up: buffers, batching decision, lazy method state
        model.zero_grad(set_to_none=True)
        losses, z = model(x, y)
        engine.backward(losses, features=z)
    model.zero_grad(set_to_none=True)
    losses, z = model(x, y)
    with no_host_sync():
        info = engine.backward(losses, features=z)
    assert info.mode == "jacobian"
    assert torch.isfinite(_grads(model)).all()


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["UPGrad", "DualProj", "AlignedMTL", "ConFIG"])
def test_preference_vector_makes_no_host_sync(name):
    pref = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2], dtype=torch.float64)
    method = getattr(methods, name)(pref_vector=pref, on_nonfinite="skip")
    A = torch.randn(5, 30, device="cuda")
    K = A @ A.T
    method.weights(K)
    with no_host_sync():
        w = method.weights(K)
    assert torch.isfinite(w).all()


@pytest.mark.cuda
@pytest.mark.parametrize("name", CAPTURABLE)
def test_captured_step_replays_like_eager(name):
    model, engine, x, y = _setup(name)
    eager_model = copy.deepcopy(model)
    eager_engine = mtlfast.MTLBackward(list(eager_model.trunk.parameters()), _method(name),
                                       mode="jacobian", on_nonfinite="skip")
    for _ in range(3):  # the same warm-up steps as the captured engine (PCGrad's counter)
        losses, z = eager_model(x, y)
        eager_engine.backward(losses, features=z)
    static_x, static_y = x.clone(), y.clone()

    def step():
        losses, z = model(static_x, static_y)
        engine.backward(losses, features=z)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in range(3):  # new data each replay, as in training
        g = torch.Generator(device="cuda").manual_seed(seed)
        static_x.copy_(torch.randn(x.shape, device="cuda", generator=g))
        static_y.copy_(torch.randn(y.shape, device="cuda", generator=g))
        graph.replay()
        eager_model.zero_grad(set_to_none=True)
        losses, z = eager_model(static_x, static_y)
        eager_engine.backward(losses, features=z)
        assert rel_err(_grads(model), _grads(eager_model)) < 1e-5, seed
