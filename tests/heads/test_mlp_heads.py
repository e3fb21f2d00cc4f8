"""The C++ MLP-heads op (``torch.ops.mtlfast.mlp_heads``, FusedHeads' eager CPU path) against
its spec (``mlp_heads_reference``: each head on its own) for every second-layer form, head
family, activation, bias and dtype, forward and backward; twice differentiable, forward mode,
batched backward gradients, strided and empty inputs, non-finite values; which calls take it;
and the engine's steps through it equal those through FusedHeads' ATen composition."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import mtlfast
from mtlfast import FusedHeads, methods
from mtlfast.ops.mlp_heads import layer2_for, mlp_heads_reference
from tests.conftest import rel_err
from tests.heads.helpers import (
    TOL,
    GemmDtypes,
    assert_engine_step_unchanged,
    assert_matches_reference,
    assert_upcast_runs_gemms_in_fp32,
    lowp_gemms,
)

pytestmark = pytest.mark.skipif(not mtlfast._ext.has_cpu_kernels(),
                                reason="the C++ op needs the compiled extension")

_dispatch = importlib.import_module("mtlfast.ops._dispatch")
gl = importlib.import_module("mtlfast.ops.grouped_linear")

ACTIVATIONS = ["relu", "gelu", "silu", "none"]

# (hidden widths, out widths, second-layer form)
CASES = {
    "groups, ragged hidden and out": ([5, 2, 4], [1, 7, 3], "groups"),
    "groups, one head": ([6], [3], "groups"),
    "groups, equal hidden, ragged out": ([4, 4], [1, 9], "groups"),
    "bmm, equal shapes": ([4, 4, 4], [5, 5, 5], "bmm"),
    "bmm, one head": ([4], [2], "bmm"),
    "bmm, padded": ([4] * 9, [1, 7, 3, 7, 2, 5, 1, 4, 6], "bmm"),
    "dot, width-1 heads": ([8] * 5, [1] * 5, "dot"),
    "dot, one head": ([3], [1], "dot"),
    "heads, ragged": ([5, 2, 4], [1, 7, 3], "heads"),
    "heads, one head": ([6], [3], "heads"),
    "heads, width-1": ([4, 4], [1, 1], "heads"),
}


def _op(x, w1, b1, w2, b2, case, activation):
    hidden, outs, layer2 = CASES[case]
    return list(torch.ops.mtlfast.mlp_heads(x, w1, b1, w2, b2, hidden, outs, activation,
                                            layer2))


def _params(case, dtype, bias=True, D=6, scale=0.5):
    hidden, outs, _ = CASES[case]
    g = torch.Generator().manual_seed(1)
    w1 = torch.randn(sum(hidden), D, generator=g) * scale
    w2 = torch.randn(sum(h * n for h, n in zip(hidden, outs, strict=True)), generator=g) * scale
    b1 = torch.randn(sum(hidden), generator=g) if bias else None
    b2 = torch.randn(sum(outs), generator=g) if bias else None
    return [None if t is None else t.to(dtype).requires_grad_() for t in (w1, b1, w2, b2)]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("upcast", [False, True])
def test_op_matches_reference_forward_backward(case, activation, bias, dtype, upcast):
    """``upcast``: low-precision GEMMs in fp32 (a CPU without native ones), the same math
    within the dtype's rounding; fp32/fp64 ignore it."""
    hidden, outs, layer2 = CASES[case]
    w1, b1, w2, b2 = _params(case, dtype, bias)
    x = torch.randn(13, 6, dtype=dtype, requires_grad=True)
    assert_matches_reference(
        lambda *a: torch.ops.mtlfast.mlp_heads(*a, hidden, outs, activation, layer2,
                                               upcast=upcast),
        lambda *a: mlp_heads_reference(*a, hidden, outs, activation), [x, w1, b1, w2, b2], dtype)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("create_graph", [False, True])
