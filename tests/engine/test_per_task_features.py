"""Models whose tasks see different representations (MMoE-style: per-task mixtures of shared
experts). ``features=`` takes either the per-task representations ``(T, B, D)`` or the experts'
outputs ``(E, B, D)``; the feature Gram is what its definition says for each, and every mode
and method runs on such a model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtlfast
from mtlfast import methods

T, E, B, D, H = 4, 3, 12, 7, 5


class LoopMMoE(nn.Module):
    """Experts on the input, a softmax gate per task, per-task mixtures, one output per task."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, H), nn.Tanh()) for _ in range(E))
        self.gates = nn.ModuleList(nn.Linear(D, E) for _ in range(T))
        self.heads = mtlfast.FusedHeads(H, {f"t{t}": 2 for t in range(T)}, hidden=6)

    def forward(self, x):
        h = torch.stack([e(x) for e in self.experts])                      # (E, B, H)
        g = torch.stack([torch.softmax(gate(x), -1) for gate in self.gates])  # (T, B, E)
        z = torch.einsum("tbe,ebh->tbh", g, h)                               # (T, B, H)
        return h, z, self.heads(z, per_task=True)


def _losses(out, y):
    return torch.stack([((o - y[t]) ** 2).mean() for t, o in enumerate(out.values())])


def _problem(seed, dtype=torch.float64):
    torch.manual_seed(seed)
    model = LoopMMoE().to(dtype)
    x = torch.randn(B, D, dtype=dtype)
    y = torch.randn(T, B, 2, dtype=dtype)
    return model, x, y


def _feature_gram_reference(losses, feature):
    rows = [torch.autograd.grad(loss, feature, retain_graph=True)[0].reshape(-1)
            for loss in losses]
    J = torch.stack(rows)
    return J @ J.T


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("which", ["per_task", "experts"])
def test_feature_gram_of_per_task_or_expert_representations(seed, which):
    model, x, y = _problem(seed)
    h, z, out = model(x)
    losses = _losses(out, y)
    feature = z if which == "per_task" else h
    K_ref = _feature_gram_reference(losses, feature)
    info = mtlfast.backward(losses, model.experts, methods.MGDA(), features=feature,
                            mode="features")
    torch.testing.assert_close(info.gram, K_ref, rtol=1e-9, atol=1e-12)
    if which == "per_task":  # task t reaches row t of z only: no cross terms
        assert torch.count_nonzero(K_ref - torch.diag(K_ref.diagonal())) == 0
    else:
        assert (K_ref - torch.diag(K_ref.diagonal())).abs().max() > 0


@pytest.mark.parametrize("name", ["upgrad", "mgda", "pcgrad", "cagrad", "nashmtl", "imtlg",
                                  "famo", "mean"])
@pytest.mark.parametrize("features", ["none", "per_task", "experts"])
def test_jacobian_mode_does_not_depend_on_where_features_split_the_graph(name, features):
    """``features=`` only says where the heads end: the exact step is the same."""
    grads = []
    for feats in ("none", features):
        model, x, y = _problem(0)
        h, z, out = model(x)
        losses = _losses(out, y)
        torch.manual_seed(1)
        method = methods.get(name, num_tasks=T)
        mode = "auto" if method.needs == "losses" else "jacobian"
        chosen = {"none": None, "per_task": z, "experts": h}[feats]
        mtlfast.MTLBackward(model.experts, method, mode=mode).backward(losses, chosen)
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in methods.available()
                                  if methods.get(n, num_tasks=T).needs == "gram"])
@pytest.mark.parametrize("which", ["per_task", "experts"])
def test_every_gram_method_runs_in_features_mode_on_mixtures(name, which):
    model, x, y = _problem(0, torch.float32)
    h, z, out = model(x)
    losses = _losses(out, y)
    torch.manual_seed(0)
    method = methods.get(name, num_tasks=T)
    if getattr(method, "granularity", "whole") != "whole":
        pytest.skip(f"{name} is layer-wise: features mode has no layers")
    info = mtlfast.backward(losses, model.experts, method,
                            features=z if which == "per_task" else h, mode="features")
    assert info.mode == "features" and info.weights.shape == (T,)
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
