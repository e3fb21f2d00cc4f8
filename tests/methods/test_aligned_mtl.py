import pytest
import torch

from mtlfast.methods import AlignedMTL
from mtlfast.ops import solvers_nonlinear as S
from tests.methods._helpers import matrix


def _svd_update(G, pref, mode):
    """The paper on explicit G: singular values of G all set to sqrt(s), then pref^T G_hat."""
    U, sv, Vh = torch.linalg.svd(G, full_matrices=False)
    keep = sv ** 2 > (sv[0] ** 2) * G.shape[0] * torch.finfo(G.dtype).eps
    U, sv, Vh = U[:, keep], sv[keep], Vh[keep]
    lam = sv ** 2  # descending
    s = {"min": lam[-1], "median": torch.median(lam), "rmse": lam.mean()}[mode]
    return s.sqrt() * (pref @ U) @ Vh


@pytest.mark.parametrize("mode", S.SCALE_MODES)
@pytest.mark.parametrize("T,P,rank", [(2, 10, None), (6, 40, None), (6, 40, 3), (32, 200, None),
                                      (9, 5, None)])
def test_matches_explicit_svd(mode, T, P, rank):
    G = matrix(T, P, seed=T)
    if rank is not None:
        G = matrix(T, rank, seed=1) @ matrix(rank, P, seed=2)
    pref = torch.full((T,), 1 / T, dtype=torch.float64)
    w = AlignedMTL(scale_mode=mode).weights(G @ G.T)
    expected = _svd_update(G, pref, mode)
    assert (w @ G - expected).norm() / expected.norm() < 1e-8


def test_aligned_directions_are_balanced():
    """With pref = e_i the aligned task gradients are orthogonal with equal norms sqrt(s)."""
    G = matrix(5, 40, seed=3)
    K = G @ G.T
    rows = torch.stack([AlignedMTL(pref_vector=torch.eye(5, dtype=torch.float64)[i])
                        .weights(K) @ G for i in range(5)])
    s = torch.linalg.eigvalsh(K)[0]
    torch.testing.assert_close(rows @ rows.T, s * torch.eye(5, dtype=torch.float64))


def test_zero_gram_gives_pref():
    w = AlignedMTL().weights(torch.zeros(3, 3, dtype=torch.float64))
    torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("device", ["meta"])
def test_reference_on_meta(device):
    K = torch.empty(2, 5, 5, device=device)
    for mode in S.SCALE_MODES:
        assert S.aligned_mtl_weights_reference(K, None, mode).shape == (2, 5)


@pytest.mark.parametrize("mode", S.SCALE_MODES)
@pytest.mark.parametrize("T", [3, 8])
def test_matches_torchjd(mode, T):
    from torchjd.aggregation import AlignedMTL as TorchJDAlignedMTL

    G = matrix(T, 50, seed=T)
    expected = TorchJDAlignedMTL(scale_mode=mode)(G)
    got = AlignedMTL(scale_mode=mode)(G)
    assert (got - expected).norm() / expected.norm() < 1e-10


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scale_mode"):
        AlignedMTL(scale_mode="max")
    with pytest.raises(ValueError, match="pref_vector has 2 entries"):
        AlignedMTL(pref_vector=torch.ones(2)).weights(torch.eye(3))
