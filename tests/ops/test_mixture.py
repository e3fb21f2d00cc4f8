"""The per-task mixture op: torch path and Triton kernels (interpreter on CPU, compiled on a
GPU) against the plain-loop reference; autograd, gradcheck, compile, bad input."""

import importlib

import pytest
import torch

from mtlfast import _ext
from mtlfast.ops._dispatch import backend
from tests.conftest import count_calls, rel_err

mx = importlib.import_module("mtlfast.ops.mixture")

# (T, B, E, D): ragged, odd, and the 1-edges
SHAPES = [(3, 5, 4, 7), (1, 1, 1, 1), (8, 33, 8, 130), (2, 1, 5, 3), (5, 17, 1, 9),
          (1, 9, 3, 1)]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def _inputs(T, B, E, D, dtype, device="cpu", layout="arch"):
    """``arch``: g and h as the transposed views the expert blocks pass; else contiguous."""
    if layout == "arch":
        g = torch.randn(B, T, E).softmax(-1).transpose(0, 1)
        h = torch.randn(B, E, D).transpose(0, 1)
    else:
        g, h = torch.randn(T, B, E).softmax(-1), torch.randn(E, B, D)
    dz = torch.randn(T, B, D)
    return [t.to(device=device, dtype=dtype) for t in (g, h, dz)]


def _ref(g, h, dz):
    z = mx.mixture_reference(g.double(), h.double())
    dg, dh = mx.mixture_backward_reference(dz.double(), g.double(), h.double())
    return z, dg, dh


def _check(fwd, bwd, shape, dtype, device="cpu", layout="arch"):
    g, h, dz = _inputs(*shape, dtype, device, layout)
    z_ref, dg_ref, dh_ref = _ref(g, h, dz)
    z = fwd(g, h)
    assert z.shape == z_ref.shape and z.dtype == dtype
    assert rel_err(z, z_ref) < TOL[dtype]
    dg, dh = bwd(dz, g, h)
    assert dg.shape == g.shape and dh.shape == h.shape
    assert rel_err(dg, dg_ref) < TOL[dtype]
    assert rel_err(dh, dh_ref) < TOL[dtype]


def test_reference_is_the_einsum():
    g, h, _ = _inputs(3, 5, 4, 7, torch.float64)
    assert rel_err(mx.mixture_reference(g, h), torch.einsum("tbe,ebd->tbd", g, h)) < 1e-14


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["arch", "contiguous"])
def test_torch_path_matches_reference(shape, dtype, layout):
    _check(mx._forward_torch, lambda dz, g, h: mx._backward_torch(dz, g, h, True, True),
           shape, dtype, layout=layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_public_op_autograd_matches_reference(dtype):
    g, h, dz = _inputs(4, 13, 6, 11, dtype)
    g.requires_grad_(), h.requires_grad_()
    z = mx.mixture(g, h)
    z.backward(dz)
    z_ref, dg_ref, dh_ref = _ref(g.detach(), h.detach(), dz)
    assert rel_err(z, z_ref) < TOL[dtype]
    assert rel_err(g.grad, dg_ref) < TOL[dtype] and rel_err(h.grad, dh_ref) < TOL[dtype]
    dg, dh = mx.mixture_backward(dz, g.detach(), h.detach())
    assert rel_err(dg, dg_ref) < TOL[dtype] and rel_err(dh, dh_ref) < TOL[dtype]


@pytest.mark.parametrize("shape", [(3, 4, 2, 5), (1, 1, 1, 1), (2, 3, 1, 2)])
def test_gradcheck_fp64(shape):
    g, h, _ = _inputs(*shape, torch.float64)
    assert torch.autograd.gradcheck(mx.mixture, (g.requires_grad_(), h.requires_grad_()))


def test_one_input_needs_grad():
    g, h, dz = _inputs(3, 4, 2, 5, torch.float32)
    h.requires_grad_()
    mx.mixture(g, h).backward(dz)
    assert rel_err(h.grad, _ref(g, h.detach(), dz)[2]) < 1e-5


def test_custom_op_opcheck():
    g, h, _ = _inputs(3, 4, 2, 5, torch.float32, layout="contiguous")
    torch.library.opcheck(torch.ops.mtlfast.mixture.default,
                          (g.requires_grad_(), h.requires_grad_()))


def test_compile_sees_through():
    g, h, dz = _inputs(3, 6, 4, 5, torch.float32)
    g.requires_grad_(), h.requires_grad_()
    compiled = torch.compile(mx.mixture, fullgraph=True, backend="aot_eager")
    z = compiled(g, h)
    z.backward(dz)
    z_ref, dg_ref, dh_ref = _ref(g.detach(), h.detach(), dz)
    assert rel_err(z, z_ref) < 1e-5 and rel_err(g.grad, dg_ref) < 1e-5
    assert rel_err(h.grad, dh_ref) < 1e-5


def test_dispatch_rule():
    assert backend("mixture", torch.zeros(2, 3, 4)) == "torch"  # few rows
    many = torch.zeros(2, 256, 4)
    assert backend("mixture", many) == ("cpu" if _ext.has_cpu_kernels() else "torch")
    assert backend("mixture", many.bfloat16()) == "torch"


# ----------------------------------------------------------------------------- C++ (CPU)

cpp_available = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="needs the C++ extension")


