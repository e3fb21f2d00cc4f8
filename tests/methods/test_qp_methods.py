"""PCGrad, MGDA, UPGrad, DualProj, CAGrad, IMTLG against float64 references and torchjd 0.18.

Intentional differences from torchjd, stated where tested:
- MGDA: torchjd runs Frank-Wolfe to a tolerance (epsilon=1e-3); ours is the exact optimum.
- UPGrad/DualProj: torchjd regularizes the trace-normalized Gram by 1e-4 on the diagonal;
  with ``reg_eps=0`` the two agree to solver precision.
- PCGrad: torchjd draws its orders from torch's global RNG; given the same orders (patched
  into torch.randperm) the two agree exactly.
"""

import copy
import importlib.util

import numpy as np
import pytest
import quadprog
import torch
import torchjd.aggregation as jd
from torchjd._linalg import QuadprogProjector

import mtlfast.methods as M


def _G(T, P=40, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(T, P, generator=g, dtype=torch.float64)
    return torch.randn(T, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, P, generator=g, dtype=torch.float64)


def _qp(K, q, C, lb, meq=0):
    """quadprog: argmin 1/2 x^T K x + q^T x s.t. C^T x >= lb (first meq equalities)."""
    T = K.shape[0]
    return torch.from_numpy(quadprog.solve_qp(K.numpy() + 1e-12 * np.eye(T), -q.numpy(),
                                              C.numpy(), lb.numpy(), meq=meq)[0])


# ---------------------------------------------------------------------------------- MGDA
@pytest.mark.parametrize("T", [2, 3, 8, 20])
def test_mgda_is_the_min_norm_point(T):
    for seed in range(3):
        G = _G(T, P=max(T - 2, 1) if seed == 2 else 40, seed=seed)
        K = G @ G.T / (G @ G.T).diagonal().max()
        w = M.MGDA().weights(K)
        eye = torch.eye(T, dtype=torch.float64)
        ref = _qp(K, torch.zeros(T, dtype=torch.float64),
                  torch.cat([torch.ones(T, 1, dtype=torch.float64), eye], 1),
                  torch.cat([torch.ones(1, dtype=torch.float64),
                             torch.zeros(T, dtype=torch.float64)]),
                  meq=1)
        assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-12
        assert float(w @ K @ w) <= float(ref @ K @ ref) * (1 + 1e-9) + 1e-15


def test_mgda_closed_form_two_tasks():
    g1, g2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-0.5, 1.0],
                                                                       dtype=torch.float64)
    G = torch.stack([g1, g2])
    w = M.MGDA().weights(G @ G.T)
    gamma = float((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)))  # Algorithm 1 of Sener & Koltun
    torch.testing.assert_close(w, torch.tensor([gamma, 1 - gamma], dtype=torch.float64))
    G = torch.stack([g1, 3 * g1])  # the min-norm point is the vertex g1
    torch.testing.assert_close(M.MGDA().weights(G @ G.T), torch.tensor([1.0, 0.0],
                                                                       dtype=torch.float64))


@pytest.mark.parametrize("T", [3, 10])
def test_mgda_vs_torchjd(T):
    """torchjd's Frank-Wolfe stops at a tolerance: ours is never worse, and close."""
    G = _G(T, seed=T)
    ours = M.MGDA()(G)
    theirs = jd.MGDA()(G)
    assert ours.norm() <= theirs.norm() * (1 + 1e-12)
    assert ours.norm() >= theirs.norm() * 0.98


# -------------------------------------------------------------------- UPGrad / DualProj
def _dual_cone_weights(K, u):
    """min v^T K v s.t. v >= u, by quadprog."""
    T = K.shape[0]
    return _qp(K, torch.zeros(T, dtype=torch.float64), torch.eye(T, dtype=torch.float64), u)


