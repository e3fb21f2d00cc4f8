"""The batched backward when the gradient hooks run on another thread, as autograd runs them
for CUDA tensors (its device thread). Reproduces on the CPU the H200 failure of the full-step
benchmark: "vmap: aten::copy_ ... other being vmapped over" in jacobian mode, then
"Batching rule not implemented for aten::is_nonzero" from a wrapped Gram in gramian mode."""

import threading
import warnings

import pytest
import torch

import mtlfast
from mtlfast.methods import UPGrad

from ..conftest import rel_err
from .models import MLPModel, data, reference_step, shared_params


@pytest.fixture
def hooks_on_a_worker_thread(monkeypatch):
    """Every tensor hook runs on a fresh thread (vmap nesting counter 0 there, as on autograd's
    CUDA device thread), with the caller blocked until it returns."""
    register = torch.Tensor.register_hook

    def register_on_thread(self, hook):
        def threaded(grad):
            box = {}

            def target():
                try:
                    box["out"] = hook(grad)
                except BaseException as exc:  # re-raised on the autograd thread
                    box["exc"] = exc

            worker = threading.Thread(target=target)
            worker.start()
            worker.join()
            if "exc" in box:
                raise box["exc"]
            return box["out"]

        return register(self, threaded)

    monkeypatch.setattr(torch.Tensor, "register_hook", register_on_thread)


@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
def test_batched_backward_with_hooks_on_another_thread(hooks_on_a_worker_thread, mode):
    torch.manual_seed(0)
    model = MLPModel()
    x, y = data(model)
    method = UPGrad()
    engine = mtlfast.MTLBackward(shared_params(model), method, mode=mode)
    losses, z = model(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to the loop warns: it must not happen
        info = engine.backward(losses, features=z)
    assert engine._trunk.enabled and engine._trunk.verified
    assert not torch._C._functorch.is_legacy_batchedtensor(info.gram)
    got = torch.cat([p.grad.reshape(-1) for p in shared_params(model)])
    model.zero_grad(set_to_none=True)
    losses, _ = model(x, y)
    heads = [p for n, p in model.named_parameters() if n.startswith("heads.")]
    reference_step(losses, shared_params(model), method, head_params=heads)
    want = torch.cat([p.grad.reshape(-1) for p in shared_params(model)])
    assert rel_err(got, want) < 1e-10
