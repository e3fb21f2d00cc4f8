import pytest
import torch
from torch import nn

from mtlfast.baselines import per_task_backward
from mtlfast.methods import Mean, Sum
from mtlfast.methods.base import GramMethod, JacobianMethod


def _model_and_losses(T=3, seed=0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(T))
    x = torch.randn(9, 5)
    z = trunk(x)
    losses = [(head(z).squeeze(1) - t).pow(2).mean() for t, head in enumerate(heads)]
    return trunk, heads, losses


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


class RecordingGram(GramMethod):
    """Weights (1, 2, ..., T); records the Gram and losses it was given."""

    def _weights(self, gram, losses):
        self.seen = (gram.clone(), losses.clone())
        return torch.arange(1, gram.shape[-1] + 1, dtype=gram.dtype)


def test_sum_and_mean_reproduce_plain_backward():
    trunk, heads, losses = _model_and_losses()
    sum(losses).backward()
    expected_trunk, expected_heads = _grads(trunk), _grads(heads)
    for method, scale in ((Sum(), 1.0), (Mean(), 1 / 3)):
        trunk, heads, losses = _model_and_losses()
        per_task_backward(losses, trunk, method)
        for got, want in zip(_grads(trunk), expected_trunk, strict=True):
            torch.testing.assert_close(got, want * scale)
        # Heads keep their ordinary gradients whatever the method.
        for got, want in zip(_grads(heads), expected_heads, strict=True):
            torch.testing.assert_close(got, want)


def test_gram_and_update_against_autograd_per_task():
    trunk, heads, losses = _model_and_losses()
    params = list(trunk.parameters())
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params,
                                                                  retain_graph=True)])
            for loss in losses]
    G = torch.stack(rows)
    method = RecordingGram()
    w = per_task_backward({"a": losses[0], "b": losses[1], "c": losses[2]}, params, method)
    torch.testing.assert_close(method.seen[0], G @ G.T)
    torch.testing.assert_close(method.seen[1], torch.stack([v.detach() for v in losses]))
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, 3.0]))
    update = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(update, torch.tensor([1.0, 2.0, 3.0]) @ G)


def test_jacobian_method_and_accumulation():
    class FirstRow(JacobianMethod):
        def aggregate(self, G, losses=None):
            return G[0]

    trunk, heads, losses = _model_and_losses()
    first = torch.autograd.grad(losses[0], list(trunk.parameters()), retain_graph=True)
    for p in trunk.parameters():
        p.grad = torch.ones_like(p)
    assert per_task_backward(losses, trunk, FirstRow()) is None
    for p, g in zip(trunk.parameters(), first, strict=True):
        torch.testing.assert_close(p.grad, g + 1)


def test_bad_input():
    trunk, heads, losses = _model_and_losses()
    with pytest.raises(ValueError, match="at least one scalar loss"):
        per_task_backward([], trunk, Mean())
    with pytest.raises(ValueError, match=r"losses\[0\] must be a scalar"):
        per_task_backward([torch.ones(2, requires_grad=True)], trunk, Mean())
    with pytest.raises(ValueError, match="shared must hold"):
        per_task_backward(losses, [], Mean())