def test_upcast_runs_low_precision_gemms_in_fp32(case, dtype, create_graph):
    """With ``upcast`` every GEMM of a bf16/fp16 call, forward and backward (double backward
    included), runs on fp32 operands; fp32/fp64 calls ignore it, bit for bit."""
    hidden, outs, layer2 = CASES[case]

    def call(upcast):
        w1, b1, w2, b2 = _params(case, dtype)
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2)).to(dtype)
        leaves = [x.requires_grad_(), w1, b1, w2, b2]
        ys = torch.ops.mtlfast.mlp_heads(*leaves, hidden, outs, "gelu", layer2, upcast=upcast)
        grads = torch.autograd.grad(ys, leaves, [torch.ones_like(y) for y in ys],
                                    create_graph=create_graph)
        if create_graph:
            torch.autograd.grad(sum(g.sum() for g in grads), [x, w1, w2])
        return [*ys, *grads]

    assert_upcast_runs_gemms_in_fp32(call, dtype)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("hidden", [8, [3, 8, 5]])
def test_fused_heads_without_native_lowp_gemms(native, hidden, monkeypatch):
    """bf16 FusedHeads on a CPU without native bf16 GEMMs: the op's GEMMs run in fp32, its
    outputs and gradients stay bf16 and match the unfused heads'."""
    lowp_gemms(monkeypatch, native)
    torch.manual_seed(0)
    fused = FusedHeads(6, {"a": 1, "b": 9, "c": 4}, hidden=hidden, dtype=torch.bfloat16)
    plain = fused.unfuse()
    z = torch.randn(7, 6, dtype=torch.bfloat16, requires_grad=True)
    with GemmDtypes() as gemms:
        out = fused(z)
        got = torch.autograd.grad(sum(y.float().square().sum() for y in out.values()), z)[0]
    assert _uses_op(out)
    assert gemms.dtypes == {torch.bfloat16 if native else torch.float32}
    ref = {t: plain[t](z) for t in out}
    want = torch.autograd.grad(sum(y.float().square().sum() for y in ref.values()), z)[0]
    for t, y in out.items():
        assert y.dtype == torch.bfloat16 and rel_err(y, ref[t]) < TOL[torch.bfloat16]
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 2 * TOL[torch.bfloat16]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_gradcheck_twice_forward_mode_and_batched(case, activation):
    """fp64 gradcheck (reverse and forward mode, batched backward gradients as the engine's
    ``is_grads_batched`` sends them) and gradgradcheck (create_graph through the op)."""
    w1, b1, w2, b2 = _params(case, torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)

    def f(*args):
        return tuple(_op(*args, case, activation))

    inputs = (x, w1, b1, w2, b2)
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, inputs)

    def no_bias(x, w1, w2):
        return tuple(_op(x, w1, None, w2, None, case, activation))

    assert torch.autograd.gradgradcheck(no_bias, (x, w1, w2))


@pytest.mark.parametrize("case", list(CASES))
def test_strided_input_and_gradients(case):
    """x a column slice, the output gradients strided views (as a cat's backward sends)."""
    hidden, outs, _ = CASES[case]
    w1, b1, w2, b2 = _params(case, torch.float32)
    base = torch.randn(9, 13, requires_grad=True)
    x = base[:, 1:13:2]
    ys = _op(x, w1, b1, w2, b2, case, "relu")
    refs = mlp_heads_reference(x, w1, b1, w2, b2, hidden, outs, "relu")
    seed = torch.randn(9, 2 * sum(outs))[:, ::2]
    seeds = list(seed.split(list(outs), dim=1))
    leaves = [base, w1, b1, w2, b2]
    for got, want in zip(torch.autograd.grad(ys, leaves, seeds),
                         torch.autograd.grad(refs, leaves, seeds), strict=True):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_empty_batch(case):
    hidden, outs, _ = CASES[case]
    w1, b1, w2, b2 = _params(case, torch.float32)
    x = torch.randn(0, 6, requires_grad=True)
    ys = _op(x, w1, b1, w2, b2, case, "gelu")
    assert [tuple(y.shape) for y in ys] == [(0, n) for n in outs]
    grads = torch.autograd.grad(sum(y.sum() for y in ys), [x, w1, b1, w2, b2])
    assert grads[0].shape == (0, 6)
    assert all(torch.count_nonzero(g) == 0 for g in grads[1:])


