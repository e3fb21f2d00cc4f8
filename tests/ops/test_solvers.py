"""The solvers against independent float64 references (quadprog, scipy nnls, the KKT
conditions, the explicit PCGrad loop on G), and the C++ kernels against the torch reference."""

import numpy as np
import pytest
import quadprog
import scipy.linalg
import scipy.optimize
import torch

from mtlfast.ops import solvers

has_cpp = hasattr(torch.ops.mtlfast, "nnqp")
needs_cpp = pytest.mark.skipif(not has_cpp, reason="C++ extension not built")


def _grams(T, P=None, rank=None, scales=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = P or T + 3
    if rank is None:
        G = torch.randn(T, P, generator=g, dtype=torch.float64)
    else:
        G = torch.randn(T, rank, generator=g, dtype=torch.float64) @ torch.randn(
            rank, P, generator=g, dtype=torch.float64)
    if scales is not None:
        G = G * torch.logspace(-scales, scales, T, dtype=torch.float64)[:, None]
    return G @ G.T


def _kkt_violation(A, b, x, simplex):
    """Largest violation of the KKT conditions, relative to the problem's scale."""
    grad = A @ x + b
    lam = (x * grad).sum() if simplex else torch.zeros(())
    mu = grad - lam  # must be >= 0, and 0 where x > 0
    scale = 1 + A.abs().max() + b.abs().max()
    primal = max(float((-x).clamp_min(0).max()), abs(float(x.sum()) - 1) if simplex else 0.0)
    dual = float((-mu).clamp_min(0).max())
    comp = float((x * mu).abs().max())
    return max(primal, dual, comp) / float(scale)


def _quadprog(A, b, simplex):
    T = A.shape[0]
    H = A + 1e-12 * np.eye(T)  # quadprog needs a strictly positive definite matrix
    if simplex:
        C = np.concatenate([np.ones((T, 1)), np.eye(T)], 1)
        return quadprog.solve_qp(H, -b, C, np.r_[1.0, np.zeros(T)], meq=1)[0]
    return quadprog.solve_qp(H, -b, np.eye(T), np.zeros(T))[0]


@pytest.mark.parametrize("T", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("simplex", [False, True])
def test_nnqp_matches_quadprog(T, simplex):
    for seed in range(3):
        K, _ = solvers.normalize_gram(_grams(T, seed=seed))
        u = torch.rand(T, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        b = -u if simplex else K @ u - 0.5 * u  # a linear term with some active bounds
        x = solvers.nnqp_reference(K, b[None])[0] if not simplex else \
            solvers.nnqp_reference(K, b[None], simplex=True)[0]
        ref = _quadprog(K.numpy(), b.numpy(), simplex)
        np.testing.assert_allclose(x.numpy(), ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("T", [2, 5, 12])
def test_nnqp_matches_scipy_nnls(T):
    """Non-negative case as NNLS: A = R^T R, min 1/2 |R x + R^-T b|^2 over x >= 0."""
    for seed in range(3):
        K, _ = solvers.normalize_gram(_grams(T, seed=seed))
        b = K @ torch.randn(T, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        R = scipy.linalg.cholesky(K.numpy())
        target = -scipy.linalg.solve_triangular(R, b.numpy(), trans="T")
        ref = scipy.optimize.nnls(R, target)[0]
        x = solvers.nnqp_reference(K, b[None])[0]
        np.testing.assert_allclose(x.numpy(), ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("simplex", [False, True])
@pytest.mark.parametrize(
    "case", ["rank1", "rank_deficient", "ill_scaled", "identical", "zero_row", "conflicting"])
@pytest.mark.parametrize("T", [3, 17, 64])
def test_nnqp_kkt_on_hard_grams(T, simplex, case):
    """Exact to rounding: the KKT conditions hold to ~1e-12 on degenerate Grams, T up to 64."""
    raw = {
        "rank1": lambda: _grams(T, rank=1),
        "rank_deficient": lambda: _grams(T, rank=max(1, T // 3)),
        "ill_scaled": lambda: _grams(T, scales=6),  # entries from 1e-12 to 1e12
        "identical": lambda: torch.ones(T, T, dtype=torch.float64) * 3.0,
        "zero_row": lambda: torch.block_diag(_grams(T - 1), torch.zeros(1, 1, dtype=torch.float64)),
        "conflicting": lambda: _grams(T) - 0.9 * _grams(T, seed=1).diagonal().diag().mean(),
    }[case]()
    K, _ = solvers.normalize_gram(raw)
    if case == "conflicting":  # keep it PSD: shift the spectrum to >= 0
        K = K - torch.linalg.eigvalsh(K).min().clamp(max=0) * torch.eye(T, dtype=K.dtype)
        K, _ = solvers.normalize_gram(K)
    p = torch.full((T,), 1.0 / T, dtype=torch.float64)
    b = torch.zeros(1, T, dtype=torch.float64) if simplex else (K @ p)[None]
    x = solvers.nnqp_reference(K, b, simplex=simplex)[0]
    assert _kkt_violation(K, b[0], x, simplex) < 1e-11
    if has_cpp:
        torch.testing.assert_close(solvers.nnqp(K, b, simplex=simplex)[0], x,
                                   rtol=1e-9, atol=1e-11)


def test_mgda_reaches_true_optimum_at_t_32():
    """The min-norm value equals quadprog's to 1e-9 relative (Frank-Wolfe stops ~0.5% above)."""
    for seed in range(3):
        K, _ = solvers.normalize_gram(_grams(32, P=20, seed=seed))
        x = solvers.nnqp_reference(K, torch.zeros(1, 32, dtype=torch.float64), simplex=True)[0]
        ref = torch.from_numpy(_quadprog(K.numpy(), np.zeros(32), True))
        assert abs(float(x @ K @ x) - float(ref @ K @ ref)) <= 1e-9 * float(ref @ K @ ref)


def test_nnqp_batched_matches_one_by_one():
    A = torch.stack([solvers.normalize_gram(_grams(6, seed=s))[0] for s in range(4)])
    A = A.view(2, 2, 6, 6)
    b = torch.randn(2, 2, 3, 6, dtype=torch.float64) @ A
    for simplex in (False, True):
        x = solvers.nnqp_reference(A, b, simplex=simplex)
        for i in range(2):
            for j in range(2):
                torch.testing.assert_close(
                    x[i, j], solvers.nnqp_reference(A[i, j], b[i, j], simplex=simplex))


@needs_cpp
@pytest.mark.parametrize("simplex", [False, True])
@pytest.mark.parametrize("T", [1, 2, 5, 13, 32])
def test_nnqp_cpp_matches_reference(T, simplex):
    A = torch.stack([solvers.normalize_gram(_grams(T, rank=r, seed=s))[0]
                     for s, r in enumerate([None, max(1, T // 2), None])])
    b = torch.randn(3, 4, T, dtype=torch.float64) @ A
    torch.testing.assert_close(torch.ops.mtlfast.nnqp(A, b, simplex, solvers.nnqp_steps(T),
                                                      solvers.DUAL_TOL),
                               solvers.nnqp_reference(A, b, simplex), rtol=1e-9, atol=1e-12)


@needs_cpp
@pytest.mark.parametrize("T", [64, 128])
def test_nnqp_large_t_matches_reference_and_kkt(T):
    """UPGrad's problems at large T (supports of ~T/2): the kernel against the torch reference
    on a few right-hand sides, and the KKT conditions on all T of them."""
    K, _ = solvers.normalize_gram(_grams(T, P=1000, seed=T))
    p = torch.full((T,), 1.0 / T, dtype=torch.float64)
    b = p[:, None] * K  # b_i = p_i K e_i: the dual-cone projection of each task's gradient
    x = solvers.nnqp(K, b)
    rows = [0, T // 3, T - 1]
    ref = solvers.nnqp_reference(K, b[rows])
    torch.testing.assert_close(x[rows], ref, rtol=1e-9, atol=1e-12)
    for i in range(T):
        assert _kkt_violation(K, b[i], x[i], False) < 1e-10


def test_nnqp_runs_on_meta():
    A = torch.empty(2, 5, 5, dtype=torch.float64, device="meta")
    b = torch.empty(2, 5, 5, dtype=torch.float64, device="meta")
    for simplex in (False, True):
        assert solvers.nnqp_reference(A, b, simplex).shape == (2, 5, 5)


def test_nnqp_rejects_bad_input():
    with pytest.raises(ValueError, match="A must have shape"):
        solvers.nnqp(torch.zeros(3, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="b must have shape"):
        solvers.nnqp(torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64"):
        solvers.nnqp(torch.eye(3), torch.zeros(1, 3))


def _pcgrad_loop(G, orders):
    """Algorithm 1 of the paper on explicit full-length gradients."""
    out = []
    for i in range(G.shape[0]):
        g = G[i].clone()
        for j in orders[i].tolist():
            if j == i:
                continue
            p = g @ G[j]
            if p < 0 and G[j] @ G[j] > 0:
                g = g - p / (G[j] @ G[j]) * G[j]
        out.append(g)
    return torch.stack(out)


@pytest.mark.parametrize("T", [1, 2, 4, 9])
def test_pcgrad_matches_explicit_loop(T):
    gen = torch.Generator().manual_seed(T)
    G = torch.randn(T, 50, generator=gen, dtype=torch.float64)
    G[-1] = -G[0] * 0.5  # a sure conflict
    orders = torch.rand(T, T, generator=gen).argsort(-1)
    C = solvers.pcgrad_weights_reference(G @ G.T, orders)
    torch.testing.assert_close(C @ G, _pcgrad_loop(G, orders), rtol=1e-10, atol=1e-10)
    if has_cpp:
        torch.testing.assert_close(solvers.pcgrad_weights(G @ G.T, orders), C,
                                   rtol=1e-12, atol=1e-12)


def test_pcgrad_zero_row_and_batch():
    G = torch.randn(2, 5, 30, dtype=torch.float64)
    G[0, 2] = 0
    K = G @ G.transpose(-1, -2)
    orders = torch.rand(2, 5, 5).argsort(-1)
    C = solvers.pcgrad_weights_reference(K, orders)
    assert torch.isfinite(C).all()
    for i in range(2):
        torch.testing.assert_close(C[i] @ G[i], _pcgrad_loop(G[i], orders[i]))
    if has_cpp:
        torch.testing.assert_close(solvers.pcgrad_weights(K, orders), C, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", [2, 3, 8, 20])
def test_cagrad_weights_cpp_matches_reference(T):
    if not hasattr(torch.ops.mtlfast, "cagrad"):
        pytest.skip("C++ extension not built")
    A = torch.stack([solvers.normalize_gram(_grams(T, rank=r, scales=sc, seed=s))[0]
                     for s, (r, sc) in enumerate([(None, None), (max(1, T // 2), None),
                                                  (None, 3)])])
    p = torch.full((3, T), 1.0 / T, dtype=torch.float64)
    for c in (0.0, 0.4, 2.0):
        torch.testing.assert_close(solvers.cagrad_weights(A, p, c),
                                   solvers.cagrad_weights_reference(A, p, c),
                                   rtol=1e-8, atol=1e-10)
