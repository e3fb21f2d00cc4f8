"""``mtlfast.backward`` on an MMoE trunk + FusedHeads: several methods in jacobian and gramian
modes, and features mode with the per-task ``(T, B, D)`` representation or the experts'
outputs as ``features``."""

import pytest
import torch

import mtlfast
from mtlfast.arch import PLE, MMoE
from mtlfast.methods import DWA, MGDA, PCGrad, UPGrad
from tests.conftest import count_calls, rel_err

WIDTHS = {"a": 1, "b": 2, "c": 1}


def _model(kind="mmoe", rows=16):
    torch.manual_seed(0)
    block = MMoE(10, 4, [8, 6], 3) if kind == "mmoe" else PLE(10, 2, 1, 1, [8, 6], 3)
    heads = mtlfast.FusedHeads(6, WIDTHS, hidden=5)
    x, y = torch.randn(rows, 10), torch.randn(rows, 4)
    return block, heads, x, y


def _losses(block, heads, x, y):
    z, h = block(x, return_experts=True)
    out = heads(z, per_task=True)
    return {t: ((o - y[:, :o.shape[1]]) ** 2).mean() for t, o in out.items()}, z, h


def _zero(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


def _expected_upgrad(block, heads, x, y):
    losses, _, _ = _losses(block, heads, x, y)
    shared = list(block.parameters())
    G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        loss, shared, retain_graph=True)]) for loss in losses.values()])
    update = UPGrad().weights(G @ G.T) @ G
    head_grads = torch.autograd.grad(sum(losses.values()), list(heads.parameters()))
    parts = [u.view_as(p) for u, p in zip(update.split([p.numel() for p in shared]), shared,
                                          strict=True)]
    return parts + list(head_grads)


@pytest.mark.parametrize("kind", ["mmoe", "ple"])
@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
@pytest.mark.parametrize("kernels", [False, True])
def test_upgrad_matches_the_definition(kind, mode, kernels, monkeypatch):
    """``kernels``: 300 rows and the expert kernel's size threshold lowered, so the C++ expert
    and gated-mixture kernels run (their backward under the engine's batched gradients too)."""
    import mtlfast.arch.experts as experts
    from mtlfast import _ext
    from mtlfast.ops import _dispatch

    if kernels and not _ext.has_cpu_kernels():
        pytest.skip("needs the C++ extension")
    calls, gated = [], []
    if kernels:
        monkeypatch.setattr(_dispatch, "EXPERT_KERNEL_MIN_MACS", 0)
        calls = count_calls(monkeypatch, experts, "expert_mlp")
        gated = count_calls(monkeypatch, torch.ops.mtlfast, "gated_mixture_cpu")
    block, heads, x, y = _model(kind, 300 if kernels else 16)
    want = _expected_upgrad(block, heads, x, y)
    _zero(block, heads)
    losses, _, _ = _losses(block, heads, x, y)
    mtlfast.backward(losses, shared=block, method=UPGrad(), mode=mode)
    assert bool(calls) == kernels and bool(gated) == kernels
    got = [p.grad for p in [*block.parameters(), *heads.parameters()]]
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-4


@pytest.mark.parametrize("method", [UPGrad, MGDA, PCGrad, DWA])
@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
def test_methods_run_on_mmoe_and_heads(method, mode):
    block, heads, x, y = _model()
    if method is DWA:
        mode = "auto"  # a loss method computes no per-task gradients (it runs in 'losses')
    losses, _, _ = _losses(block, heads, x, y)
    info = mtlfast.backward(losses, shared=block, method=method(), mode=mode)
    assert info.weights.shape == (3,) and torch.isfinite(info.weights).all()
    for p in [*block.parameters(), *heads.parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_features_mode_with_the_per_task_representation():
    """Accepted. Each loss reads only its own slice z[t] of the (T, B, D) tensor, so the
    feature Jacobian rows have disjoint supports and the feature Gram is diagonal: features
    mode then sees no conflict between tasks (MGDA: w_t proportional to 1 / ||dL_t/dz_t||^2)."""
    block, heads, x, y = _model()
    losses, z, _ = _losses(block, heads, x, y)
    info = mtlfast.backward(losses, shared=block, method=MGDA(), features=z, mode="features")
    K = info.gram
    assert info.mode == "features"
    assert torch.equal(K, torch.diag(torch.diagonal(K)))
    inv = 1.0 / torch.diagonal(K)
    assert rel_err(info.weights, inv / inv.sum()) < 1e-4


@pytest.mark.parametrize("rows", [16, 300])
def test_features_mode_with_the_experts_outputs(rows, monkeypatch):
    """features=h (E, B, D): with the whole block as shared, its gates sit between h and the
    losses and the engine refuses; with the experts as shared (the gates get their ordinary
    gradients, like heads) the Gram of dL/dh couples the tasks. From 256 rows the gated-mixture
    kernel runs (its backward under batched feature gradients): the same Gram as the unfused
    path."""
    import mtlfast.ops.gated_mixture as gm

    block, heads, x, y = _model(rows=rows)
    losses, _, h = _losses(block, heads, x, y)
    with pytest.raises(ValueError, match="between the features and the losses"):
        mtlfast.backward(losses, shared=block, method=MGDA(), features=h, mode="features")
    _zero(block, heads)
    losses, _, h = _losses(block, heads, x, y)
    info = mtlfast.backward(losses, shared=block.experts, method=UPGrad(), features=h,
                            mode="features")
    K = info.gram
    assert info.mode == "features" and (K - torch.diag(torch.diagonal(K))).abs().max() > 0
    for p in [*block.parameters(), *heads.parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    monkeypatch.setattr(gm, "backend", lambda *a, **k: "torch")
    losses, _, h = _losses(block, heads, x, y)
    unfused = mtlfast.backward(losses, shared=block.experts, method=UPGrad(), features=h,
                               mode="features")
    assert rel_err(K, unfused.gram) < 1e-5
