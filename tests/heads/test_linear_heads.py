"""The C++ op for Linear heads on per-task inputs (``torch.ops.mtlfast.linear_heads``) against
its spec (``linear_heads_reference``) across head families and dtypes, forward and backward;
twice differentiable, forward mode, batched gradients; empty and strided inputs; bad
arguments; and which FusedHeads calls take it."""

from __future__ import annotations

import pytest
import torch

import mtlfast
from mtlfast import FusedHeads
from mtlfast.ops.linear_heads import linear_heads_reference
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

FAMILIES = {"one head": [3], "width-1": [1, 1], "ragged": [1, 7, 3], "eight": [2] * 8}


def _args(outs, dtype, bias=True, M=6, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(outs), M, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(sum(outs), D, generator=g) / 2).to(dtype).requires_grad_()
    b = torch.randn(sum(outs), generator=g).to(dtype).requires_grad_() if bias else None
    return x, w, b


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("upcast", [False, True])
def test_op_matches_reference(family, bias, dtype, upcast):
    outs = FAMILIES[family]
    x, w, b = _args(outs, dtype, bias)
    assert_matches_reference(lambda *a: torch.ops.mtlfast.linear_heads(*a, outs, upcast=upcast),
                             lambda *a: linear_heads_reference(*a, outs), [x, w, b], dtype)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", list(TOL))
def test_upcast_runs_low_precision_gemms_in_fp32(family, dtype):
    """``upcast``: every GEMM of a bf16/fp16 call, forward and backward, on fp32 operands;
    fp32/fp64 calls ignore it, bit for bit."""
    outs = FAMILIES[family]

    def call(upcast):
        x, w, b = _args(outs, dtype)
        ys = torch.ops.mtlfast.linear_heads(x, w, b, outs, upcast=upcast)
        return [*ys, *torch.autograd.grad(ys, [x, w, b], [torch.ones_like(y) for y in ys])]

    assert_upcast_runs_gemms_in_fp32(call, dtype)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradcheck_twice_forward_mode_and_batched(family):
    outs = FAMILIES[family]
    x, w, b = _args(outs, torch.float64, M=3, D=4)

    def f(*args):
        return tuple(torch.ops.mtlfast.linear_heads(*args, outs))

    assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True,
                                    check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_empty_strided_and_unused():
    outs = [2, 3]
    _, w, b = _args(outs, torch.float32)
    x = torch.randn(2, 0, 5, requires_grad=True)
    ys = torch.ops.mtlfast.linear_heads(x, w, b, outs)
    assert [y.shape for y in ys] == [(0, 2), (0, 3)]
    grads = torch.autograd.grad(sum(y.sum() for y in ys), [x, w, b])
    assert grads[0].shape == x.shape and all(torch.count_nonzero(g) == 0 for g in grads[1:])
    base = torch.randn(4, 6, 10, requires_grad=True)
    xs = base[::2, :, ::2]  # strided in every dimension
    ys = torch.ops.mtlfast.linear_heads(xs, w, b, outs)
    refs = linear_heads_reference(xs, w, b, outs)
    loss = (ys[0] ** 2).sum()  # head 1 unused: its gradients are zeros
    got = torch.autograd.grad(loss, [base, w, b])
    want = torch.autograd.grad((refs[0] ** 2).sum(), [base, w, b])
    for a, r in zip(got, want, strict=True):
        assert rel_err(a, r) < 1e-6


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(outs=[2, 0]), ">= 1"),
    (dict(T=3), "x must be"),
    (dict(w_rows=4), "x must be"),
    (dict(b_size=4), "b must be"),
    (dict(w_dtype=torch.float64), "dtype and device"),
])
def test_bad_arguments_raise_not_crash(kwargs, match):
    outs = kwargs.get("outs", [2, 3])
    x = torch.randn(kwargs.get("T", 2), 3, 5)
    w = torch.randn(kwargs.get("w_rows", sum(outs)), 5, dtype=kwargs.get("w_dtype", torch.float32))
    b = torch.randn(kwargs.get("b_size", sum(outs)))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mtlfast.linear_heads(x, w, b, outs)


