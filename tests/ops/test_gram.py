import sys

import pytest
import torch

from mtlfast import _ext
from mtlfast.ops import gram, gram_reference
from tests.conftest import devices, rel_err

SHAPES = [(1, 1), (1, 37), (2, 5), (3, 1001), (5, 4099), (7, 513), (13, 2049), (32, 10007),
          (33, 777), (64, 3001), (17, 8)]

needs_ext = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="C++ extension not built")


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_kernel_matches_reference(shape, dtype):
    G = torch.randn(*shape, dtype=dtype) * torch.rand(shape[0], 1, dtype=dtype).add(0.1)
    K = torch.ops.mtlfast.gram(G)
    ref = gram_reference(G.double())
    assert K.dtype == dtype
    assert rel_err(K, ref) < (1e-6 if dtype == torch.float32 else 1e-13)
    assert torch.equal(K, K.T)


@needs_ext
def test_cpp_kernel_strided_rows():
    G = torch.randn(9, 3000)[:, 7:2900]  # row stride != P
    assert rel_err(torch.ops.mtlfast.gram(G), gram_reference(G.double())) < 1e-6
    Gt = torch.randn(500, 6).T  # column-major: copied to contiguous first
    assert rel_err(torch.ops.mtlfast.gram(Gt), gram_reference(Gt.double())) < 1e-6


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dispatch_matches_reference(device, dtype):
    for T, P in [(1, 3), (6, 1234), (40, 5003)]:
        G = torch.randn(T, P, device=device).to(dtype)
        K = gram(G)
        assert K.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert K.shape == (T, T)
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-5)
        assert rel_err(K, gram_reference(G.double())) < tol
        assert torch.equal(K, K.T)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES + [(70, 3001), (100, 20000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_reference(shape, dtype):
    if not _ext.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    G = torch.randn(*shape, device="cuda").to(dtype)
    K = torch.ops.mtlfast.gram(G)
    assert K.dtype == torch.float32
    assert rel_err(K, gram_reference(G.double())) < 1e-5
    assert torch.equal(K, K.T)


def test_gram_is_deterministic():
    G = torch.randn(11, 70001)
    assert torch.equal(gram(G), gram(G))


@pytest.mark.parametrize(
    "bad, err",
    [
        (torch.zeros(3, 0), ValueError),
        (torch.zeros(0, 5), ValueError),
        (torch.zeros(5), ValueError),
        (torch.zeros(2, 3, 4), ValueError),
        (torch.zeros(2, 3, dtype=torch.int64), TypeError),
        ([[1.0, 2.0]], TypeError),
    ],
)
def test_bad_input_rejected(bad, err):
    with pytest.raises(err, match="gram: G"):
        gram(bad)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("which", ["dispatched", "reference"])
def test_gradient_flows_through_every_backend(device, which, monkeypatch):
    gram_module = sys.modules["mtlfast.ops.gram"]  # ops.gram is also the function's name
    if which == "reference":
        monkeypatch.setattr(gram_module, "backend", lambda op, t, **f: "reference")
    G = torch.randn(5, 13, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(gram, (G,))
    dK = torch.randn(5, 5, dtype=torch.float64, device=device)
    (gram(G) * dK).sum().backward()
    torch.testing.assert_close(G.grad, (dK + dK.T) @ G.detach())


def test_gradient_in_low_precision_has_the_input_dtype():
    G = torch.randn(4, 30).to(torch.bfloat16).requires_grad_()
    gram(G).sum().backward()
    assert G.grad.dtype == torch.bfloat16
    torch.testing.assert_close(G.grad.float(), 2 * torch.ones(4, 4) @ G.detach().float(),
                               rtol=2e-2, atol=2e-2)
