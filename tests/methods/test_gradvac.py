import copy
import math

import pytest
import torch

from mtlfast.methods import GradVac
from tests.methods._helpers import matrix


def _explicit(G, phi, orders, beta, eps):
    """The paper's loop on explicit gradients (float64), visiting tasks in ``orders``."""
    phi = phi.clone()
    update = torch.zeros(G.shape[1], dtype=G.dtype)
    for i in range(G.shape[0]):
        g_pc = G[i].clone()
        for j in orders[i].tolist():
            cos = float(g_pc @ G[j] / (g_pc.norm() * G[j].norm() + eps))
            target = float(phi[i, j])
            if cos < target:
                coef = float(g_pc.norm()) * (target * math.sqrt(max(1 - cos ** 2, 0))
                                             - cos * math.sqrt(max(1 - target ** 2, 0)))
                coef /= float(G[j].norm()) * math.sqrt(max(1 - target ** 2, 0)) + eps
                g_pc = g_pc + coef * G[j]
            phi[i, j] = (1 - beta) * target + beta * cos
        update += g_pc
    return update, phi


@pytest.mark.parametrize("T", [2, 5, 12])
def test_matches_explicit_loop_over_steps(T):
    method = GradVac(beta=0.3, seed=7)
    twin = GradVac(seed=7)  # same generator: same orders
    phi = torch.zeros(T, T, dtype=torch.float64)
    for step in range(4):
        # Correlated tasks so that targets become positive and corrections happen.
        G = matrix(T, 30, seed=step) + 1.5 * matrix(1, 30, seed=100 + step)
        expected, phi = _explicit(G, phi, twin.draw_orders(T), 0.3, 1e-8)
        w = method.weights(G @ G.T)
        assert (w @ G - expected).norm() / expected.norm() < 1e-10
        torch.testing.assert_close(method.phi_hat, phi, rtol=1e-10, atol=1e-12)
    assert (method.phi_hat != 0).any()


def test_layerwise_is_one_gradvac_per_block():
    L, T = 3, 4
    method = GradVac(granularity="parameter", seed=1)
    twin = GradVac(seed=1)
    phis = [torch.zeros(T, T, dtype=torch.float64) for _ in range(L)]
    for step in range(3):
        blocks = [matrix(T, 10 + l, seed=10 * step + l) + matrix(1, 10 + l, seed=50 + l)
                  for l in range(L)]
        w = method.weights(torch.stack([G @ G.T for G in blocks]))
        assert w.shape == (L, T)
        orders = twin.draw_orders(T)
        for l, G in enumerate(blocks):
            expected, phis[l] = _explicit(G, phis[l], orders, 0.5, 1e-8)
            assert (w[l] @ G - expected).norm() / expected.norm() < 1e-10
    assert method.granularity == "parameter"
    with pytest.raises(ValueError, match="EMA targets of shape"):
        method.weights(torch.eye(T, dtype=torch.float64).expand(L + 1, T, T))


def test_orders_are_permutations_of_the_other_tasks():
    orders = GradVac(seed=0).draw_orders(6)
    for i in range(6):
        assert sorted(orders[i].tolist()) == [j for j in range(6) if j != i]
    assert GradVac(seed=0).draw_orders(1).shape == (1, 0)


def test_seed_and_state_dict_reproduce_orders():
    a, b = GradVac(seed=3), GradVac(seed=3)
    assert torch.equal(a.draw_orders(5), b.draw_orders(5))
    G = matrix(5, 20) + matrix(1, 20, seed=9)
    a.weights(G @ G.T)
    restored = GradVac()
    restored.load_state_dict(copy.deepcopy(a.state_dict()))
    torch.testing.assert_close(restored.weights(G @ G.T), a.weights(G @ G.T))


def test_skipped_step_keeps_targets():
    method = GradVac(on_nonfinite="skip", seed=0)
    G = matrix(3, 20) + matrix(1, 20, seed=5)
    method.weights(G @ G.T)
    phi = method.phi_hat.clone()
    bad = G @ G.T
    bad[1, 1] = float("nan")
    assert torch.equal(method.weights(bad), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(method.phi_hat, phi)


@pytest.mark.parametrize("T", [3, 6])
def test_matches_torchjd_with_same_orders(T, monkeypatch):
    from torchjd.aggregation import GradVac as TorchJDGradVac

    ours, twin = GradVac(beta=0.5, seed=2), GradVac(seed=2)
    theirs = TorchJDGradVac(beta=0.5)
    for step in range(3):
        G = matrix(T, 25, seed=step) + matrix(1, 25, seed=40 + step)
        orders = twin.draw_orders(T)
        # torchjd shuffles the list of other tasks with torch.randperm, one call per task i.
        perms = iter([orders[i] - (orders[i] > i).long() for i in range(T)])
        monkeypatch.setattr(torch, "randperm", lambda n, _perms=perms, **kw: next(_perms))
        expected = theirs(G)
        monkeypatch.undo()
        got = ours(G)
        assert (got - expected).norm() / expected.norm() < 1e-10


def test_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="beta"):
        GradVac(beta=1.5)
    with pytest.raises(ValueError, match="eps"):
        GradVac(eps=-1.0)
    with pytest.raises(ValueError, match="granularity"):
        GradVac(granularity="layer")