def _cpp_backward(dz, g, h):
    return torch.ops.mtlfast.mixture_backward_cpu(dz, g, h, True, True)


# D across the kernel's 4-vector blocks, single vectors and the scalar tail
@cpp_available
# (16, 16, 5, 64), (20, 32, 3, 32): 16+ gradient rows 4 KB apart, copied row-major inside
@pytest.mark.parametrize("shape", SHAPES + [(9, 40, 9, 128), (40, 7, 8, 64), (2, 3, 5, 37),
                                            (4, 2, 6, 8), (6, 5, 3, 33), (16, 16, 5, 64),
                                            (20, 32, 3, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["arch", "contiguous"])
def test_cpp_kernel_matches_reference(shape, dtype, layout):
    _check(torch.ops.mtlfast.mixture_cpu, _cpp_backward, shape, dtype, layout=layout)


@cpp_available
def test_cpp_kernel_strided_inputs_and_one_gradient():
    """A non-unit last stride (copied inside) and each gradient alone."""
    T, B, E, D = 3, 6, 4, 10
    g = torch.randn(T, B, E, 2, dtype=torch.float64)[..., 0].softmax(-1)
    h = torch.randn(E, B, D, 3, dtype=torch.float64)[..., 1]
    dz = torch.randn(T, B, D, 2, dtype=torch.float64)[..., 0]
    z_ref, dg_ref, dh_ref = _ref(g, h, dz)
    assert rel_err(torch.ops.mtlfast.mixture_cpu(g, h), z_ref) < 1e-12
    dg, dh = torch.ops.mtlfast.mixture_backward_cpu(dz, g, h, True, False)
    assert rel_err(dg, dg_ref) < 1e-12 and dh.numel() == 0
    dg, dh = torch.ops.mtlfast.mixture_backward_cpu(dz, g, h, False, True)
    assert rel_err(dh, dh_ref) < 1e-12 and dg.numel() == 0


@cpp_available
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_public_op_uses_the_kernel_from_256_rows(dtype, monkeypatch):
    calls = count_calls(monkeypatch, torch.ops.mtlfast, "mixture_backward_cpu")
    g, h, dz = _inputs(5, 300, 7, 19, dtype)
    g.requires_grad_(), h.requires_grad_()
    z = mx.mixture(g, h)
    z.backward(dz)
    assert calls
    z_ref, dg_ref, dh_ref = _ref(g.detach(), h.detach(), dz)
    tol = TOL[dtype]
    assert rel_err(z, z_ref) < tol and rel_err(g.grad, dg_ref) < tol
    assert rel_err(h.grad, dh_ref) < tol
    # batched gradients (the engine's jacobian mode) take torch's bmm's
    dzs = torch.randn(3, *dz.shape, dtype=dtype)
    dgb, dhb = torch.autograd.grad(mx.mixture(g, h), (g, h), dzs, is_grads_batched=True)
    for i in range(3):
        _, dg_i, dh_i = _ref(g.detach(), h.detach(), dzs[i])
        assert rel_err(dgb[i], dg_i) < tol and rel_err(dhb[i], dh_i) < tol


@cpp_available
def test_cpp_kernel_rejects_bad_input():
    g, h, dz = _inputs(2, 3, 4, 5, torch.float32)
    with pytest.raises(RuntimeError, match="float32 or both float64"):
        torch.ops.mtlfast.mixture_cpu(g.half(), h.half())
    with pytest.raises(RuntimeError, match="g must be"):
        torch.ops.mtlfast.mixture_cpu(g, h[:, :2])
    with pytest.raises(RuntimeError, match="dz must be"):
        torch.ops.mtlfast.mixture_backward_cpu(dz[:, :, :3], g, h, True, True)


def test_bad_input_raises_naming_the_argument():
    g, h, _ = _inputs(3, 4, 2, 5, torch.float32)
    with pytest.raises(TypeError, match="g must be a torch.Tensor"):
        mx.mixture([1.0], h)
    with pytest.raises(ValueError, match="h must be 3-D"):
        mx.mixture(g, h[0])
    with pytest.raises(ValueError, match="h must be \\(E=2, B=4, D\\)"):
        mx.mixture(g, h[:1])
    with pytest.raises(ValueError, match="h must be \\(E=2, B=4, D\\)"):
        mx.mixture(g, h[:, :3])
    with pytest.raises(TypeError, match="dtype"):
        mx.mixture(g, h.double())
    with pytest.raises(TypeError, match="floating point"):
        mx.mixture(g.long(), h)
    with pytest.raises(ValueError, match="dz must be"):
        mx.mixture_backward(torch.zeros(3, 4, 6), g, h)


# ----------------------------------------------------------------------------- Triton

triton_available = pytest.mark.skipif(not _ext.has_triton(), reason="needs triton")


@triton_available
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernels_match_reference(shape, dtype):
    """Triton kernels: compiled on a GPU, in the interpreter (TRITON_INTERPRET=1) on CPU."""
    from mtlfast.kernels.triton import mixture as tk

    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check(tk.mixture_triton, tk.mixture_backward_triton, shape, dtype, device)


@triton_available
def test_triton_kernels_contiguous_layout():
    from mtlfast.kernels.triton import mixture as tk

    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check(tk.mixture_triton, tk.mixture_backward_triton, (4, 19, 3, 21), torch.float32,
           device, layout="contiguous")


@triton_available
def test_triton_branch_of_the_public_op(monkeypatch):
    """The dispatch picks Triton (interpreter on CPU with MTLFAST_HEADS_TRITON=1)."""
    monkeypatch.setenv("MTLFAST_HEADS_TRITON", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g, h, dz = _inputs(3, 7, 4, 5, torch.bfloat16, device)
    if device == "cpu" and not _ext.triton_interpreter():
        pytest.skip("TRITON_INTERPRET is not set")
    assert backend("mixture", g) == "triton"
    g.requires_grad_(), h.requires_grad_()
    mx.mixture(g, h).backward(dz)
    z_ref, dg_ref, dh_ref = _ref(g.detach(), h.detach(), dz)
    assert rel_err(g.grad, dg_ref) < TOL[torch.bfloat16]
    assert rel_err(h.grad, dh_ref) < TOL[torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_public_op_matches_reference(shape, dtype):
    g, h, dz = _inputs(*shape, dtype, "cuda")
    assert backend("mixture", g) == ("triton" if _ext.has_triton() else "torch")
    g.requires_grad_(), h.requires_grad_()
    z = mx.mixture(g, h)
    z.backward(dz)
    z_ref, dg_ref, dh_ref = _ref(g.detach(), h.detach(), dz)
    assert rel_err(z, z_ref) < TOL[dtype]
    assert rel_err(g.grad, dg_ref) < TOL[dtype] and rel_err(h.grad, dh_ref) < TOL[dtype]