@pytest.mark.parametrize("case", list(CASES))
def test_unused_and_reused_outputs(case):
    """Heads the loss does not use get zero gradients; an output used twice, both uses."""
    hidden, outs, _ = CASES[case]
    w1, b1, w2, b2 = _params(case, torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    ys = _op(x, w1, b1, w2, b2, case, "silu")
    refs = mlp_heads_reference(x, w1, b1, w2, b2, hidden, outs, "silu")

    def loss(outs_):
        return (outs_[0] ** 2).sum() + outs_[0].sum()

    leaves = [x, w1, b1, w2, b2]
    for got, want in zip(torch.autograd.grad(loss(ys), leaves),
                         torch.autograd.grad(loss(refs), leaves), strict=True):
        assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("case", list(CASES))
def test_non_finite_values_stay_where_the_unfused_heads_put_them(case):
    """A NaN in row i of x reaches row i of every output only; an inf second-layer weight
    reaches only its own head (the padded bmm's padding rows are exact zeros)."""
    hidden, outs, _ = CASES[case]
    w1, b1, w2, b2 = (t.detach() for t in _params(case, torch.float32))
    x = torch.randn(6, 6)
    x[2, 3] = float("nan")
    w2 = w2.clone()
    w2[0] = float("inf")  # head 0's first weight
    ys = _op(x, w1, b1, w2, b2, case, "relu")
    refs = mlp_heads_reference(x, w1, b1, w2, b2, hidden, outs, "relu")
    for y, r in zip(ys, refs, strict=True):
        assert torch.equal(y.isnan(), r.isnan()) and torch.equal(y.isinf(), r.isinf())
        finite = r.isfinite()
        assert rel_err(y[finite], r[finite]) < 1e-5


@pytest.mark.parametrize(("args", "match"), [
    (dict(hidden=[4, 4], outs=[1]), "equal length"),
    (dict(hidden=[4, 0], outs=[1, 2]), ">= 1"),
    (dict(w2_extra=1), "w2 must be the flat packed"),
    (dict(b1_extra=1), "b1 must be"),
    (dict(b2_extra=1), "b2 must be"),
    (dict(layer2="dot"), "dot needs outs of 1"),
    (dict(hidden=[4, 3], outs=[2, 2], layer2="bmm"), "equal hidden widths"),
    (dict(layer2="bad"), "layer2 must be"),
    (dict(activation="tanh"), "activation must be"),
    (dict(w1_dtype=torch.float64), "dtype and device"),
    (dict(x_dim=3), "x must be"),
    (dict(x_dim=3, x_T=2), "per-task x .* needs layer2 heads"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(dropout=-0.1), "dropout must be in"),
])
def test_bad_arguments_raise_not_crash(args, match):
    hidden, outs = args.get("hidden", [4, 4]), args.get("outs", [2, 2])
    D = 5
    x = torch.randn(3, D) if args.get("x_dim", 2) == 2 else torch.randn(args.get("x_T", 3), 3, D)
    w1 = torch.randn(sum(hidden), D, dtype=args.get("w1_dtype", torch.float32))
    w2 = torch.randn(sum(h * n for h, n in zip(hidden, outs, strict=False))
                     + args.get("w2_extra", 0))
    b1 = torch.randn(sum(hidden) + args.get("b1_extra", 0))
    b2 = torch.randn(sum(outs) + args.get("b2_extra", 0))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mtlfast.mlp_heads(x, w1, b1, w2, b2, hidden, outs,
                                    args.get("activation", "relu"), args.get("layer2", "groups"),
                                    args.get("dropout", 0.0))


@pytest.mark.parametrize(("hidden", "outs", "dtype", "M", "want"), [
    ([8, 8], [1, 1], torch.float32, 32, "dot"),
    ([8] * 8, [1] * 8, torch.float32, 2**10, "dot"),
    ([8] * 8, [1] * 8, torch.bfloat16, 2**9, "dot"),
    ([8] * 8, [1] * 8, torch.bfloat16, 2**10, "bmm"),   # many rows, short dots: batched GEMV
    ([32] * 8, [1] * 8, torch.bfloat16, 2**10, "dot"),
    ([8] * 7, [1] * 7, torch.bfloat16, 2**11, "dot"),
    ([8, 4], [1, 1], torch.float32, 32, "groups"),
    ([8] * 3, [5] * 3, torch.bfloat16, 32, "bmm"),
    ([8] * 4, [1, 200, 5, 50], torch.bfloat16, 32, "groups"),        # below 8 heads
    ([8] * 8, [1, 200, 5, 50] * 2, torch.bfloat16, 32, "bmm"),      # padded 4x: low precision
    ([8] * 8, [1, 200, 5, 50] * 2, torch.float32, 32, "groups"),    # fp32 pads at most 2x
    ([8] * 8, [5, 8, 6, 7] * 2, torch.float32, 32, "bmm"),          # 1.23x
    ([64] * 8, [1, 200, 5, 50] * 2, torch.bfloat16, 2**14, "groups"),  # past the budget
])
def test_layer2_choice(hidden, outs, dtype, M, want, monkeypatch):
    """On a CPU with native low-precision GEMMs; without them bf16/fp16 heads choose as fp32
    heads do (their GEMMs run in fp32 there)."""
    lowp_gemms(monkeypatch, native=True)
    assert layer2_for(torch.empty(M, 4, dtype=dtype), hidden, outs) == want
    lowp_gemms(monkeypatch, native=False)
    for dt in (dtype, torch.float16):
        assert layer2_for(torch.empty(M, 4, dtype=dt), hidden, outs) == \
            layer2_for(torch.empty(M, 4), hidden, outs)


def _uses_op(out: dict) -> bool:
    def node(y):  # (through the reshape to the batch shape)
        fn = y.grad_fn
        return fn.next_functions[0][0] if fn.name() == "ViewBackward0" else fn

    return all("MLPHeads" in node(y).name() for y in out.values())


@pytest.mark.parametrize("hidden", [8, [3, 8, 5]])
@pytest.mark.parametrize("widths", [[1, 1, 1], [2, 2, 2], [1, 9, 4]])
def test_fused_heads_take_the_op_on_eager_cpu_calls(hidden, widths):
    fused = FusedHeads(6, {f"t{i}": n for i, n in enumerate(widths)}, hidden=hidden)
    z = torch.randn(4, 5, 6, requires_grad=True)
    out = fused(z)
    assert _uses_op(out)
    assert all(y.shape == (4, 5, n) for y, n in zip(out.values(), widths, strict=True))
    plain = fused.unfuse()
    for t, y in out.items():
        assert rel_err(y, plain[t](z)) < 1e-6


def test_fused_heads_other_calls_keep_their_paths(monkeypatch):
    """Dropout (training or not) and per-task inputs take the op, large groups its per-head
    form; without the extension FusedHeads composes ATen ops and still matches the unfused
    heads."""
    z = torch.randn(5, 6, requires_grad=True)

    def heads(**kw):
        return FusedHeads(6, {"a": 2, "b": 3}, hidden=4, **kw)

    dropping = heads(dropout=0.5)
    assert _uses_op(dropping(z))
    assert _uses_op(dropping.eval()(z))
    assert _uses_op(dropping.train()(torch.stack([z, z]), per_task=True))
    monkeypatch.setitem(gl._HEADS_LOOP_MK, ("cpu", torch.float32), 0)
    monkeypatch.setattr(gl, "_HEADS_LOOP_MIN", 0)
    large = heads()
    assert _uses_op(large(z))
    assert large._routes[(5, torch.float32, z.device, True, False)] == "heads"
    monkeypatch.undo()
    monkeypatch.setattr(mtlfast._ext, "has_cpu_kernels", lambda: False)
    fused = heads()
    out = fused(z)
    assert not _uses_op(out)
    plain = fused.unfuse()
    for t, y in out.items():
        assert rel_err(y, plain[t](z)) < 1e-6


def test_route_is_chosen_per_rows_dtype_and_mode(monkeypatch):
    """The route kept per (rows, dtype, device, train/eval, per-task): large groups by their
    rows, the padded bmm by dtype; without the extension large groups run as ATen ops per
    head; a full table starts anew. (A CPU with native bf16 GEMMs.)"""
    lowp_gemms(monkeypatch, native=True)
    monkeypatch.setitem(gl._HEADS_LOOP_MK, ("cpu", torch.float32), 2**8)
    monkeypatch.setattr(gl, "_HEADS_LOOP_MIN", 2**8)
    fused = FusedHeads(6, {f"t{i}": n for i, n in enumerate([1, 200, 5, 50] * 2)}, hidden=4,
                       dropout=0.5)
    small, large = torch.randn(8, 6), torch.randn(128, 6)
    fused.eval()
    for x in (small, large, small):
        fused(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused(small)
    assert fused._routes == {(8, torch.float32, small.device, False, False): "groups",
                             (128, torch.float32, small.device, False, False): "heads",
                             (8, torch.bfloat16, small.device, False, False): "bmm"}
    fused(torch.stack([small] * 8), per_task=True)
    assert fused._routes[(8, torch.float32, small.device, False, True)] == "heads"
    fused.train()
    for x in (small, large):
        assert _uses_op(fused(x))
    assert fused._routes[(8, torch.float32, small.device, True, False)] == "groups"
    assert fused._routes[(128, torch.float32, small.device, True, False)] == "heads"
    monkeypatch.setattr(mtlfast._ext, "has_cpu_kernels", lambda: False)
    fused._routes.clear()
    fused(large)
    assert fused._routes == {(128, torch.float32, small.device, True, False): "per head"}
    monkeypatch.undo()
    for rows in range(1, 70):
        fused(torch.randn(rows, 6))
    assert 0 < len(fused._routes) <= 64
    fused.eval()
    assert rel_err(fused(small)["t1"], fused.unfuse()["t1"](small)) < 1e-6


def test_fused_heads_under_autocast_take_the_op():
    fused = FusedHeads(6, {"a": 1, "b": 9}, hidden=4)
    z = torch.randn(5, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(z)
    assert _uses_op(out) and all(y.dtype == torch.bfloat16 for y in out.values())
    loss = sum(y.float().sum() for y in out.values())
    grads = torch.autograd.grad(loss, [z, *fused.parameters()])
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def _step_grads(mode: str, features: bool, aten: bool, monkeypatch) -> torch.Tensor:
    monkeypatch.undo()
    if aten:
        monkeypatch.setitem(_dispatch.RULES, "mlp_heads", (("torch", lambda op, t, f: True),))
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(7, 12), nn.Tanh()).double()
    heads = FusedHeads(12, {"a": 1, "b": 3, "c": 1, "d": 2}, hidden=[5, 5, 3, 5]).double()
    x, y = torch.randn(9, 7, dtype=torch.float64), torch.randn(9, 7, dtype=torch.float64)
    z = trunk(x)
    out = heads(z)
    assert _uses_op(out) != aten
    losses = torch.stack([((o - y[:, i:i + o.shape[1]]) ** 2).mean()
                          for i, o in enumerate(out.values())])
    mtlfast.backward(losses, trunk, methods.UPGrad(), features=z if features else None,
                     mode=mode)
    return torch.cat([p.grad.reshape(-1) for p in [*trunk.parameters(), *heads.parameters()]])


@pytest.mark.parametrize(("mode", "features"), [("jacobian", False), ("jacobian", True),
                                                ("gramian", False), ("features", True)])
def test_engine_steps_equal_the_aten_composition(mode, features, monkeypatch):
    """The engine's batched backward through the op (UPGrad) writes the same .grad as through
    FusedHeads' plain ATen ops."""
    got = _step_grads(mode, features, aten=False, monkeypatch=monkeypatch)
    want = _step_grads(mode, features, aten=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("hidden", "tasks"), [(4, {"a": 1, "b": 3}), (4, {"a": 1, "b": 1}),
                                               (4, {"a": 3, "b": 3}), ([3, 5], {"a": 2, "b": 1})])
def test_fused_heads_through_autograd_features(hidden, tasks):
    """inference_mode, activation checkpointing, a vectorized Jacobian (batched backward) and a
    Hessian-vector product (double backward) through the op equal the unfused heads'."""
    fused = FusedHeads(6, tasks, hidden=hidden).double()
    plain = fused.unfuse()
    z = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)

    def run(x):
        return torch.cat(list(fused(x).values()), -1)

    def run_plain(x):
        return torch.cat([plain[t](x) for t in tasks], -1)

    assert _uses_op(fused(z))
    with torch.inference_mode():
        torch.testing.assert_close(run(z.detach()), run_plain(z.detach()))
    params = [z, *fused.parameters()]
    got = torch.autograd.grad(checkpoint(run, z, use_reentrant=False).square().sum(), params)
    want = torch.autograd.grad(run(z).square().sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(torch.autograd.functional.jacobian(run, z, vectorize=True),
                               torch.autograd.functional.jacobian(run_plain, z))
    hvp = []
    for f in (run, run_plain):
        (gz,) = torch.autograd.grad(f(z).square().sum(), z, create_graph=True)
        hvp.append(torch.autograd.grad(gz.sum(), z)[0])
    torch.testing.assert_close(*hvp)


PER_TASK = {"ragged": ([5, 2, 4], [1, 7, 3]), "equal": ([4, 4], [2, 2]), "one head": ([3], [1])}


@pytest.mark.parametrize("case", list(PER_TASK))
@pytest.mark.parametrize("activation", ["relu", "gelu", "none"])
@pytest.mark.parametrize("dtype", list(TOL))
def test_per_task_inputs_match_reference(case, activation, dtype):
    """Per-task inputs (T, M, D), head t on x[t] (the op's per-head form): forward and every
    gradient against the fp64 per-head reference."""
    hidden, outs = PER_TASK[case]
    g = torch.Generator().manual_seed(2)
    T, D = len(hidden), 6
    x = torch.randn(T, 7, D, generator=g).to(dtype).requires_grad_()
    w1 = (torch.randn(sum(hidden), D, generator=g) / 2).to(dtype).requires_grad_()
    b1 = torch.randn(sum(hidden), generator=g).to(dtype).requires_grad_()
    w2 = (torch.randn(sum(h * n for h, n in zip(hidden, outs, strict=True)), generator=g)
          / 2).to(dtype).requires_grad_()
    b2 = torch.randn(sum(outs), generator=g).to(dtype).requires_grad_()
    assert_matches_reference(
        lambda *a: torch.ops.mtlfast.mlp_heads(*a, hidden, outs, activation, "heads"),
        lambda *a: mlp_heads_reference(*a, hidden, outs, activation), [x, w1, b1, w2, b2], dtype)


@pytest.mark.parametrize("case", list(PER_TASK))
def test_per_task_gradcheck_twice_forward_mode_and_batched(case):
    hidden, outs = PER_TASK[case]
    T = len(hidden)
    x = torch.randn(T, 4, 5, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(sum(hidden), 5, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(sum(h * n for h, n in zip(hidden, outs, strict=True)),
                     dtype=torch.float64, requires_grad=True)

    def f(x, w1, w2):
        return tuple(torch.ops.mtlfast.mlp_heads(x, w1, None, w2, None, hidden, outs, "silu",
                                                 "heads"))

    assert torch.autograd.gradcheck(f, (x, w1, w2), check_forward_ad=True,
                                    check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, w1, w2))


@pytest.mark.parametrize(("T", "widths", "dtype", "takes_op"), [
    (2, [2, 3], torch.float32, True),
    (8, [2] * 8, torch.float32, True),
    (9, [2] * 9, torch.float32, False),      # the batched first layer wins from here
    (2, [2, 2], torch.bfloat16, True),
    (4, [2] * 4, torch.bfloat16, False),     # equal low-precision heads: the batched bmm
    (4, [1, 7, 3, 2], torch.bfloat16, True),
    (9, [2] * 9, torch.bfloat16, False),
])
@pytest.mark.parametrize("native", [True, False])
def test_fused_heads_per_task_route(T, widths, dtype, takes_op, native, monkeypatch):
    """Without native low-precision GEMMs bf16 heads always take the op (its GEMMs in fp32;
    the batched path would run the slow low-precision ones)."""
    lowp_gemms(monkeypatch, native)
    takes_op = takes_op or (not native and dtype == torch.bfloat16)
    fused = FusedHeads(6, {f"t{i}": n for i, n in enumerate(widths)}, hidden=4, dtype=dtype)
    z = torch.randn(T, 2, 5, 6, dtype=dtype, requires_grad=True)
    out = fused(z, per_task=True)
    assert _uses_op(out) == takes_op
    plain = fused.unfuse()
    for i, (t, y) in enumerate(out.items()):
        assert y.shape == (2, 5, widths[i])
        assert rel_err(y, plain[t](z[i])) < TOL[dtype]
    grads = torch.autograd.grad(sum((y * y).sum() for y in out.values()), [z, *fused.parameters()])
    want = torch.autograd.grad(sum((plain[t](z[i]) ** 2).sum() for i, t in enumerate(out)),
                               [z, *plain.parameters()])
    assert rel_err(grads[0], want[0]) < 4 * TOL[dtype]


@pytest.mark.parametrize("mode", ["jacobian", "features"])
def test_engine_per_task_features_through_the_op(mode, monkeypatch):
    """An MMoE-style step (per-task features into the heads, features= the (T, B, D) tensor):
    the same .grad through the op as through the ATen composition."""
    assert_engine_step_unchanged(monkeypatch, "mlp_heads", [5, 5, 3], mode, _uses_op)


@pytest.mark.parametrize(("hidden", "widths"), [(4, [1, 9]), (4, [1, 1, 1]), (4, [3, 3]),
                                                ([3, 5], [2, 1])])
def test_dropout_draws_the_masks_of_the_aten_path(hidden, widths, monkeypatch):
    """Training with dropout through the op: under the same seed, the outputs and every
    gradient equal FusedHeads' ATen composition (one draw over the fused hidden layer, as
    F.dropout draws it); eval runs without dropout."""
    fused = FusedHeads(6, {f"t{i}": n for i, n in enumerate(widths)}, hidden=hidden,
                       dropout=0.3).double()
    z = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for aten in (False, True):
        monkeypatch.undo()
        if aten:
            monkeypatch.setitem(_dispatch.RULES, "mlp_heads", (("torch", lambda op, t, f: True),))
        fused._routes.clear()
        torch.manual_seed(5)
        out = fused(z)
        assert _uses_op(out) != aten
        y = torch.cat(list(out.values()), -1)
        results.append((y, *torch.autograd.grad((y * y).sum(), [z, *fused.parameters()])))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    y = results[0][0]
    assert not torch.equal(y, torch.cat(list(fused.eval()(z).values()), -1))


@pytest.mark.parametrize("per_task", [False, True])
def test_dropout_per_head_draws_the_masks_of_the_unfused_heads(per_task, monkeypatch):
    """The op's per-head form (large groups, per-task inputs) draws one mask per head in
    task order, as the unfused heads' nn.Dropout do: the same outputs and gradients under the
    same seed."""
    if not per_task:
        monkeypatch.setitem(gl._HEADS_LOOP_MK, ("cpu", torch.float64), 0)
        monkeypatch.setattr(gl, "_HEADS_LOOP_MIN", 0)
    fused = FusedHeads(6, {"a": 2, "b": 1, "c": 3}, hidden=[4, 5, 4], dropout=0.4).double()
    plain = fused.unfuse().train()
    z = torch.randn(3 if per_task else 1, 7, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    out = fused(z, per_task=True) if per_task else fused(z[0])
    assert _uses_op(out)
    torch.manual_seed(3)
    ref = {t: plain[t](z[i] if per_task else z[0]) for i, t in enumerate(plain)}
    got = torch.autograd.grad(sum((y * y).sum() for y in out.values()), z)
    want = torch.autograd.grad(sum((y * y).sum() for y in ref.values()), z)
    for t in ref:
        torch.testing.assert_close(out[t], ref[t], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer2", ["groups", "bmm", "dot", "heads"])
def test_dropout_gradcheck_twice(layer2):
    """With its seed fixed the op is a function: gradcheck and gradgradcheck (create_graph
    reuses the forward's masks)."""
    hidden, outs = ([4, 4], [1, 1]) if layer2 == "dot" else ([4, 4], [2, 3])
    w1, b1, w2, b2 = (torch.randn(8, 5, dtype=torch.float64, requires_grad=True),
                      torch.randn(8, dtype=torch.float64, requires_grad=True),
                      torch.randn(4 * sum(outs), dtype=torch.float64, requires_grad=True),
                      torch.randn(sum(outs), dtype=torch.float64, requires_grad=True))
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)

    def f(*args):
        torch.manual_seed(0)
        return tuple(torch.ops.mtlfast.mlp_heads(*args, hidden, outs, "gelu", layer2, 0.5))

    assert torch.autograd.gradcheck(f, (x, w1, b1, w2, b2), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, w1, b1, w2, b2))
