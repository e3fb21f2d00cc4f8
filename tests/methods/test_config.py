import pytest
import torch

from mtlfast.methods import ConFIG
from tests.methods._helpers import matrix


def _explicit(G, pref):
    """The paper on explicit G: pinv of the unit vectors, unit direction, projection length."""
    units = G / G.norm(dim=1, keepdim=True)
    d = torch.linalg.pinv(units) @ pref
    v = d / d.norm()
    return (G @ v).sum() * v


@pytest.mark.parametrize("T,P", [(1, 5), (2, 10), (6, 40), (32, 200)])
def test_matches_explicit_pinv(T, P):
    G = matrix(T, P, seed=T)
    pref = torch.rand(T, dtype=torch.float64).add(0.5)
    w = ConFIG(pref_vector=pref).weights(G @ G.T)
    expected = _explicit(G, pref)
    assert (w @ G - expected).norm() / expected.norm() < 1e-9


def test_conflict_free_equal_cosines():
    """Every task gets the same cosine with the update (the paper's defining property)."""
    G = matrix(5, 30, seed=2)
    d = ConFIG().weights(G @ G.T) @ G
    cos = (G @ d) / (G.norm(dim=1) * d.norm())
    assert (cos > 0).all()
    torch.testing.assert_close(cos, cos.mean().expand(5))


def test_zero_row_gets_zero_weight():
    G = matrix(4, 20, seed=1)
    G[2] = 0
    w = ConFIG().weights(G @ G.T)
    assert w[2] == 0
    expected = _explicit(G[[0, 1, 3]], torch.ones(3, dtype=torch.float64))
    assert (w @ G - expected).norm() / expected.norm() < 1e-9


@pytest.mark.parametrize("T", [2, 5, 9])
def test_matches_torchjd(T):
    from torchjd.aggregation import ConFIG as TorchJDConFIG

    G = matrix(T, 60, seed=T)
    expected = TorchJDConFIG()(G)
    got = ConFIG()(G)
    assert (got - expected).norm() / expected.norm() < 1e-10