@pytest.mark.parametrize("T", [2, 5, 12])
def test_upgrad_dualproj_match_quadprog(T):
    for seed in range(3):
        G = _G(T, seed=seed)
        G[0] = -G[1] * 0.7 + 0.1 * G[0]  # conflicts
        K = G @ G.T / (G @ G.T).diagonal().max()
        u = torch.full((T,), 1 / T, dtype=torch.float64)
        w_up = sum(_dual_cone_weights(K, u[i] * torch.eye(T, dtype=torch.float64)[i])
                   for i in range(T))
        torch.testing.assert_close(M.UPGrad().weights(K), w_up, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(M.DualProj().weights(K), _dual_cone_weights(K, u),
                                   rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["UPGrad", "DualProj"])
def test_upgrad_dualproj_vs_torchjd(name):
    pytest.importorskip("qpsolvers")  # torchjd's projector needs it
    G = _G(6, seed=4)
    G[0] = -G[1] * 0.5 + 0.2 * G[0]
    ours = getattr(M, name)()(G)
    exact = getattr(jd, name)(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))(G)
    torch.testing.assert_close(ours, exact, rtol=1e-7, atol=1e-9)
    default = getattr(jd, name)()(G)  # regularized by 1e-4: within 1%, not equal
    assert (ours - default).norm() < 1e-2 * ours.norm()


def test_upgrad_pref_vector():
    pytest.importorskip("qpsolvers")
    G = _G(4, seed=1)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    ours = M.UPGrad(pref_vector=p)(G)
    theirs = jd.UPGrad(pref_vector=p, projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))(G)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="pref_vector"):
        M.UPGrad(pref_vector=[-1.0, 1.0])


def test_upgrad_batched_grams():
    Gs = torch.stack([_G(5, seed=s) for s in range(3)])
    K = Gs @ Gs.transpose(-1, -2)
    w = M.UPGrad().weights(K)
    for i in range(3):
        torch.testing.assert_close(w[i], M.UPGrad().weights(K[i]))


# ----------------------------------------------------------------------------- PCGrad
def _pcgrad_loop(G, orders, reduction):
    out = torch.zeros(G.shape[1], dtype=G.dtype)
    for i in range(G.shape[0]):
        g = G[i].clone()
        for j in orders[i].tolist():
            if j != i and g @ G[j] < 0:
                g = g - (g @ G[j]) / (G[j] @ G[j]) * G[j]
        out += g
    return out / G.shape[0] if reduction == "mean" else out


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_pcgrad_matches_paper_loop_with_its_orders(reduction):
    G = _G(6, seed=2)
    G[3] = -G[0] + 0.1 * G[3]
    method = M.PCGrad(reduction=reduction, seed=7)
    d = method.weights(G @ G.T) @ G
    torch.testing.assert_close(d, _pcgrad_loop(G, method.last_orders, reduction))


def test_pcgrad_seed_and_orders():
    G = _G(5, seed=3)
    a, b = M.PCGrad(seed=1), M.PCGrad(seed=1)
    torch.testing.assert_close(a(G), b(G))
    assert torch.equal(a.last_orders, b.last_orders)
    assert sorted(a.last_orders[0].tolist()) == list(range(5))
    first = a.last_orders.clone()
    a(G)
    assert not torch.equal(first, a.last_orders)  # fresh orders every call


def test_pcgrad_vs_torchjd_same_orders(monkeypatch):
    G = _G(5, seed=5)
    G[1] = -G[0] + 0.3 * G[1]
    method = M.PCGrad(seed=3)
    ours = method(G)
    rows = iter(method.last_orders)
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: next(rows))
    theirs = jd.PCGrad()(G)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_pcgrad_rejects_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        M.PCGrad(reduction="max")


def test_pcgrad_state_restores_generator():
    method = M.PCGrad(seed=11)
    G = _G(4, seed=0)
    method(G)
    state = copy.deepcopy(method.state_dict())
    nxt = method(G)
    restored = M.PCGrad(seed=0)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(G), nxt)


# ----------------------------------------------------------------------------- CAGrad
def _cagrad_objective(K, w, c):
    p = torch.full((K.shape[0],), 1 / K.shape[0], dtype=K.dtype)
    return float((K @ p) @ w + c * (p @ K @ p).sqrt() * (w @ K @ w).clamp_min(0).sqrt())


def _inner_weights(w_out, T):
    """Recover the simplex weights w from rescale=0's output p + coef * w."""
    wi = w_out - 1 / T
    return wi / wi.sum()


