import copy

import numpy as np
import pytest
import torch
from scipy.optimize import root

from mtlfast.methods import NashMTL
from mtlfast.ops import solvers_nonlinear as S
from tests.methods._helpers import matrix


@pytest.mark.parametrize("T,P", [(2, 10), (5, 40), (16, 100), (32, 300)])
def test_solves_bargaining_equation(T, P):
    """w > 0 and K w = 1/w (the paper's optimality condition) to 1e-10, without the clip."""
    G = matrix(T, P, seed=T)
    K = G @ G.T
    w = NashMTL(max_norm=0.0).weights(K)
    assert (w > 0).all()
    assert ((K @ w - 1 / w).norm() / (1 / w).norm()) < 1e-10


@pytest.mark.parametrize("seed", range(3))
def test_matches_scipy_root(seed):
    G = matrix(6, 30, seed=seed)
    K = (G @ G.T).numpy()
    sol = root(lambda a: K @ a - 1 / a, np.full(6, 1 / np.sqrt(np.trace(K))), tol=1e-13)
    assert np.linalg.norm(K @ sol.x - 1 / sol.x) < 1e-10 * np.linalg.norm(1 / sol.x)
    w = NashMTL(max_norm=0.0).weights(G @ G.T)
    np.testing.assert_allclose(w.numpy(), sol.x, rtol=1e-8)


def test_norm_clip():
    G = matrix(4, 50, seed=1)
    K = G @ G.T
    free = NashMTL(max_norm=0.0).weights(K)
    norm = (free @ G).norm()
    clipped = NashMTL(max_norm=float(norm) / 3).weights(K)
    torch.testing.assert_close((clipped @ G).norm(), norm / 3)
    torch.testing.assert_close(clipped, free / 3)
    torch.testing.assert_close(NashMTL(max_norm=float(norm) * 2).weights(K), free)


def test_update_weights_every_reuses_weights():
    method = NashMTL(max_norm=0.0, update_weights_every=3)
    grams = [matrix(4, 20, seed=s) for s in range(5)]
    ws = [method.weights(G @ G.T) for G in grams]
    fresh = [NashMTL(max_norm=0.0).weights(G @ G.T) for G in grams]
    torch.testing.assert_close(ws[0], fresh[0])
    torch.testing.assert_close(ws[1], fresh[0])
    torch.testing.assert_close(ws[2], fresh[0])
    torch.testing.assert_close(ws[3], fresh[3])
    torch.testing.assert_close(ws[4], fresh[3])


def test_cached_weights_survive_state_dict():
    method = NashMTL(max_norm=0.0, update_weights_every=4)
    G = matrix(3, 20, seed=0)
    method.weights(G @ G.T)
    restored = NashMTL(max_norm=0.0, update_weights_every=4)
    restored.load_state_dict(copy.deepcopy(method.state_dict()))
    other = matrix(3, 20, seed=9)
    torch.testing.assert_close(restored.weights(other @ other.T), method.weights(G @ G.T))
    assert restored._calls == 2


def test_skipped_step_keeps_cache():
    method = NashMTL(max_norm=0.0, on_nonfinite="skip")
    G = matrix(3, 20, seed=0)
    w0 = method.weights(G @ G.T)
    bad = G @ G.T
    bad[0, 1] = float("inf")
    assert torch.equal(method.weights(bad), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(method.cached_alpha, w0)


def test_batched_grams_are_independent_solves():
    Gs = [matrix(5, 30, seed=s) for s in range(3)]
    K = torch.stack([G @ G.T for G in Gs])
    w = NashMTL(max_norm=0.0).weights(K)
    for b, G in enumerate(Gs):
        torch.testing.assert_close(w[b], NashMTL(max_norm=0.0).weights(G @ G.T))


def test_torch_path_matches_dispatch():
    G = matrix(8, 40, seed=2)
    K = G @ G.T
    torch.testing.assert_close(S.power_fixed_point_reference(K, 1.0, 20),
                               S.power_fixed_point(K, 1.0, 20), rtol=1e-10, atol=0)


@pytest.mark.parametrize("max_norm", [0.0, 1.0])
@pytest.mark.parametrize("T", [3, 6])
def test_matches_torchjd(T, max_norm):
    """torchjd 0.18's NashMTL (cvxpy/ECOS, the official code) stops at ||K a - 1/a|| < 1e-3:
    agreement is to that tolerance, not to rounding."""
    pytest.importorskip("cvxpy")
    pytest.importorskip("ecos")
    from torchjd.aggregation import NashMTL as TorchJDNashMTL

    G = matrix(T, 40, seed=T)
    expected = TorchJDNashMTL(n_tasks=T, max_norm=max_norm)(G)
    got = NashMTL(max_norm=max_norm)(G)
    assert (got - expected).norm() / expected.norm() < 2e-3


def test_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="max_norm"):
        NashMTL(max_norm=-1.0)
    with pytest.raises(ValueError, match="update_weights_every"):
        NashMTL(update_weights_every=0)
    with pytest.raises(ValueError, match="optim_niter"):
        NashMTL(optim_niter=0)
    method = NashMTL()
    method.weights(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="T=3"):
        method.weights(torch.eye(4, dtype=torch.float64))
