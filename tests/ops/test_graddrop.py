import pytest
import torch

from mtlfast.ops import graddrop, graddrop_reference, graddrop_uniform
from tests.conftest import devices

M32 = 0xFFFFFFFF


def _lowbias32_int(x):
    """lowbias32 in plain Python integers, written independently of the module's version."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _uniform_int(seed, p):
    key = _lowbias32_int((seed & M32) ^ _lowbias32_int(((seed >> 32) & M32) ^ 0x9E3779B9))
    x = _lowbias32_int(_lowbias32_int((p & M32) ^ key) ^ (p >> 32))
    return (x >> 8) / 2**24


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**40 + 7, 2**63 - 1])
def test_uniform_matches_integer_hash(seed):
    U = graddrop_uniform(seed, 300)
    expected = torch.tensor([_uniform_int(seed, p) for p in range(300)], dtype=torch.float64)
    assert torch.equal(U.double(), expected)
    assert (U >= 0).all() and (U < 1).all()


def test_uniform_high_columns_and_statistics():
    U = graddrop_uniform(99, 200_000)
    assert abs(U.mean().item() - 0.5) < 0.01 and abs(U.var().item() - 1 / 12) < 0.005
    p = 2**33 + 5  # columns beyond 32 bits hash their high word too
    x = _lowbias32_int(_lowbias32_int((p & M32) ^ 0) ^ (p >> 32))
    assert x != _lowbias32_int(_lowbias32_int((5 & M32) ^ 0) ^ 0)


def _mask_by_loops(G, seed):
    """GradDrop written as the paper states it, one column at a time, in float64."""
    T, P = G.shape
    U = graddrop_uniform(seed, P).double()
    out = torch.zeros(P, dtype=torch.float64)
    for p in range(P):
        col = G[:, p].double()
        purity = 0.5 * (1 + col.sum() / col.abs().sum())
        for t in range(T):
            g = col[t]
            if (purity > U[p] and g > 0) or (purity < U[p] and g < 0):
                out[p] += g
    return out


@pytest.mark.parametrize("T,P", [(1, 5), (3, 40), (8, 257)])
def test_reference_matches_the_paper_loops(T, P):
    G = torch.randn(T, P)
    G[:, ::7] = G[:, ::7].abs()
    ref = graddrop_reference(G, seed=11)
    assert torch.allclose(ref.double(), _mask_by_loops(G, 11), atol=1e-5, rtol=1e-5)


def test_pure_sign_columns_are_kept_whole():
    G = torch.rand(4, 50) + 0.1  # all positive: purity 1 > U always
    assert torch.allclose(graddrop_reference(G, 3), G.sum(0))
    # All negative: purity 0, so U > 0 = purity keeps the negative entries (U == 0 keeps none).
    U = graddrop_uniform(3, 50)
    expected = torch.where(U > 0, (-G).sum(0), torch.zeros(50))
    assert torch.equal(graddrop_reference(-G, 3), expected)


@pytest.mark.parametrize("device", devices())
def test_same_seed_same_output_and_nan_policy(device):
    G = torch.randn(5, 1000, device=device)
    G[1, 3] = float("nan")
    G[:, 4] = 0.0
    a, b = graddrop(G, 7), graddrop(G, 7)
    assert torch.equal(a.nan_to_num(), b.nan_to_num())
    assert a[3].isnan() and a[4] == 0 and torch.isfinite(a[torch.arange(1000) != 3]).all()
    assert not torch.equal(graddrop(G, 8).nan_to_num(), a.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_reference(dtype):
    G = torch.randn(6, 333).to(dtype)
    out = graddrop_reference(G, 1)
    assert out.dtype == dtype
    assert torch.equal(out, graddrop_reference(G.float(), 1).to(dtype))


def test_bad_input_rejected():
    with pytest.raises(ValueError, match="graddrop: G"):
        graddrop(torch.zeros(3), 1)
    with pytest.raises(TypeError, match="graddrop: G"):
        graddrop(torch.zeros(2, 3, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="graddrop: seed"):
        graddrop(torch.zeros(2, 3), -1)
    with pytest.raises(TypeError, match="graddrop: seed"):
        graddrop(torch.zeros(2, 3), 1.5)
