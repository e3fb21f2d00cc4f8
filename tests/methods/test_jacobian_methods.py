"""GradDrop, MoCo and DB-MTL against plain float64 re-implementations of their papers' updates
(written loop by loop here, independently of the library code), and GradDrop against
torchjd 0.18 (torchjd has neither MoCo nor DB-MTL)."""

import math

import pytest
import torch

import mtlfast.methods as M
from tests.conftest import rel_err

# torchjd is a test dependency, absent on the bare GPU machine: skip there, not fail to collect.
TorchJDGradDrop = pytest.importorskip("torchjd.aggregation").GradDrop


def _matrix(T, P, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, P, generator=g, dtype=dtype)


def _losses(T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, generator=g, dtype=torch.float64) + 0.5


# ----------------------------------------------------------------------------- GradDrop


def graddrop_paper(G, U, leak):
    """Algorithm 1 of Chen et al. 2020, coordinate by coordinate."""
    T, P = G.shape
    out = torch.zeros(P, dtype=torch.float64)
    for j in range(P):
        col = G[:, j]
        total_abs = sum(abs(float(x)) for x in col)
        purity = 0.5 * (1 + float(col.sum()) / total_abs) if total_abs > 0 else 0.5
        for i in range(T):
            g = float(col[i])
            keep = (purity > U[j] and g > 0) or (purity < U[j] and g < 0)
            out[j] += (leak[i] + (1 - leak[i]) * keep) * g
    return out


