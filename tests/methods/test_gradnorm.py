import copy

import pytest
import torch

from mtlfast.methods import GradNorm
from tests.methods._helpers import matrix


def _reference_step(w, G, losses, initial, alpha, lr):
    """One step of the paper's L_grad by autograd, then the renormalization to sum T."""
    w = w.clone().requires_grad_(True)
    norms = G.norm(dim=1)
    ratio = losses / initial
    r = ratio / ratio.mean()
    weighted = w * norms
    target = (weighted.mean() * r ** alpha).detach()
    (weighted - target).abs().sum().backward()
    new = (w - lr * w.grad / norms.mean()).detach().clamp_min(0)
    return new * len(new) / new.sum()


def test_matches_autograd_reference_over_steps():
    T = 4
    method = GradNorm(alpha=1.5, lr=0.1)
    w = torch.ones(T, dtype=torch.float64)
    initial = None
    for step in range(5):
        G = matrix(T, 30, seed=step)
        losses = torch.rand(T, dtype=torch.float64).add(0.5)
        initial = losses if initial is None else initial
        got = method.weights(G @ G.T, losses)
        torch.testing.assert_close(got, w)
        w = _reference_step(w, G, losses, initial, 1.5, 0.1)
        torch.testing.assert_close(method.task_weights, w)
        torch.testing.assert_close(method.task_weights.sum(), torch.tensor(T, dtype=torch.float64))


def test_lagging_task_gains_weight():
    G = matrix(3, 20, scales=False)
    G = G / G.norm(dim=1, keepdim=True)  # equal norms: only the loss ratios matter
    method = GradNorm()
    method.weights(G @ G.T, torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    method.weights(G @ G.T, torch.tensor([0.5, 0.5, 0.9], dtype=torch.float64))
    w = method.task_weights
    assert w[2] > 1 > w[0]


def test_equalizes_gradient_norms_without_losses():
    G = matrix(3, 20, scales=False) * torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)
    method = GradNorm(lr=0.1)
    for _ in range(40):
        w = method.weights(G @ G.T)
    weighted = w * G.norm(dim=1)
    assert weighted.max() / weighted.min() < 1.2


def test_state_dict_round_trip_mid_training():
    method = GradNorm()
    for step in range(3):
        G = matrix(4, 10, seed=step)
        method.weights(G @ G.T, torch.rand(4, dtype=torch.float64) + 0.5)
    restored = GradNorm()
    restored.load_state_dict(copy.deepcopy(method.state_dict()))
    G = matrix(4, 10, seed=9)
    losses = torch.rand(4, dtype=torch.float64) + 0.5
    torch.testing.assert_close(restored.weights(G @ G.T, losses), method.weights(G @ G.T, losses))
    torch.testing.assert_close(restored.task_weights, method.task_weights)


def test_skipped_step_keeps_weights():
    method = GradNorm(on_nonfinite="skip")
    G = matrix(3, 10)
    method.weights(G @ G.T, torch.ones(3, dtype=torch.float64))
    before = method.task_weights.clone()
    assert torch.equal(method.weights(G @ G.T, torch.tensor([1.0, float("nan"), 1.0],
                                                            dtype=torch.float64)),
                       torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(method.task_weights, before)


def test_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="alpha"):
        GradNorm(alpha=-1.0)
    with pytest.raises(ValueError, match="lr"):
        GradNorm(lr=0.0)
