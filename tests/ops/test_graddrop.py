import pytest
import torch

from mtlfast import _ext
from mtlfast.ops import graddrop, graddrop_reference
from tests.conftest import devices

SHAPES = [(1, 1), (1, 37), (3, 40), (5, 4099), (16, 1001), (17, 513), (33, 2049)]


def _mask_by_loops(G, U, leak):
    """GradDrop written as the paper states it, one column at a time, in float64."""
    T, P = G.shape
    out = torch.zeros(P, dtype=torch.float64)
    for p in range(P):
        col = G[:, p].double()
        total = col.abs().sum()
        purity = 0.5 * (1 + col.sum() / total) if total > 0 else 0.5
        for t in range(T):
            g = col[t]
            keep = (purity > U[p] and g > 0) or (purity < U[p] and g < 0)
            out[p] += (leak[t] + (1 - leak[t]) * keep) * g
    return out


def _inputs(T, P, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    G = (torch.randn(T, P, generator=g) * torch.rand(T, 1, generator=g).add(0.1)).to(dtype)
    u = torch.rand(P, generator=g, dtype=torch.float64 if dtype == torch.float64 else
                   torch.float32)
    leak = torch.rand(T, generator=g)
    return G.to(device), u.to(device), leak.to(device)


@pytest.mark.parametrize("T,P", [(1, 5), (3, 40), (8, 257)])
@pytest.mark.parametrize("with_leak", [False, True])
def test_reference_matches_the_paper_loops(T, P, with_leak):
    G, u, leak = _inputs(T, P, torch.float64, seed=T)
    G[:, ::7] = G[:, ::7].abs()
    G[:, 3] = 0.0
    leak = leak.double() if with_leak else None
    ref = graddrop_reference(G, u, leak)
    expected = _mask_by_loops(G, u, torch.zeros(T, dtype=torch.float64) if leak is None else leak)
    torch.testing.assert_close(ref, expected, rtol=1e-12, atol=1e-12)


def test_pure_sign_columns_are_kept_whole():
    G = torch.rand(4, 50) + 0.1  # all positive: purity 1 > u always
    u = torch.rand(50)
    torch.testing.assert_close(graddrop_reference(G, u), G.sum(0))
    # All negative: purity 0, so u > 0 = purity keeps the negative entries (u == 0 keeps none).
    u[0] = 0.0
    expected = torch.where(u > 0, (-G).sum(0), torch.zeros(50))
    torch.testing.assert_close(graddrop_reference(-G, u), expected)


def test_full_leak_passes_every_gradient():
    G, u, _ = _inputs(5, 300, torch.float32)
    torch.testing.assert_close(graddrop_reference(G, u, torch.ones(5)), G.sum(0))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_leak", [False, True])
def test_dispatch_matches_reference(device, dtype, with_leak):
    for T, P in SHAPES:
        G, u, leak = _inputs(T, P, dtype, device, seed=T + P)
        leak = leak if with_leak else None
        out = graddrop(G, u, leak)
        ref = graddrop_reference(G, u, leak)
        assert out.dtype == dtype and out.shape == (P,)
        _assert_close_but_ties(out, ref, G, u)


def _assert_close_but_ties(out, ref, G, u):
    """Equal up to rounding, except columns whose purity lies within rounding of u (the kernel
    sums in another order than BLAS, so such a column may keep the other sign)."""
    Gd = G.double()
    abs_sum = Gd.abs().sum(0)
    purity = torch.where(abs_sum > 0, 0.5 * (1 + Gd.sum(0) / abs_sum), 0.5)
    tie = (purity - u.double()).abs() < 1e-3 if G.dtype != torch.float64 else \
        torch.zeros_like(purity, dtype=torch.bool)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(G.dtype, 2e-2)
    scale = Gd.abs().sum(0) + 1e-30
    err = ((out.double() - ref.double()).abs() / scale)[~tie]
    assert err.numel() == 0 or err.max() < tol


@pytest.mark.parametrize("device", devices())
def test_nan_and_inf_columns(device):
    G, u, leak = _inputs(5, 1000, torch.float32, device)
    G[1, 3] = float("nan")
    G[2, 5] = float("inf")
    G[:, 4] = 0.0
    for lk in (None, leak):
        out = graddrop(G, u, lk)
        assert out[3].isnan() and out[5].isnan() and out[4] == 0
        keep = torch.ones(1000, dtype=torch.bool, device=device)
        keep[[3, 5]] = False
        assert torch.isfinite(out[keep]).all()
        assert torch.equal(out.nan_to_num(), graddrop_reference(G, u, lk).nan_to_num())


def test_purity_fn_applies_before_the_comparison():
    G, u, _ = _inputs(4, 500, torch.float64)
    assert torch.equal(graddrop_reference(G, u, purity_fn=lambda p: p), graddrop_reference(G, u))
    # f(purity) = 1: every column keeps its positive entries, whatever u < 1.
    kept = graddrop_reference(G, u, purity_fn=torch.ones_like)
    torch.testing.assert_close(kept, G.clamp_min(0).sum(0), rtol=1e-12, atol=1e-12)


def test_bad_input_rejected():
    G = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="graddrop: G"):
        graddrop(torch.zeros(3), torch.rand(3))
    with pytest.raises(TypeError, match="graddrop: G"):
        graddrop(torch.zeros(2, 3, dtype=torch.int64), torch.rand(3))
    with pytest.raises(ValueError, match="graddrop: u"):
        graddrop(G, torch.rand(4))
    with pytest.raises(ValueError, match="graddrop: leak"):
        graddrop(G, torch.rand(3), torch.zeros(3))
    with pytest.raises(ValueError, match="graddrop: u is on meta"):
        graddrop(G, torch.rand(3, device="meta"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_leak", [False, True])
@pytest.mark.parametrize("shape", SHAPES + [(64, 100003)])
def test_cuda_kernel_matches_reference(dtype, with_leak, shape):
    if not _ext.has_cuda_kernels():
        pytest.skip("CUDA kernels not built")
    G, u, leak = _inputs(*shape, dtype, "cuda", seed=shape[0])
    leak = leak if with_leak else None
    out = torch.ops.mtlfast.graddrop(G, u, leak)
    _assert_close_but_ties(out, graddrop_reference(G, u, leak), G, u)
    G_strided = torch.randn(shape[0], shape[1] + 5, device="cuda").to(dtype)[:, 5:]
    _assert_close_but_ties(torch.ops.mtlfast.graddrop(G_strided, u, leak),
                           graddrop_reference(G_strided, u, leak), G_strided, u)