@pytest.mark.parametrize("leak", [0.0, 0.3, [0.0, 1.0, 0.25, 0.5]])
def test_graddrop_matches_paper(leak):
    T, P, seed = 4, 57, 11
    G = _matrix(T, P, 0)
    G[:, 5] = 0  # an all-zero coordinate: purity 1/2
    G[:, 6] = G[:, 6].abs()  # pure positive: always kept
    method = M.GradDrop(leak=leak, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    leaks = [leak] * T if isinstance(leak, float) else leak
    for _ in range(3):  # successive steps draw successive U from the method's generator
        U = torch.rand(P, generator=gen, dtype=torch.float64).tolist()
        torch.testing.assert_close(method(G), graddrop_paper(G, U, leaks), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("leak", [None, [0.0, 0.5, 1.0]])
def test_graddrop_matches_torchjd(dtype, leak):
    """Same U: torchjd draws torch.rand(P) from the global generator; seeding it with our seed
    gives the stream our owned generator draws (the only intentional difference is where the
    stream lives)."""
    T, P, seed = 3, 301, 5
    G = _matrix(T, P, 1, dtype)
    ours = M.GradDrop(leak=0.0 if leak is None else leak, seed=seed)(G)
    torch.manual_seed(seed)
    theirs = TorchJDGradDrop(leak=None if leak is None else torch.tensor(leak, dtype=dtype))(G)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


def test_graddrop_purity_fn_matches_paper_and_torchjd():
    T, P, seed = 3, 200, 8
    G = _matrix(T, P, 3)
    square = torch.square
    ours = M.GradDrop(purity_fn=square, seed=seed)(G)
    U = torch.rand(P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    purity = 0.5 * (1 + G.sum(0) / G.abs().sum(0))
    expected = (purity**2 > U) * G.clamp_min(0).sum(0) + (purity**2 < U) * G.clamp_max(0).sum(0)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    torch.manual_seed(seed)
    torch.testing.assert_close(ours, TorchJDGradDrop(f=square)(G), rtol=1e-12, atol=1e-12)
    assert not torch.equal(ours, M.GradDrop(seed=seed)(G))


def test_graddrop_low_precision_close_to_float32():
    G = _matrix(4, 1000, 2, torch.float32)
    ref = M.GradDrop(seed=1)(G)
    for dtype in (torch.float16, torch.bfloat16):
        out = M.GradDrop(seed=1)(G.to(dtype))
        assert out.dtype == dtype
        # purity and U agree in float32; only coordinates whose purity sits within rounding
        # of U may flip, so compare on the bulk
        close = (out.float() - ref).abs() <= 0.02 * ref.abs() + 0.02
        assert close.float().mean() > 0.97


def test_graddrop_expectation():
    """E[d_j] over U: with no leak, the positive part is kept with probability purity."""
    G = _matrix(3, 8, 4)
    purity = 0.5 * (1 + G.sum(0) / G.abs().sum(0))
    expected = purity * G.clamp_min(0).sum(0) + (1 - purity) * G.clamp_max(0).sum(0)
    method = M.GradDrop(seed=0)
    mean = torch.stack([method(G) for _ in range(4000)]).mean(0)
    assert rel_err(mean, expected) < 0.05


# ----------------------------------------------------------------------------- MoCo


def project_simplex_bisection(v):
    """Projection onto the simplex by bisection on theta in sum max(v - theta, 0) = 1."""
    lo, hi = float(v.min()) - 1, float(v.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((v - mid).clamp_min(0).sum()) > 1:
            lo = mid
        else:
            hi = mid
    return (v - (lo + hi) / 2).clamp_min(0)


def test_project_simplex():
    from mtlfast.methods.moco import project_simplex

    for seed in range(20):
        v = torch.randn(7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
        torch.testing.assert_close(project_simplex(v), project_simplex_bisection(v),
                                   rtol=0, atol=1e-12)
    batch = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(project_simplex(batch),
                               torch.stack([project_simplex_bisection(r) for r in batch]))
    huge = torch.tensor([3e21, -1e23, 1e22], dtype=torch.float64)
    assert torch.equal(project_simplex(huge), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def moco_paper(G_seq, L_seq, beta, beta_sigma, gamma, gamma_sigma, rho, softmax, normalize):
    """Algorithm 1 of Fernando et al. 2023 (simplex projection), or the authors' shared code
    (softmax + gradients rescaled to norm L_i) when softmax/normalize are set."""
    T, P = G_seq[0].shape
    y = [torch.zeros(P, dtype=torch.float64) for _ in range(T)]
    lam = torch.full((T,), 1.0 / T, dtype=torch.float64)
    out = []
    for t, (G, L) in enumerate(zip(G_seq, L_seq, strict=True), start=1):
        beta_t, gamma_t = beta / t**beta_sigma, gamma / t**gamma_sigma
        for i in range(T):
            g = G[i] / (G[i].norm() + 1e-8) * L[i] if normalize else G[i]
            y[i] = y[i] - beta_t * (y[i] - g)
        Y = torch.stack(y)
        step = lam - gamma_t * ((Y @ Y.T + rho * torch.eye(T, dtype=torch.float64)) @ lam)
        lam = torch.softmax(step, 0) if softmax else project_simplex_bisection(step)
        out.append(sum(lam[i] * y[i] for i in range(T)))
    return out


@pytest.mark.parametrize(
    "kw",
    [{}, {"rho": 0.3, "beta": 0.8, "gamma": 0.5, "gamma_sigma": 0.0},
     {"lambda_update": "softmax", "normalize_grads": True}],
)
def test_moco_matches_paper(kw):
    T, P = 4, 23
    G_seq = [_matrix(T, P, s) * (s + 1) for s in range(6)]
    L_seq = [_losses(T, s) for s in range(6)]
    method = M.MoCo(**kw)
    hp = dict(beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0)
    hp.update({k: v for k, v in kw.items() if k in hp})
    ref = moco_paper(G_seq, L_seq, **hp, softmax=kw.get("lambda_update") == "softmax",
                     normalize=kw.get("normalize_grads", False))
    for G, L, expected in zip(G_seq, L_seq, ref, strict=True):
        torch.testing.assert_close(method(G, L), expected, rtol=1e-10, atol=1e-12)
    assert math.isclose(float(method.task_weights.sum()), 1.0, rel_tol=1e-12)


def test_moco_float32_input_keeps_float32_state():
    G = _matrix(3, 50, 0, torch.float16)
    method = M.MoCo()
    out = method(G)
    assert out.dtype == torch.float16 and method.tracked.dtype == torch.float32
    ref = M.MoCo()(G.double())
    assert rel_err(out, ref) < 2e-3


# ----------------------------------------------------------------------------- DB-MTL


def dbmtl_paper(G_seq, L_seq, beta, beta_sigma, eps=1e-8):
    """Lin et al. 2023: EMA of grad log(L + eps), then scale every task to the largest norm."""
    T, P = G_seq[0].shape
    m = [torch.zeros(P, dtype=torch.float64) for _ in range(T)]
    out = []
    for t, (G, L) in enumerate(zip(G_seq, L_seq, strict=True), start=1):
        beta_t = beta / t**beta_sigma
        for i in range(T):
            h = G[i] / (L[i] + eps)  # chain rule of log
            m[i] = beta_t * m[i] + (1 - beta_t) * h
        norms = [float(x.norm()) for x in m]
        out.append(sum(max(norms) / (norms[i] + 1e-8) * m[i] for i in range(T)))
    return out


@pytest.mark.parametrize("beta,beta_sigma", [(0.9, 0.0), (0.5, 0.5)])
def test_dbmtl_matches_paper(beta, beta_sigma):
    T, P = 5, 31
    G_seq = [_matrix(T, P, s) * torch.logspace(-2, 2, T, dtype=torch.float64)[:, None]
             for s in range(5)]
    L_seq = [_losses(T, s) * 10 ** (s - 2) for s in range(5)]
    method = M.DBMTL(beta=beta, beta_sigma=beta_sigma)
    for G, L, expected in zip(G_seq, L_seq, dbmtl_paper(G_seq, L_seq, beta, beta_sigma),
                              strict=True):
        torch.testing.assert_close(method(G, L), expected, rtol=1e-10, atol=1e-12)


def test_dbmtl_balances_magnitudes():
    """After the rescaling every task contributes a component of the same norm."""
    G = _matrix(3, 40, 9) * torch.tensor([1e-3, 1.0, 1e3], dtype=torch.float64)[:, None]
    method = M.DBMTL(beta=0.0)
    method(G, torch.ones(3, dtype=torch.float64))
    scaled = method.ema * (method.ema.norm(dim=1).max() / method.ema.norm(dim=1))[:, None]
    norms = scaled.norm(dim=1)
    torch.testing.assert_close(norms, norms.max().expand(3), rtol=1e-7, atol=0)
