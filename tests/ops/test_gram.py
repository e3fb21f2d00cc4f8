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
