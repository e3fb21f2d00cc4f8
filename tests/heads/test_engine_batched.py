"""FusedHeads under the engine's batched backward (legacy vmap: ``autograd.grad(...,
is_grads_batched=True)``) with the Triton kernels selected, as on CUDA: the gradients that
reach the heads' backward are batched tensors, which a Triton launch cannot take (no storage).
On the CPU the same branch runs with ``MTLFAST_HEADS_TRITON=1`` in the Triton interpreter."""

import warnings

import pytest
import torch
from torch import nn

import mtlfast
from mtlfast import _ext
from mtlfast.methods import UPGrad

from ..conftest import rel_err

pytestmark = pytest.mark.skipif(not _ext.has_triton() or torch.cuda.is_available(),
                                reason="CPU check of the Triton branch (interpreter)")


def _losses(trunk, heads, x, y):
    z = trunk(x)
    out = heads(z)
    return {t: ((o.squeeze(-1) - y[:, i]) ** 2).mean() for i, (t, o) in enumerate(out.items())}, z


def test_batched_backward_through_triton_heads(monkeypatch):
    monkeypatch.setenv("MTLFAST_HEADS_TRITON", "1")
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
    # ragged hidden widths: layer 2 stays on the grouped (Triton) op; equal ones run as bmm
    heads = mtlfast.FusedHeads(16, {"a": 1, "b": 1, "c": 1}, hidden=[8, 5, 3])
    x, y = torch.randn(5, 6), torch.randn(5, 3)
    engine = mtlfast.MTLBackward(trunk, UPGrad(), mode="jacobian")
    losses, z = _losses(trunk, heads, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a loop fallback warns
        engine.backward(losses, features=z)
    assert engine._heads.enabled and engine._heads.verified
    got = [p.grad.clone() for p in [*trunk.parameters(), *heads.parameters()]]
    for p in [*trunk.parameters(), *heads.parameters()]:
        p.grad = None
    losses, z = _losses(trunk, heads, x, y)
    shared = list(trunk.parameters())
    G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        loss, shared, retain_graph=True)]) for loss in losses.values()])
    update = UPGrad().weights(G @ G.T) @ G
    head_grads = torch.autograd.grad(sum(losses.values()), list(heads.parameters()))
    want = list(update.split([p.numel() for p in shared]))
    want = [w.view_as(p) for w, p in zip(want, shared, strict=True)] + list(head_grads)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-5
