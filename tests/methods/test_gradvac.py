import copy
import math

import pytest
import torch

from mtlfast.methods import GradVac
from tests.methods._helpers import matrix


def _explicit(G, phi, perms, beta, eps):
    """The paper's loop on explicit gradients (float64), task i visiting the others in the
    order ``perms[i]`` of the list of tasks j != i."""
    phi = phi.clone()
    update = torch.zeros(G.shape[1], dtype=G.dtype)
    for i in range(G.shape[0]):
        g_pc = G[i].clone()
        others = [j for j in range(G.shape[0]) if j != i]
        for j in [others[p] for p in perms[i].tolist()]:
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


def test_orders_are_permutations():
    perms = GradVac(seed=0).draw_orders(6)
    for i in range(6):
        assert sorted(perms[i].tolist()) == list(range(5))
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
    TorchJDGradVac = pytest.importorskip("torchjd.aggregation").GradVac

    ours, twin = GradVac(beta=0.5, seed=2), GradVac(seed=2)
    theirs = TorchJDGradVac(beta=0.5)
    for step in range(3):
        G = matrix(T, 25, seed=step) + matrix(1, 25, seed=40 + step)
        orders = twin.draw_orders(T)
        # torchjd shuffles the list of other tasks with torch.randperm, one call per task i.
        perms = iter(list(orders))
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


@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
def test_layerwise_contract_with_the_engine(mode):
    """mtlfast.backward hands a layer-wise GradVac one Gram per shared parameter tensor and
    combines row l of its weights with the per-task gradients of parameter l."""
    import mtlfast

    gen = torch.Generator().manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(16, 5, generator=gen)

    def losses():
        z = trunk(x)
        return torch.stack([(z[:, t] - 0.3 * t).pow(2).mean() + z.sum(1).mean() for t in range(3)])

    params = list(trunk.parameters())
    L = losses()
    grads = [torch.autograd.grad(L[t], params, retain_graph=True) for t in range(3)]
    per_param = [torch.stack([grads[t][l].flatten() for t in range(3)]).double()
                 for l in range(len(params))]
    w = GradVac(granularity="parameter", seed=4).weights(torch.stack([g @ g.T for g in per_param]))
    method = GradVac(granularity="parameter", seed=4)
    mtlfast.backward(losses(), trunk, method, mode=mode)
    for l, p in enumerate(params):
        expected = w[l] @ per_param[l]
        torch.testing.assert_close(p.grad.flatten().double(), expected, rtol=1e-4, atol=1e-6)
    assert method.phi_hat.shape == (len(params), 3, 3)
