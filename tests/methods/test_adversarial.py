"""Every Gram method over adversarial families of task gradients: row norms from 1e-8 to 1e8,
0 in the convex hull, antiparallel and duplicated rows, rank-deficient, T > P, T from 1 to 256.

Each family is built from seeded float64 G. Properties and their tolerances (all relative to
the scale of the problem, ``max_j |g_j| sum_j |w_j|`` for an update's rounding):

- every method: finite weights and update;
- ``non_conflicting`` methods: ``(w @ G) . g_i >= -1e-8 |g_i| max_j |g_j| sum_j |w_j|`` (ConFIG:
  where its documented least-squares limit allows, see ``_config_explicit``);
- MGDA: ``|w @ G|^2`` at most quadprog's float64 optimum ``+ 1e-12`` (max row norm 1);
- IMTL-G: equal projections ``u_i . d`` to ``1e-8`` of their size wherever the gradients are
  independent; ``sum w`` is 1 (or all weights 0) everywhere;
- CAGrad: the update's ``min_i g_i . d`` within ``1e-6`` of the optimum of the paper's problem
  (a float64 SLSQP transcription of its dual; documented slack for norm spans of 1e8 and
  more, ``CAGRAD_SLACK``) and inside its ball; exactly 0 at Pareto-stationary points, c >= 1;
- deterministic methods: permuting tasks permutes the update (to ``1e-8``) and the weights;
- ``K -> s K`` multiplies the weights by ``s^e`` to ``1e-9`` (``e = 0`` except FairGrad's
  ``-1/2``), except where documented otherwise (``NOT_HOMOGENEOUS``).
"""

import copy
import math

import numpy as np
import pytest
import quadprog
import torch

import mtlfast.methods as M
from mtlfast.ops import solvers_nonlinear as SN

from ..conftest import GRAM_METHODS

ids = [c.__name__ for c in GRAM_METHODS]
NON_CONFLICTING = [c for c in GRAM_METHODS if c.non_conflicting]
#: Methods whose solve is O(T^3) with large constants or O(T^4): checked up to T = 64.
SLOW = {"CAGrad", "UPGrad", "DualProj"}
SIZES = (1, 2, 3, 16, 64, 256)
FAMILIES = ("independent", "norms_1e4", "norms_1e8", "norms_1e16", "zero_in_hull",
            "zero_in_hull_mixed", "antiparallel", "duplicated", "rank_deficient", "wide")
#: Families whose unit gradients are linearly independent (for T <= P).
INDEPENDENT = ("independent", "norms_1e4", "norms_1e8", "norms_1e16")


def _row_scales(T, span, g):
    """Row norms log-uniform over ``[span^-1/2, span^1/2]``, both ends present."""
    if T == 1:
        return torch.ones(1, dtype=torch.float64)
    e = torch.rand(T, generator=g, dtype=torch.float64)
    e[0], e[1] = 0.0, 1.0
    return torch.pow(10.0, (e - 0.5) * math.log10(span))[torch.randperm(T, generator=g)]


