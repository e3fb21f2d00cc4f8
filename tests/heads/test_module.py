"""FusedHeads against the unfused ModuleDict loop: outputs, all gradients, the per-task feature
Jacobian, per-task inputs, dtypes, autocast, gradcheck."""

import os

import pytest
import torch

import mtlfast
from mtlfast import FusedHeads, HeadSpec
from tests.conftest import devices, rel_err

RAGGED = {"age": 1, "gender": 2, "emotion": 7, "wide": 67}  # 67: no multiple of any tile
D = 24


def _loop(plain, z):
    return {name: head(z) for name, head in plain.items()}


def _fwd_bwd(model, z, out_fn):
    outs = out_fn(model, z)
    seeds = {k: torch.randn_like(v) for k, v in outs.items()}
    loss = sum((outs[k] * seeds[k]).sum() for k in outs)
    params = [p for _, p in sorted(model.named_parameters())]
    grads = torch.autograd.grad(loss, [z, *params])
    return outs, grads


def _compare(fused, plain, z, tol):
    torch.manual_seed(1)
    out_f, g_f = _fwd_bwd(fused, z, lambda m, x: m(x))
    torch.manual_seed(1)
    out_p, g_p = _fwd_bwd(plain, z, _loop)
    for k in out_p:
        assert out_f[k].shape == out_p[k].shape
        assert rel_err(out_f[k], out_p[k]) < tol, k
    assert rel_err(g_f[0], g_p[0]) < tol  # dL/dz
    # parameter gradients: fused grads, split per task, equal the unfused ones
    fused_g = dict(zip([n for n, _ in sorted(fused.named_parameters())], g_f[1:], strict=True))
    by_key = {}
    for fused_name, blocks in fused._param_blocks().items():
        sizes = [b.numel() for _, b in blocks]
        parts = fused_g[fused_name].reshape(-1).split(sizes)
        for (key, b), g in zip(blocks, parts, strict=True):
            by_key[key] = g.view(b.shape)
    plain_g = dict(zip([n for n, _ in sorted(plain.named_parameters())], g_p[1:], strict=True))
    assert set(by_key) == set(plain_g)
    for key, g in plain_g.items():
        assert rel_err(by_key[key], g) < tol, key


