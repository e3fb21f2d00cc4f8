import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

from mtlfast.methods import FairGrad
from tests.methods._helpers import matrix


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("T,P", [(2, 10), (7, 40), (32, 200)])
def test_solves_alpha_fair_equation(alpha, T, P):
    """The paper's optimality condition K w = w^(-1/alpha), w > 0, to 1e-10."""
    G = matrix(T, P, seed=T)
    K = G @ G.T
    w = FairGrad(alpha=alpha).weights(K)
    assert (w > 0).all()
    rhs = w.pow(-1 / alpha)
    assert ((K @ w - rhs).norm() / rhs.norm()) < 1e-10


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_matches_scipy_least_squares(alpha):
    G = matrix(5, 30, seed=4)
    K = (G @ G.T).numpy()
    sol = least_squares(lambda x: K @ x - x ** (-1 / alpha), np.full(5, 0.2),
                        bounds=(0, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15)
    w = FairGrad(alpha=alpha).weights(G @ G.T)
    np.testing.assert_allclose(w.numpy(), sol.x, rtol=1e-7)


def test_scale_behaviour():
    """w scales as c^(-alpha/(alpha+1)) when K scales by c."""
    G = matrix(4, 30, seed=1)
    K = G @ G.T
    w = FairGrad(alpha=2.0).weights(K)
    torch.testing.assert_close(FairGrad(alpha=2.0).weights(1e6 * K), w * 1e6 ** (-2 / 3))


def test_alpha_zero_is_mean():
    K = matrix(4, 10) @ matrix(4, 10).T
    torch.testing.assert_close(FairGrad(alpha=0.0).weights(K), torch.full((4,), 0.25,
                                                                          dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("T", [3, 8])
def test_matches_torchjd(alpha, T):
    from torchjd.aggregation import FairGrad as TorchJDFairGrad

    G = matrix(T, 50, seed=T)
    expected = TorchJDFairGrad(alpha=alpha)(G)
    got = FairGrad(alpha=alpha)(G)
    assert (got - expected).norm() / expected.norm() < 1e-6


def test_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="alpha"):
        FairGrad(alpha=-1.0)
    with pytest.raises(ValueError, match="iters"):
        FairGrad(iters=0)