def family(name, T, seed=0):
    """``G`` (T, P) float64 of the named family."""
    g = torch.Generator().manual_seed(seed + 1000 * T)
    P = T + 8

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if name == "independent":
        return randn(T, P)
    if name.startswith("norms_"):
        return randn(T, P) * _row_scales(T, float(name[6:]), g)[:, None]
    if name.startswith("zero_in_hull"):
        if T == 1:
            return torch.zeros(1, P, dtype=torch.float64)
        G = randn(T, P)
        lam = torch.rand(T, generator=g, dtype=torch.float64) + 0.1
        G[-1] = -(lam[:-1, None] * G[:-1]).sum(0) / lam[-1]  # sum_i lam_i g_i = 0, lam > 0
        if name.endswith("mixed"):  # positive row scales keep 0 in the hull
            G = G * _row_scales(T, 1e8, g)[:, None]
        return G
    if name == "antiparallel":
        G = randn(T, P)
        if T >= 2:
            G[1] = -0.7 * G[0]
        return G
    if name == "duplicated":
        base = randn(max(1, T // 3), P)
        return base[torch.randint(0, base.shape[0], (T,), generator=g)]
    if name == "rank_deficient":
        r = max(1, T // 2)
        return randn(T, r) @ randn(r, P)
    if name == "wide":
        return randn(T, max(1, T // 4))
    raise ValueError(name)


def _cases(max_T_slow=64):
    out = []
    for cls in GRAM_METHODS:
        for T in SIZES:
            if T > max_T_slow and cls.__name__ in SLOW:
                continue
            out.append(pytest.param(cls, T, id=f"{cls.__name__}-T{T}"))
    return out


def _rounding_scale(w, G):
    """``max_i |g_i| sum_j |w_j|``: a Gram solve rounds relative to the largest gradient, so
    this bounds the rounding of an update ``w @ G`` computed from the Gram."""
    return float(G.norm(dim=1).max()) * float(w.abs().sum())


def _weights(cls, G, seed=0):
    torch.manual_seed(seed)
    return cls().weights(G @ G.T)


# ------------------------------------------------------------------------------ all methods
@pytest.mark.parametrize("cls,T", _cases())
def test_finite_over_families(cls, T):
    for name in FAMILIES:
        G = family(name, T)
        w = _weights(cls, G)
        assert w.shape == (T,), name
        assert torch.isfinite(w).all(), (name, w)
        assert torch.isfinite(w @ G).all(), name


SCALE_EXPONENT = {"FairGrad": -0.5}  # alpha = 1: the root of K w = 1/w scales as s^-1/2
#: Documented as not scale-homogeneous (docs/methods.md): Nash-MTL clips |w @ G| to max_norm,
#: GradVac adds eps = 1e-8 to products of norms; FairGrad has no finite root when 0 is in the
#: hull of the gradients (its weights then grow with the iteration count instead). MoDo's step
#: size gamma is absolute (the paper's), SDMGrad adds eps = 1e-8 to the squared mean norm.
NOT_HOMOGENEOUS = {"NashMTL", "GradVac", "MoDo", "SDMGrad"}


def _scale_cases():
    for cls in GRAM_METHODS:
        for name in ("independent", "norms_1e8", "zero_in_hull", "rank_deficient"):
            if cls.__name__ in NOT_HOMOGENEOUS or (cls is M.FairGrad and name == "zero_in_hull"):
                continue
            yield pytest.param(cls, name, id=f"{cls.__name__}-{name}")


@pytest.mark.parametrize("cls,name", list(_scale_cases()))
def test_scale_behaviour(cls, name):
    """``w(s K) = s^e w(K)`` over 24 orders of magnitude (same random state for both calls)."""
    G = family(name, 6)
    K = G @ G.T
    method = cls()
    for s in (1e-12, 1e12):
        twin = copy.deepcopy(method)
        expected = method.weights(K) * s ** SCALE_EXPONENT.get(cls.__name__, 0.0)
        got = twin.weights(K * s)
        scale = float(expected.abs().max())
        assert float((got - expected).abs().max()) <= 1e-9 * scale + 1e-300, (s, got, expected)
        method = twin


@pytest.mark.parametrize("cls", [c for c in GRAM_METHODS if c.deterministic],
                         ids=[c.__name__ for c in GRAM_METHODS if c.deterministic])
@pytest.mark.parametrize("T", [3, 16])
def test_permutation_equivariance_over_families(cls, T):
    """Permuted tasks: the same update everywhere, and permuted weights where they are unique
    (independent gradients; with dependent ones several weights give the same update)."""
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(T))
    for name in FAMILIES:
        G = family(name, T)
        w = _weights(cls, G)
        wp = _weights(cls, G[perm])
        tol = 1e-8 * _rounding_scale(w, G) + 1e-300
        assert float((wp @ G[perm] - w @ G).norm()) <= tol, name
        if name == "independent":
            torch.testing.assert_close(wp, w[perm], rtol=1e-7, atol=1e-12 * float(w.abs().max()))


# ------------------------------------------------------------------- paper guarantees
def _config_explicit(G):
    """ConFIG on explicit G in float64: ``(sum_i g_i . v) v``, ``v = unit(pinv(U) 1)`` (SVD,
    singular values below 1e-8 of the largest dropped); 0 when ``U pinv(U) 1`` vanishes."""
    norms = G.norm(dim=1, keepdim=True)
    U = torch.where(norms > 0, G / norms.clamp_min(1e-300), 0.0)
    ones = torch.ones(G.shape[0], dtype=G.dtype)
    direction = torch.linalg.pinv(U, rtol=1e-8) @ ones
    if float((U @ direction).norm()) <= 1e-10 * float(ones.norm()):
        return torch.zeros(G.shape[1], dtype=G.dtype)
    v = direction / direction.norm()
    return (G @ v).sum() * v


@pytest.mark.parametrize("cls", NON_CONFLICTING, ids=[c.__name__ for c in NON_CONFLICTING])
@pytest.mark.parametrize("T", [1, 2, 3, 16, 64])
def test_non_conflicting_over_families(cls, T):
    """``(w @ G) . g_i >= -1e-8 |g_i| max_j |g_j| sum_j |w_j|``. ConFIG's documented limit:
    with linearly dependent unit gradients its direction is the paper's least-squares
    ``v = unit(pinv(U) 1)`` and the update ``(sum_i g_i . v) v`` conflicts with the tasks
    the explicit float64 formula conflicts with (those whose ``u_i . v`` has the sign opposite
    to ``sum_i g_i . v``), and with no other; where ``U pinv(U) 1 = 0`` the update is 0."""
    for name in FAMILIES:
        G = family(name, T)
        w = _weights(cls, G)
        d = w @ G
        margin = (G @ d) / G.norm(dim=1).clamp_min(1e-300)
        tol = 1e-8 * _rounding_scale(w, G)
        if cls is M.ConFIG:
            expected = _config_explicit(G)
            if float(expected.norm()) == 0.0:
                assert torch.equal(w, torch.zeros_like(w)), (name, w)
                continue
            expected_margin = (G @ expected) / G.norm(dim=1).clamp_min(1e-300)
            allowed = expected_margin < -1e-6 * float(expected_margin.abs().max())
            assert (margin[~allowed] >= -tol).all(), (name, margin, expected_margin)
        else:
            assert (margin >= -tol).all(), (name, margin)


def _qp_min_norm(K):
    T = K.shape[0]
    C = np.concatenate([np.ones((T, 1)), np.eye(T)], 1)
    b = np.concatenate([[1.0], np.zeros(T)])
    return torch.from_numpy(quadprog.solve_qp(K.numpy() + 1e-13 * np.eye(T), np.zeros(T),
                                              C, b, meq=1)[0])


@pytest.mark.parametrize("T", [2, 3, 16])
def test_mgda_min_norm_over_families(T):
    """MGDA's weights are on the simplex and ``|w @ G|^2`` is at most quadprog's optimum
    (float64, unit max norm) + 1e-12."""
    for name in FAMILIES:
        G = family(name, T)
        K = G @ G.T
        K = K / K.diagonal().max()
        w = M.MGDA().weights(K)
        assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-12, name
        ref = _qp_min_norm(K)
        assert float(w @ K @ w) <= float(ref @ K @ ref) + 1e-12, name


@pytest.mark.parametrize("T", [1, 2, 3, 16, 64, 256])
def test_imtlg_equal_projections_over_families(T):
    """IMTL-G: ``u_i . d`` equal to 1e-8 of their size for independent gradients, norms up to
    1e16 apart; elsewhere ``sum w = 1`` or all weights 0 (``g, -g``: 0)."""
    for name in FAMILIES:
        G = family(name, T)
        w = M.IMTLG().weights(G @ G.T)
        total = float(w.sum())
        assert abs(total - 1) < 1e-9 or torch.equal(w, torch.zeros_like(w)), (name, total)
        if name in INDEPENDENT:
            proj = G @ (w @ G) / G.norm(dim=1)
            assert float((proj - proj.mean()).abs().max()) <= 1e-8 * float(proj.abs().max()), \
                (name, proj)
    for s in (1e-8, 1.0, 1e8):  # g, -g: K^+ sqrt(diag K) = 0
        G = torch.cat([family("independent", 1), -family("independent", 1)]) * s
        assert torch.equal(M.IMTLG().weights(G @ G.T), torch.zeros(2, dtype=torch.float64))


def _cagrad_optimum(K, c):
    """The optimal value of CAGrad's problem ``max_d min_i g_i . d``, ``|d - g_0| <= c |g_0|``:
    by duality ``min_{w in simplex} g_w . g_0 + c |g_0| |g_w|``, by float64 SLSQP from several
    starts (the vertices' best and uniform included)."""
    import scipy.optimize as so

    T = K.shape[0]
    Kn = K.numpy()
    p = np.full(T, 1 / T)
    a = Kn @ p
    r = c * math.sqrt(max(p @ Kn @ p, 0.0))

    def f(x):
        return float(a @ x + r * math.sqrt(max(x @ Kn @ x, 0.0)))

    starts = [p, np.eye(T)[int(np.argmin([f(e) for e in np.eye(T)]))]]
    starts.append(np.random.default_rng(0).dirichlet(np.ones(T)))
    best = min(f(e) for e in np.eye(T))
    for x0 in starts:
        res = so.minimize(f, x0, bounds=[(0, 1)] * T, method="SLSQP",
                          constraints={"type": "eq", "fun": lambda x: x.sum() - 1},
                          options={"ftol": 1e-15, "maxiter": 1000})
        x = np.clip(res.x, 0, None)
        best = min(best, f(x / x.sum()))
    return best


#: CAGrad's documented accuracy (its docstring): the inner solve on K resolves a tiny g_w only
#: to the rounding of the largest gradients, so the slack grows with the span of the norms.
CAGRAD_SLACK = {"norms_1e8": 1e-5, "norms_1e16": 2e-3, "zero_in_hull_mixed": 1e-5}


@pytest.mark.parametrize("c", [0.4, 1.0, 1.5])
@pytest.mark.parametrize("T", [2, 3, 16])
def test_cagrad_solves_the_paper_problem_over_families(T, c):
    """CAGrad's update (rescale=0) lies in the ball ``|d - g_0| <= c |g_0|`` and reaches the
    optimal ``min_i g_i . d`` to 1e-6 (unit max norm; ``CAGRAD_SLACK`` for norms spanning 1e8
    and more). For ``c >= 1`` at Pareto-stationary families it is exactly 0."""
    for name in FAMILIES:
        G = family(name, T)
        G = G / G.norm(dim=1).max()
        K = G @ G.T
        w = M.CAGrad(c=c, rescale=0).weights(K)
        d = w @ G
        g0 = G.mean(0)
        opt = _cagrad_optimum(K, c)
        value = float((G @ d).min())
        if c >= 1 and name.startswith("zero_in_hull"):
            assert torch.equal(w, torch.zeros_like(w)), (name, w)
            assert abs(opt) <= 1e-6, (name, opt)
            continue
        assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-9) + 1e-12, name
        assert value >= opt - CAGRAD_SLACK.get(name, 1e-6), (name, value, opt)


# ---------------------------------------------------------------- the reported defects
def _stationary(T, P, span, g):
    G = torch.randn(T, P, generator=g, dtype=torch.float64)
    lam = torch.rand(T, generator=g, dtype=torch.float64) + 0.1
    G[-1] = -(lam[:-1, None] * G[:-1]).sum(0) / lam[-1]
    return G * _row_scales(T, span, g)[:, None]


@pytest.mark.parametrize("c", [1.0, 1.5, 4.0])
def test_cagrad_is_zero_at_pareto_stationary_points(c):
    """c >= 1 with 0 in the hull: ``min_w g_w . g_0 + c |g_0| |g_w| >= (c - 1) |g_0| |g_w| >= 0``
    is attained at ``g_w = 0`` and ``d = 0`` is optimal: the update is exactly 0, for T from 2
    to 64, norms spanning up to 1e8, global scales 1e-8..1e8, float64 and float32 Grams; next
    to them (0 just outside the hull) it is not 0."""
    g = torch.Generator().manual_seed(7)
    for T in (2, 3, 5, 16, 64):
        for P in (T, 2 * T + 3):
            for span in (1.0, 1e4, 1e8):
                for scale in (1e-8, 1.0, 1e8):
                    G = _stationary(T, P, span, g) * scale
                    for dtype in (torch.float64, torch.float32):
                        Gd = G.to(dtype)
                        w = M.CAGrad(c=c).weights(Gd @ Gd.T)
                        assert torch.equal(w, torch.zeros_like(w)), (T, P, span, scale, dtype)
                    # Every row gets 1e-3 of the largest norm along a new axis: 0 leaves the hull.
                    lift = torch.full((T, 1), 1e-3, dtype=G.dtype) * G.norm(dim=1).max()
                    shifted = torch.cat([G, lift], 1)
                    w = M.CAGrad(c=c).weights(shifted @ shifted.T)
                    assert (w @ shifted).norm() > 0, (T, P, span, scale)


def test_cagrad_float32_antiparallel_pair():
    for s in (1e-6, 1.0, 1e6):
        G = torch.tensor([[1.0, 2.0, -0.5], [-0.3, -0.6, 0.15]]) * s
        assert torch.equal(M.CAGrad(c=1.5).weights(G @ G.T), torch.zeros(2))


@pytest.mark.parametrize("weights", [SN.config_weights, SN.config_weights_reference],
                         ids=["dispatch", "reference"])
def test_config_opposite_and_near_opposite(weights):
    """``g, -k g``: ``pinv(U) 1 = 0``, no update (exactly 0 weights). Near-opposite pairs
    ``g, -k (g + a e)`` and either with extra tasks: no task's cosine with the update below
    ``-1e-6`` (the direction is resolved to ``eps / a^2`` where the Gram keeps it)."""
    g = torch.Generator().manual_seed(3)
    for P in (3, 10, 1000):
        for s in (1e-8, 1.0, 1e8):
            for k in (1.0, 0.7, 1e-3, 1e3):
                for a in (0.0, 1e-12, 1e-9, 1e-6, 1e-3):
                    for extra in (0, 1, 2):
                        base = torch.randn(1, P, generator=g, dtype=torch.float64)
                        pert = torch.randn(1, P, generator=g, dtype=torch.float64)
                        rows = [base, -k * (base + a * pert)]
                        if extra:
                            rows.append(torch.randn(extra, P, generator=g, dtype=torch.float64))
                        G = torch.cat(rows) * s
                        if G.shape[0] > P:
                            continue
                        w = weights(G @ G.T, None)
                        if a == 0 and extra == 0:
                            assert torch.equal(w, torch.zeros(2, dtype=torch.float64)), (P, s, k)
                            continue
                        d = w @ G
                        cos = G @ d / (G.norm(dim=1) * d.norm().clamp_min(1e-300))
                        assert (cos >= -1e-6).all(), (P, s, k, a, extra, cos)


@pytest.mark.parametrize("k", [1.0, 0.9, 0.7])
def test_cagrad_below_one_where_the_ball_meets_the_cone(k):
    """``g, -k g, h``: the cone ``{G d >= 0}`` is ``{u . d = 0, h . d >= 0}`` (``u = unit(g)``);
    where it meets the ball ``|d - g_0| <= c |g_0|`` (``|g_0 . u| <= c |g_0|``), the inner
    optimum is ``g_w = 0``, every such ``d`` is optimal (value 0), and the update is the cone's
    point nearest ``g_0``, ``d = g_0 - (g_0 . u) u``, at every scale."""
    g = torch.Generator().manual_seed(11)
    checked = 0
    for cos in (0.0, 0.1, 0.2, 0.39):
        u = torch.randn(6, generator=g, dtype=torch.float64)
        u = u / u.norm()
        v = torch.randn(6, generator=g, dtype=torch.float64)
        v = v - (v @ u) * u
        h = cos * u + math.sqrt(1 - cos * cos) * v / v.norm()
        g0 = (torch.stack([u, -k * u, 2 * h])).mean(0)
        if abs(float(g0 @ u)) > 0.4 * float(g0.norm()):
            continue
        checked += 1
        for s in (1e-8, 1.0, 1e8):
            G = torch.stack([u, -k * u, 2 * h]) * s
            d = M.CAGrad(c=0.4, rescale=0).weights(G @ G.T) @ G
            expected = (g0 - (g0 @ u) * u) * s
            assert float((d - expected).norm()) <= 1e-9 * s, (cos, s, d, expected)
    assert checked >= 2