@pytest.mark.parametrize("T", [2, 4, 9])
def test_cagrad_solves_its_problem(T):
    """Optimality: no point of the simplex (SLSQP from many starts) beats ours, and the KKT
    conditions of min a^T w + r |g_w| over the simplex hold."""
    import scipy.optimize as so

    for seed in range(3):
        G = _G(T, seed=seed)
        G[0] = -0.8 * G[1] + 0.2 * G[0]
        K = G @ G.T
        c = 0.5
        w = _inner_weights(M.CAGrad(c=c, rescale=0).weights(K), T)
        ours = _cagrad_objective(K, w, c)
        for start in range(3):
            x0 = np.random.default_rng(start).dirichlet(np.ones(T))
            res = so.minimize(lambda x, K=K, c=c: _cagrad_objective(K, torch.from_numpy(x), c), x0,
                              bounds=[(0, 1)] * T, method="SLSQP",
                              constraints={"type": "eq", "fun": lambda x: x.sum() - 1},
                              options={"ftol": 1e-15, "maxiter": 500})
            assert ours <= res.fun + 1e-10 * abs(res.fun) + 1e-12
        p = torch.full((T,), 1 / T, dtype=torch.float64)
        grad = K @ p + c * (p @ K @ p).sqrt() * (K @ w) / (w @ K @ w).sqrt()
        lam = grad[w > 1e-12].mean()
        scale = float(grad.abs().max())
        assert (grad - lam >= -1e-9 * scale).all()
        assert ((grad - lam)[w > 1e-9].abs() <= 1e-9 * scale).all()


def test_cagrad_vs_torchjd():
    """torchjd solves with Clarabel to ~1e-6 and normalizes by a trace with norm_eps: close."""
    pytest.importorskip("cvxpy")  # torchjd's CAGrad needs cvxpy + clarabel
    G = _G(5, seed=1)
    G[0] = -0.8 * G[1] + 0.2 * G[0]
    for c in (0.2, 0.5, 1.0):
        ours = M.CAGrad(c=c, rescale=0)(G)
        theirs = jd.CAGrad(c=c)(G)
        assert (ours - theirs).norm() < 1e-4 * theirs.norm()


def test_cagrad_rescale_and_edge_cases():
    G = _G(4, seed=2)
    K = G @ G.T
    base = M.CAGrad(c=0.5, rescale=0).weights(K)
    torch.testing.assert_close(M.CAGrad(c=0.5, rescale=1).weights(K), base / 1.25)
    torch.testing.assert_close(M.CAGrad(c=0.5, rescale=2).weights(K), base / 1.5)
    torch.testing.assert_close(M.CAGrad(c=0.0, rescale=0).weights(K),
                               torch.full((4,), 0.25, dtype=torch.float64))  # c = 0: the mean
    # 0 in the hull and c > 1: the optimum is g_w = 0 (Pareto-stationary), no update, as torchjd
    G2 = torch.stack([G[0], -2 * G[0]])
    assert torch.equal(M.CAGrad(c=1.5).weights(G2 @ G2.T), torch.zeros(2, dtype=torch.float64))
    if importlib.util.find_spec("cvxpy") is not None:
        assert jd.CAGrad(c=1.5)(G2).norm() == 0
    with pytest.raises(ValueError, match="c must be"):
        M.CAGrad(c=-1.0)
    with pytest.raises(ValueError, match="rescale"):
        M.CAGrad(rescale=3)


# ------------------------------------------------------------------------------ IMTLG
def test_imtlg_equal_projections_and_torchjd():
    G = _G(5, seed=3)
    w = M.IMTLG().weights(G @ G.T)
    d = w @ G
    proj = G @ d / G.norm(dim=1)
    torch.testing.assert_close(proj, proj.mean().expand(5))  # IMTL-G's condition
    assert abs(float(w.sum()) - 1) < 1e-12
    torch.testing.assert_close(M.IMTLG()(G), jd.IMTLG()(G), rtol=1e-9, atol=1e-12)
    G_dep = _G(6, rank=3, seed=4)  # dependent rows: torchjd's pseudo-inverse generalization
    torch.testing.assert_close(M.IMTLG()(G_dep), jd.IMTLG()(G_dep), rtol=1e-7, atol=1e-9)


def test_imtlg_paper_closed_form():
    """Liu et al. (2021), eq. 9: alpha_{2:T} = g_1 U^T (D U^T)^-1, alpha_1 = 1 - sum."""
    G = _G(4, seed=6)
    u = G / G.norm(dim=1, keepdim=True)
    D = G[0] - G[1:]
    U = u[0] - u[1:]
    a = G[0] @ U.T @ torch.linalg.inv(D @ U.T)
    alpha = torch.cat([1 - a.sum(0, keepdim=True), a])
    torch.testing.assert_close(M.IMTLG().weights(G @ G.T), alpha, rtol=1e-9, atol=1e-12)