def _uses_op(out: dict) -> bool:
    def node(y):
        fn = y.grad_fn
        return fn.next_functions[0][0] if fn.name() == "ViewBackward0" else fn

    return all("LinearHeads" in node(y).name() for y in out.values())


@pytest.mark.parametrize(("widths", "dtype", "takes_op"), [
    ([2, 3], torch.float32, True),
    ([1] * 8, torch.float32, True),
    ([1] * 9, torch.float32, False),
    ([2, 2], torch.bfloat16, True),
    ([2] * 4, torch.bfloat16, False),
    ([1, 7, 3, 2], torch.bfloat16, True),
    ([1] * 9, torch.bfloat16, False),
])
@pytest.mark.parametrize("native", [True, False])
def test_fused_linear_heads_per_task_route(widths, dtype, takes_op, native, monkeypatch):
    lowp_gemms(monkeypatch, native)
    takes_op = takes_op or (not native and dtype == torch.bfloat16)
    fused = FusedHeads(6, {f"t{i}": n for i, n in enumerate(widths)}, dtype=dtype)
    z = torch.randn(len(widths), 2, 3, 6, dtype=dtype, requires_grad=True)
    out = fused(z, per_task=True)
    assert _uses_op(out) == takes_op
    assert not _uses_op(fused(z[0]))  # shared features: one F.linear
    plain = fused.unfuse()
    params = [z, *fused.parameters()]
    got = torch.autograd.grad(sum((y * y).sum() for y in out.values()), params)
    ref = {t: plain[t](z[i]) for i, t in enumerate(out)}
    want = torch.autograd.grad(sum((y * y).sum() for y in ref.values()),
                               [z, *plain.parameters()])
    for t in out:
        assert out[t].shape == ref[t].shape and rel_err(out[t], ref[t]) < 2 * TOL[dtype]
    assert rel_err(got[0], want[0]) < 4 * TOL[dtype]


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_shared_input_linear_heads_without_native_lowp_gemms(native, bias, monkeypatch):
    """bf16 Linear heads on shared features: one GEMM, in fp32 on a CPU without native bf16
    GEMMs (forward and backward), bf16 outputs and gradients matching the unfused heads'."""
    lowp_gemms(monkeypatch, native)
    torch.manual_seed(0)
    fused = FusedHeads(6, {"a": 1, "b": 7, "c": 3}, bias=bias, dtype=torch.bfloat16)
    plain = fused.unfuse()
    z = torch.randn(4, 5, 6, dtype=torch.bfloat16, requires_grad=True)
    with GemmDtypes() as gemms:
        out = fused(z)
        got = torch.autograd.grad(sum(y.float().square().sum() for y in out.values()),
                                  [z, *fused.parameters()])
    assert gemms.dtypes == {torch.bfloat16 if native else torch.float32}
    ref = {t: plain[t](z) for t in out}
    want = torch.autograd.grad(sum(y.float().square().sum() for y in ref.values()),
                               [z, *plain.parameters()])
    tol = 2 * TOL[torch.bfloat16]
    for t, y in out.items():
        assert y.dtype == torch.bfloat16 and rel_err(y, ref[t]) < tol
    assert all(g.dtype == torch.bfloat16 for g in got)
    assert rel_err(got[0], want[0]) < tol
    assert rel_err(got[1], torch.cat([want[1 + 2 * i] if bias else want[1 + i]
                                      for i in range(3)])) < tol


def test_engine_step_equals_the_grouped_path(monkeypatch):
    """UPGrad's jacobian step with per-task features into Linear heads: the same .grad
    through the op as through ``grouped_linear``."""
    assert_engine_step_unchanged(monkeypatch, "linear_heads", None, "jacobian", _uses_op)
