import pytest
import torch

from mtlfast import _ext
from mtlfast.ops import combine, combine_reference
from tests.conftest import devices, rel_err


@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (5, 16385), (32, 100003), (64, 999)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("accumulate", [False, True])
def test_cpu_backend_matches_reference(shape, dtype, accumulate):
    G = torch.randn(*shape, dtype=dtype)
    w = torch.randn(shape[0], dtype=dtype)
    base = torch.randn(shape[1], dtype=dtype)
    out = base.clone()
    combine(w, G, out, accumulate=accumulate, scale=0.75)
    ref = combine_reference(w.double(), G.double(), base.double().clone(), accumulate=accumulate,
                            scale=0.75)
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-13)


def test_integer_inputs_raise():
    G = torch.ones(3, 4)
    with pytest.raises(TypeError, match="combine: G must be floating point"):
        combine(torch.ones(3), G.long())
    with pytest.raises(TypeError, match="combine: w must be floating point"):
        combine(torch.ones(3, dtype=torch.int32), G)
    with pytest.raises(TypeError, match="combine: out must be floating point"):
        combine(torch.ones(3), G, torch.zeros(4, dtype=torch.int64))


def test_out_of_another_dtype_is_cast():
    G = torch.randn(3, 50, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64)
    out = torch.zeros(50, dtype=torch.float32)
    combine(w, G, out)
    assert rel_err(out, w @ G) < 1e-6


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dispatch_matches_reference(device, dtype):
    G = torch.randn(9, 3001, device=device).to(dtype)
    w = torch.rand(9, device=device)
    out = combine(w, G)
    assert out.dtype == dtype and out.shape == (3001,)
    tol = 1e-12 if dtype == torch.float64 else (1e-6 if dtype == torch.float32 else 1e-2)
    assert rel_err(out, w.double() @ G.double()) < tol
    grad = torch.randn(3001, device=device).to(dtype)
    expected = grad.double() + 2.0 * (w.double() @ G.double())
    combine(w, G, grad, accumulate=True, scale=2.0)
    assert rel_err(grad, expected) < tol


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_reference(dtype):
    if not _ext.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    G = torch.randn(33, 100003, device="cuda").to(dtype)
    w = torch.randn(33, device="cuda")
    out = torch.full((100003,), float("nan"), device="cuda", dtype=dtype)
    torch.ops.mtlfast.combine_(w, G, out, False, 1.0)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(out, w.double() @ G.double()) < tol


def test_bad_input_rejected():
    G = torch.randn(3, 10)
    with pytest.raises(ValueError, match="combine: w"):
        combine(torch.ones(4), G)
    with pytest.raises(ValueError, match="combine: out"):
        combine(torch.ones(3), G, torch.zeros(9))
    with pytest.raises(TypeError, match="combine: G"):
        combine(torch.ones(3), [[1.0]])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_scale_equals_float_scale(device, dtype):
    G = torch.randn(7, 1003, device=device, dtype=dtype)
    w = torch.randn(7, device=device, dtype=dtype)
    base = torch.randn(1003, device=device, dtype=dtype)
    for accumulate in (False, True):
        a, b = base.clone(), base.clone()
        combine(w, G, a, accumulate=accumulate, scale=0.3)
        combine(w, G, b, accumulate=accumulate, scale=torch.tensor(0.3, device=device, dtype=dtype))
        tol = 1e-6 if dtype == torch.float32 else 1e-13
        assert rel_err(b, a) < tol
    ref = combine_reference(w, G, scale=torch.tensor([0.3], dtype=dtype))
    assert rel_err(ref, combine_reference(w, G, scale=0.3)) < 1e-6
    with pytest.raises(ValueError, match="combine: a tensor scale"):
        combine(w, G, scale=torch.ones(2, device=device))
    with pytest.raises(TypeError, match="combine: scale"):
        combine(w, G, scale="2")