@pytest.mark.parametrize("hidden", [None, 16, [3, 16, 1, 40]])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", None])
def test_matches_unfused_loop_fp32(hidden, activation):
    if hidden is None and activation != "relu":
        pytest.skip("activation only applies to MLP heads")
    fused = FusedHeads(D, RAGGED, hidden=hidden, activation=activation)
    plain = fused.unfuse()
    z = torch.randn(2, 5, D, requires_grad=True)  # (..., D) batch shape
    _compare(fused, plain, z, 1e-5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_unfused_loop_half(device, dtype):
    for hidden in (None, [8, 16, 3, 32]):
        fused = FusedHeads(D, RAGGED, hidden=hidden, device=device, dtype=dtype)
        plain = fused.unfuse()
        z = torch.randn(33, D, device=device, dtype=dtype, requires_grad=True)
        _compare(fused, plain, z, 2e-2 if dtype == torch.bfloat16 else 3e-3)


@pytest.mark.parametrize("hidden", [None, [5, 9, 2, 16]])
def test_triton_path_under_interpreter_matches_loop(hidden, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1" or not mtlfast._ext.has_triton():
        pytest.skip("needs Triton's interpreter")
    monkeypatch.setenv("MTLFAST_HEADS_TRITON", "1")
    fused = FusedHeads(D, RAGGED, hidden=hidden, activation="gelu")
    plain = fused.unfuse()
    _compare(fused, plain, torch.randn(19, D, requires_grad=True), 1e-5)
    # per-task inputs: the grouped first layer with its fused activation epilogue
    Z = torch.randn(len(RAGGED), 9, D)
    out = fused(Z, per_task=True)
    for i, t in enumerate(RAGGED):
        assert rel_err(out[t], plain[t](Z[i])) < 1e-5


@pytest.mark.parametrize("tasks,hidden", [
    (RAGGED, None),  # Linear heads: one (M, N) buffer
    ({"a": 3, "b": 3, "c": 3}, 8),  # MLP heads on the bmm path: one (T, M, 3) buffer
])
def test_outputs_are_views_of_one_buffer(tasks, hidden):
    # (MLP heads whose CPU second layers run one GEMM per group, e.g. RAGGED's 1..67 padded
    # 3.5x, return one buffer per task: tests/heads/test_eager_paths.py, test_mlp_heads.py)
    out = FusedHeads(D, tasks, hidden=hidden)(torch.randn(4, D))
    bases = {v._base.data_ptr() if v._base is not None else None for v in out.values()}
    assert len(bases) == 1 and None not in bases


def test_headspec_heterogeneous_hidden():
    fused = FusedHeads(D, {"a": HeadSpec(3, hidden=4), "b": 2, "c": HeadSpec(1)}, hidden=8)
    assert fused.hidden_widths == (4, 8, 8) and fused.out_widths == (3, 2, 1)
    _compare(fused, fused.unfuse(), torch.randn(6, D, requires_grad=True), 1e-5)


@pytest.mark.parametrize("hidden", [None, [4, 7, 1, 12]])
def test_per_task_inputs(hidden):
    fused = FusedHeads(D, RAGGED, hidden=hidden, activation="silu")
    plain = fused.unfuse()
    Z = torch.randn(len(RAGGED), 3, 5, D, requires_grad=True)
    out = fused(Z, per_task=True)
    out_dict = fused({t: Z[i] for i, t in enumerate(RAGGED)})
    seeds = {t: torch.randn_like(v) for t, v in out.items()}
    loss = sum((out[t] * seeds[t]).sum() for t in out)
    (gZ,) = torch.autograd.grad(loss, Z)
    ref_out = {t: plain[t](Z[i]) for i, t in enumerate(RAGGED)}
    ref_loss = sum((ref_out[t] * seeds[t]).sum() for t in out)
    (ref_gZ,) = torch.autograd.grad(ref_loss, Z)
    for t in RAGGED:
        assert rel_err(out[t], ref_out[t]) < 1e-5
        assert torch.equal(out[t], out_dict[t])
    assert rel_err(gZ, ref_gZ) < 1e-5


@pytest.mark.parametrize("hidden,activation", [(None, "relu"), ([4, 7, 1, 12], "relu"),
                                               (9, "gelu"), (9, "silu"), (9, None)])
@pytest.mark.parametrize("per_task", [False, True])
def test_task_feature_grads_match_autograd(hidden, activation, per_task):
    fused = FusedHeads(D, RAGGED, hidden=hidden, activation=activation)
    T = len(RAGGED)
    z = torch.randn(T, 6, D) if per_task else torch.randn(2, 3, D)
    z.requires_grad_(True)
    out = fused(z, per_task=per_task)
    g = {t: torch.randn_like(v) for t, v in out.items()}
    J = fused.task_feature_grads(g, z.detach(), per_task=per_task)
    assert J.shape == (T, *z.shape[1:]) if per_task else (T, *z.shape)
    for i, t in enumerate(RAGGED):
        (ref,) = torch.autograd.grad(out[t], z, g[t], retain_graph=True)
        assert rel_err(J[i], ref[i] if per_task else ref) < 1e-5, t
    # the concatenated (..., sum out_t) form gives the same tensor
    J2 = fused.task_feature_grads(torch.cat([g[t] for t in RAGGED], -1), z.detach(),
                                  per_task=per_task)
    assert torch.equal(J, J2)


def test_task_feature_grads_with_dropout_needs_eval():
    fused = FusedHeads(D, {"a": 2, "b": 3}, hidden=4, dropout=0.5)
    z = torch.randn(3, D)
    g = torch.randn(3, 5)
    with pytest.raises(ValueError, match="eval"):
        fused.task_feature_grads(g, z)
    fused.eval()
    assert fused.task_feature_grads(g, z).shape == (2, 3, D)


def test_dropout_is_per_task_and_off_in_eval():
    fused = FusedHeads(D, {"a": 50, "b": 50}, hidden=64, dropout=0.5)
    z = torch.randn(8, D)
    fused.eval()
    ref = fused.unfuse().eval()
    for t, v in fused(z).items():
        assert rel_err(v, ref[t](z)) < 1e-6
    fused.train()
    a, b = fused(z), fused(z)
    assert not torch.equal(a["a"], b["a"])  # a fresh mask each call


def test_gradcheck_float64():
    for hidden, act in ((None, "relu"), ([3, 5, 2, 4], "gelu"), (3, "silu")):
        fused = FusedHeads(5, {"a": 1, "b": 3, "c": 2, "d": 1}, hidden=hidden, activation=act,
                           dtype=torch.float64)
        names = [n for n, _ in fused.named_parameters()]

        def f(z, *params, fused=fused, names=names):
            out = torch.func.functional_call(fused, dict(zip(names, params, strict=True)), (z,))
            return tuple(out.values())

        z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        params = [p.detach().clone().requires_grad_(True) for p in fused.parameters()]
        assert torch.autograd.gradcheck(f, (z, *params))


def test_autocast_cpu_bf16():
    fused = FusedHeads(D, RAGGED, hidden=8)
    z = torch.randn(5, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(z)
    ref = _loop(fused.unfuse(), z)
    for t in RAGGED:
        assert out[t].dtype == torch.bfloat16
        assert rel_err(out[t], ref[t]) < 3e-2


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [None, [64, 256, 3, 100]])
def test_cuda_matches_loop(dtype, hidden):
    fused = FusedHeads(D, RAGGED, hidden=hidden, activation="gelu", device="cuda", dtype=dtype)
    plain = fused.unfuse()
    z = torch.randn(300, D, device="cuda", dtype=dtype, requires_grad=True)
    tol = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    _compare(fused, plain, z, tol)


@pytest.mark.cuda
def test_cuda_task_feature_grads():
    fused = FusedHeads(D, RAGGED, hidden=[4, 7, 1, 12], device="cuda")
    z = torch.randn(40, D, device="cuda", requires_grad=True)
    out = fused(z)
    g = {t: torch.randn_like(v) for t, v in out.items()}
    J = fused.task_feature_grads(g, z.detach())
    for i, t in enumerate(RAGGED):
        (ref,) = torch.autograd.grad(out[t], z, g[t], retain_graph=True)
        assert rel_err(J[i], ref) < 2e-3


def test_nan_propagates_row_wise_like_unfused_heads():
    fused = FusedHeads(D, RAGGED, hidden=[3, 5, 2, 7])
    z = torch.randn(4, D)
    z[1, 3] = float("nan")
    out = fused(z)
    for t, v in out.items():
        assert torch.isnan(v[1]).all() and not torch.isnan(v[[0, 2, 3]]).any(), t
