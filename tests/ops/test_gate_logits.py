"""Grouped gates' logits (gate g on its own input x[skip + g]) as one op: the C++ kernel and
torch's path against the per-gate loop reference over gate families (PLE's task gates, a
shared gate over every expert, ragged and one-column gates, 17 gates), widths across the
kernel's vector blocks and tails, skipped inputs, input layouts, dtypes, scales, batched
gradients, fp64 gradcheck, non-finite input and bad input; ``GateBank``'s grouped logits on
both paths."""

import pytest
import torch

from mtlfast import _ext
from mtlfast.arch.gates import GateBank
from mtlfast.ops import gate_logits as gl
from mtlfast.ops._dispatch import backend
from tests.conftest import count_calls, devices, rel_err

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}
SIZES = {
    "ple_last": [2] * 8,  # PLE's last level: a task gate over (own, shared) per task
    "ple_inner": [2] * 4 + [5],  # and the shared gate over every expert
    "ragged": [3, 1, 5, 2],
    "one_column": [1, 1, 1],
    "single": [1],
    "many": [2] * 17,
    "wide": [9, 4],
}
cpp_available = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="needs the C++ extension")


def _inputs(name, M, K, dtype, skip=0, layout="mixture", scale=1.0, bias=True, seed=0):
    """x as the arch passes it: a transposed view of a row-major (M, skip + G, K) mixture
    ("mixture"), a contiguous (skip + G, M, K) ("group_major"), or with a non-unit last
    stride ("strided")."""
    torch.manual_seed(seed)
    sizes = SIZES[name]
    G, N = len(sizes), sum(sizes)
    if layout == "mixture":
        x = torch.randn(M, skip + G, K).transpose(0, 1)
    elif layout == "group_major":
        x = torch.randn(skip + G, M, K)
    else:
        x = torch.randn(skip + G, M, K, 2)[..., 0]
    w = torch.randn(N * K) / K ** 0.5
    b = torch.randn(N) if bias else None
    dl = torch.randn(M, N)
    x = x * scale
    return [None if t is None else t.to(dtype) for t in (x, w, b, dl)], sizes


