"""CUDA kernels against their torch references: ragged shapes, misaligned rows, three dtypes,
outputs poisoned with NaN first, determinism, no host sync, CUDA-graph capture."""

import pytest
import torch

from mtlfast import _ext
from mtlfast.ops import (
    combine,
    combine_reference,
    graddrop,
    graddrop_reference,
    gram,
    gram_reference,
)
from tests.conftest import no_host_sync, rel_err
from tests.ops.test_graddrop import _assert_close_but_ties

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="CUDA kernels not built"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The direct kernel (T <= 8), the tiled kernel (9..64, three tile sizes), the row-block one.
GRAM_T = [1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 24, 31, 32, 33, 47, 63, 64, 65, 100]
GRAM_P = [1, 3, 111, 113, 4099, 100003]


def _poison_allocator():
    """Leave NaN in freed cached blocks, so a kernel output that is not fully written shows."""
    for n in (1 << 10, 1 << 16, 1 << 20, 1 << 24):
        x = torch.full((n,), float("nan"), device="cuda")
        del x


def _rows(T, P, dtype, layout):
    """A (T, P) G: contiguous, a column slice (misaligned base, stride != P), or odd stride."""
    if layout == "contiguous":
        G = torch.randn(T, P, device="cuda")
    elif layout == "offset":
        G = torch.randn(T, P + 5, device="cuda")[:, 1 : P + 1]
    else:  # odd row stride, aligned base
        G = torch.randn(T, P + 3, device="cuda")[:, :P]
    scale = torch.rand(T, 1, device="cuda") + 0.1  # rows of different norms
    return (G * scale).to(dtype)


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-4


@pytest.mark.parametrize("T", GRAM_T)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram(T, dtype):
    for P in GRAM_P:
        for layout in ("contiguous", "offset", "odd"):
            G = _rows(T, P, dtype, layout)
            _poison_allocator()
            K = torch.ops.mtlfast.gram(G)
            assert K.dtype == torch.float32 and K.shape == (T, T)
            assert torch.isfinite(K).all(), (T, P, layout)
            err = rel_err(K, gram_reference(G.double()))
            assert err < _tol(dtype), (T, P, layout, err)
            assert torch.equal(K, K.T)
            assert torch.equal(K, torch.ops.mtlfast.gram(G)), "not deterministic"


@pytest.mark.parametrize("T,P", [(8, 10_000_019), (32, 3_000_017)])
def test_gram_large_p(T, P):
    G = torch.randn(T, P, device="cuda")
    err = rel_err(gram(G), gram_reference(G.double()))
    assert err < 1e-5, err


@pytest.mark.parametrize("T", [1, 2, 3, 8, 9, 33, 100])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_combine(T, dtype, accumulate):
    for P in (1, 7, 4097, 100003):
        for layout in ("contiguous", "offset", "odd"):
            G = _rows(T, P, dtype, layout)
            w = torch.randn(T, device="cuda")
            base = torch.randn(P, device="cuda").to(dtype)
            wide = torch.full((P + 1,), float("nan"), device="cuda", dtype=dtype)
            out = wide[1:] if layout == "offset" else wide[:P]  # misaligned out too
            for scale in (0.75, torch.tensor(0.75, device="cuda")):
                if accumulate:
                    out.copy_(base)
                else:
                    out.fill_(float("nan"))
                combine(w, G, out, accumulate=accumulate, scale=scale)
                ref = combine_reference(w.double(), G.double(), base.double().clone(),
                                        accumulate=accumulate, scale=0.75)
                assert torch.isfinite(out).all(), (P, layout)
                tol = 1e-6 if dtype == torch.float32 else 1e-2
                assert rel_err(out, ref) < tol, (P, layout, rel_err(out, ref))


@pytest.mark.parametrize("T", [1, 2, 5, 16, 17, 40])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_leak", [False, True])
def test_graddrop_matches_reference(T, dtype, with_leak):
    leak = torch.rand(T, device="cuda") if with_leak else None
    for P in (1, 9, 4097, 100003):
        for layout in ("contiguous", "offset", "odd"):
            G = _rows(T, P, dtype, layout)
            G[:, ::5] = G[:, ::5].abs()  # some pure-sign columns
            u = torch.rand(P, device="cuda")
            _poison_allocator()
            out = graddrop(G, u, leak)
            assert out.dtype == dtype and out.shape == (P,)
            _assert_close_but_ties(out.cpu(), graddrop_reference(G, u, leak).cpu(), G.cpu(),
                                   u.cpu())


def test_graddrop_nan_policy():
    G = torch.randn(6, 1001, device="cuda")
    G[2, 10] = float("nan")
    G[0, 20] = float("inf")
    G[:, 30] = 0.0
    u = torch.rand(1001, device="cuda")
    out = graddrop(G, u)
    assert out[10].isnan() and out[20].isnan() and out[30] == 0
    assert torch.equal(out.isnan(), graddrop_reference(G, u).isnan())


def test_no_host_sync():
    G = torch.randn(8, 100003, device="cuda")
    scale = torch.tensor(0.5, device="cuda")
    out = torch.empty(100003, device="cuda")
    u = torch.rand(100003, device="cuda")
    with no_host_sync():
        K = gram(G)
        combine(K[0], G, out, scale=scale)
        graddrop(G, u, torch.full((8,), 0.1, device="cuda"))


def test_cuda_graph_capture():
    G = torch.randn(8, 50001, device="cuda")
    w = torch.rand(8, device="cuda")
    out = torch.empty(50001, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graphs asks
        K = gram(G)
        combine(w, G, out)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        K = gram(G)
        combine(K[0] / K[0, 0], G, out)
    for _ in range(2):
        G.copy_(torch.randn_like(G))
        graph.replay()
        torch.cuda.synchronize()
        Kref = gram_reference(G.double())
        assert rel_err(K, Kref) < 1e-5
        assert rel_err(out, (Kref[0] / Kref[0, 0]) @ G.double()) < 1e-5


@pytest.mark.parametrize("T", [1, 2, 5, 31, 32, 33, 64])
@pytest.mark.parametrize("batch", [(), (3,), (2, 4)])
def test_pcgrad_weights_kernel(T, batch):
    from mtlfast.ops import solvers

    G = torch.randn(*batch, T, 40, dtype=torch.float64)
    if T > 1:
        G[..., -1, :] = -0.5 * G[..., 0, :]  # a sure conflict
        G[..., 1, :] = 0.0  # a zero gradient: K_jj = 0 is never projected on
    K = G @ G.transpose(-1, -2)
    orders = torch.rand(*batch, T, T).argsort(-1)
    ref = solvers.pcgrad_weights_reference(K, orders)
    C = solvers.pcgrad_weights(K.cuda(), orders.cuda())
    assert C.device.type == "cuda" and torch.isfinite(C).all()
    torch.testing.assert_close(C.cpu(), ref, rtol=1e-10, atol=1e-10)