def _reference(x, w, b, sizes, skip, dl):
    """Logits and the gradients of x, w, b in float64 through the per-gate loop."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, b)]
    y = gl.gate_logits_reference(*leaves, sizes, skip)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dl.double())
    return y.detach(), grads


@cpp_available
@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("K", [1, 7, 8, 16, 17, 32, 37, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("skip", [0, 1, 2])
@pytest.mark.parametrize("layout", ["mixture", "group_major", "strided"])
def test_cpp_kernel_matches_reference(name, K, dtype, skip, layout):
    (x, w, b, dl), sizes = _inputs(name, 19, K, dtype, skip, layout)
    y_ref, (dx_ref, dw_ref, db_ref) = _reference(x, w, b, sizes, skip, dl)
    y = torch.ops.mtlfast.gate_logits_cpu(x, w, b, sizes, skip)
    assert y.shape == y_ref.shape and y.dtype == dtype and y.is_contiguous()
    assert rel_err(y, y_ref) < TOL[dtype]
    dx, dw, db = torch.ops.mtlfast.gate_logits_backward_cpu(dl, x, w, sizes, skip, True, True,
                                                           True)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    assert torch.all(dx[:skip] == 0)
    for got, want in ((dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        assert rel_err(got, want) < TOL[dtype]
    for flags, keep in (((True, False, False), 0), ((False, True, False), 1),
                        ((False, False, True), 2)):
        parts = torch.ops.mtlfast.gate_logits_backward_cpu(dl, x, w, sizes, skip, *flags)
        for i, part in enumerate(parts):
            if i == keep:
                assert torch.equal(part, (dx, dw, db)[i])
            else:
                assert part.numel() == 0


@pytest.mark.parametrize("name", ["ple_last", "ple_inner", "ragged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [5, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_public_op_matches_reference(name, dtype, M, bias):
    """Both paths: the kernel for fp32/fp64, torch's (baddbmm / grouped_linear) for the
    half types, with and without a bias and a skipped input."""
    (x, w, b, dl), sizes = _inputs(name, M, 24, dtype, skip=1, bias=bias)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = gl.gate_logits(x, w, b, sizes, skip=1)
    y.backward(dl)
    y_ref, grads_ref = _reference(x, w, b, sizes, 1, dl)
    assert y.dtype == dtype and rel_err(y, y_ref) < TOL[dtype]
    for leaf, want in zip(leaves, grads_ref, strict=True):
        assert leaf.grad.dtype == dtype and rel_err(leaf.grad, want) < TOL[dtype]


@pytest.mark.parametrize("scale", [1e-6, 1e4])
def test_extreme_scales(scale):
    (x, w, b, dl), sizes = _inputs("ple_inner", 300, 33, torch.float32, skip=1, scale=scale)
    x.requires_grad_(), w.requires_grad_()
    y = gl.gate_logits(x, w, None, sizes, skip=1)
    y.backward(dl)
    y_ref, (dx_ref, dw_ref) = _reference(x, w, None, sizes, 1, dl)
    assert rel_err(y, y_ref) < TOL[torch.float32]
    assert rel_err(x.grad, dx_ref) < TOL[torch.float32]
    assert rel_err(w.grad, dw_ref) < TOL[torch.float32]


@cpp_available
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_public_op_runs_the_kernel_for_eager_fp32_fp64(dtype, monkeypatch):
    calls = count_calls(monkeypatch, torch.ops.mtlfast, "gate_logits_backward_cpu")
    (x, w, b, dl), sizes = _inputs("ple_last", 5, 8, dtype, skip=1)
    gl.gate_logits(x.requires_grad_(), w, b, sizes, 1).backward(dl)
    assert calls
    calls.clear()
    (x, w, b, dl), sizes = _inputs("ple_last", 5, 8, torch.bfloat16, skip=1)
    gl.gate_logits(x.requires_grad_(), w, b, sizes, 1).backward(dl)
    assert not calls


def test_dispatch_rule():
    x = torch.zeros(3, 4, 5)
    assert backend("gate_logits", x, eager=True) == ("cpu" if _ext.has_cpu_kernels()
                                                     else "torch")
    assert backend("gate_logits", x, eager=False) == "torch"  # compile, torch.func
    assert backend("gate_logits", x.bfloat16(), eager=True) == "torch"


@pytest.mark.parametrize("name", ["ple_last", "ragged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_gradients(name, dtype):
    """``autograd.grad(..., is_grads_batched=True)`` (the engine's jacobian mode): the kernel
    path's backward takes torch's formula."""
    (x, w, b, _), sizes = _inputs(name, 7, 9, dtype, skip=1)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    y = gl.gate_logits(x, w, b, sizes, 1)
    cots = torch.randn(3, *y.shape, dtype=dtype)
    batched = torch.autograd.grad(y, (x, w, b), cots, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        single = torch.autograd.grad(y, (x, w, b), cots[i], retain_graph=True)
        for got, want in zip(batched, single, strict=True):
            assert rel_err(got[i], want) < TOL[dtype]


def test_gradcheck_fp64():
    (x, w, b, _), sizes = _inputs("ragged", 4, 5, torch.float64, skip=1)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda *a: gl.gate_logits(*a, sizes, 1), leaves)


def test_non_finite_input_stays_in_its_rows():
    """A NaN or inf in row m of gate g's input gives non-finite logits in row m of gate g's
    columns only (as the per-gate loop does); nothing crashes."""
    (x, w, b, _), sizes = _inputs("ple_inner", 300, 16, torch.float32, skip=1)
    x = x.clone()
    x[2, 7, 3] = float("nan")  # gate 1's input, row 7
    x[4, 9, 0] = float("inf")  # gate 3's input, row 9
    y = gl.gate_logits(x, w, b, sizes, 1)
    ref = gl.gate_logits_reference(x.double(), w.double(), b.double(), sizes, 1)
    assert torch.equal(torch.isfinite(y), torch.isfinite(ref))
    bad = ~torch.isfinite(y)
    assert bad[7, 2:4].all() and bad[9, 6:8].all() and bad.sum() == 4


@pytest.mark.parametrize("case, error, match", [
    (dict(x=torch.randn(3, 4)), ValueError, "x must be 3-D"),
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(3, 5, 4, dtype=torch.int64)), TypeError, "x must be floating"),
    (dict(x=torch.randn(4, 5, 4)), ValueError, r"skip \+ G = 3"),
    (dict(weight=torch.randn(7)), ValueError, "weight must hold"),
    (dict(bias=torch.randn(2)), ValueError, "bias must hold"),
    (dict(weight=torch.randn(12).double()), TypeError, "weight has dtype"),
    (dict(sizes=[1, 0]), ValueError, "sizes must be ints >= 1"),
    (dict(sizes=[]), ValueError, "sizes must be ints >= 1"),
    (dict(skip=-1), ValueError, "skip must be an int >= 0"),
    (dict(skip=True), ValueError, "skip must be an int >= 0"),
])
def test_bad_input_names_the_argument(case, error, match):
    args = dict(x=torch.randn(3, 5, 4), weight=torch.randn(12), bias=torch.randn(3),
                sizes=[1, 2], skip=1)
    args.update(case)
    with pytest.raises(error, match=match):
        gl.gate_logits(**args)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("skip", [0, 1])
@pytest.mark.parametrize("layout", ["mixture", "group_major"])
def test_gate_bank_grouped_logits(kernel, skip, layout, monkeypatch):
    """``GateBank`` with grouped inputs (gate g reads x[skip + g]) gives the per-gate loop's
    logits and gradients on the kernel and on torch's path, and no gradient to skipped
    inputs."""
    if not kernel:
        monkeypatch.setattr(_ext, "has_cpu_kernels", lambda: False)
    torch.manual_seed(3)
    sel, K = [[0, 1], [0, 2, 3], [1, 3]], 12
    G, M = len(sel) + skip, 37
    bank = GateBank(K, sel, 4, grouped=True, skip_inputs=skip)
    xb = torch.randn(M, G, K) if layout == "mixture" else torch.randn(G, M, K)
    xb.requires_grad_()
    x = xb.transpose(0, 1) if layout == "mixture" else xb
    logits = bank.logits(x)
    w, b = bank.blocks()
    want = torch.cat([x[skip + g] @ w[g].t() + b[g] for g in range(len(sel))], dim=1)
    assert rel_err(logits, want) < 1e-6
    c = torch.randn_like(logits)
    got = torch.autograd.grad((logits * c).sum(), [xb, *bank.parameters()])
    ref = torch.autograd.grad((want * c).sum(), [xb, *bank.parameters()])
    for a, r in zip(got, ref, strict=True):
        assert rel_err(a, r) < 1e-6
    if skip:
        dx = got[0].transpose(0, 1) if layout == "mixture" else got[0]
        assert torch.all(dx[0] == 0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", ["ple_last", "ragged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_op_on_each_device(device, name, dtype):
    (x, w, b, dl), sizes = _inputs(name, 300, 24, dtype, skip=1)
    x, w, b, dl = (t.to(device) for t in (x, w, b, dl))
    x.requires_grad_(), w.requires_grad_()
    y = gl.gate_logits(x, w, b, sizes, 1)
    y.backward(dl)
    y_ref, (dx_ref, dw_ref, _) = _reference(x.cpu(), w.cpu(), b.cpu(), sizes, 1, dl.cpu())
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(x.grad, dx_ref) < TOL[dtype] and rel_err(w.grad, dw_ref) < TOL[dtype]


@pytest.mark.parametrize("M, K", [(0, 5), (3, 0), (0, 0)])
def test_empty_rows_or_width(M, K):
    """No rows or zero-width inputs: the reference's shapes and values (logits = bias, zero
    gradients), nothing crashes."""
    x = torch.randn(3, M, K, requires_grad=True)
    w, b = torch.randn(3 * K, requires_grad=True), torch.randn(3, requires_grad=True)
    y = gl.gate_logits(x, w, b, [1, 2], 1)
    y.sum().backward()
    assert torch.equal(y, gl.gate_logits_reference(x, w, b, [1, 2], 1))
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    assert torch.equal(b.grad, torch.full((3,), float(M)))
