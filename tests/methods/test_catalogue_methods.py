"""ExcessMTL, MoDo, SDMGrad and RGW against float64 transcriptions of their update rules.

The references below are written from the papers and LibMTL's code (``LibMTL/weighting/
ExcessMTL.py``, ``MoDo.py``, ``SDMGrad.py``; RGW from the commit that added it, b65bf41), in
numpy / plain Python, loop by loop as there, sharing nothing with ``mtlfast.methods``. MoDo and
SDMGrad are transcribed as LibMTL's, on three separate gradient matrices per step (the
mini-batches xi1, xi2, zeta): ``batches=3`` is checked against them with three different
matrices per step, the default single-batch form with all three equal to the step's G (and
``batches=3`` fed three equal blocks follows the single-batch steps). Each method runs several
steps (state evolution included) at T = 2, 3, 8, 17, gradient scales 1e-3..1e3 with unequal
task norms, rank-deficient Grams and T > P. ``batches=3`` also runs end to end through
``mtlfast.backward`` on a tiny model against ``lambda @ G_zeta`` computed by hand.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import mtlfast
import mtlfast.methods as M
from mtlfast.methods.rgw import counter_normals

TS = (2, 3, 8, 17)
SCALES = (1e-3, 1.0, 1e3)
KINDS = ("full", "rank_deficient", "wide")
STEPS = 6


def _sequence(T, kind, scale, seed, steps=STEPS, draws=1):
    """``steps`` float64 (T, P) matrices: unequal task norms that drift from step to step
    (so that every method's state moves), full rank, rank T // 2, or T > P. ``draws = 3``:
    per step a tuple of three different matrices (three mini-batches: the step's matrix plus
    independent noise of half its size in the same subspace, so the norms vary by batch)."""
    g = torch.Generator().manual_seed(seed + 100 * T)
    P = {"full": T + 9, "rank_deficient": T + 9, "wide": max(1, T // 3)}[kind]
    norms = torch.rand(T, generator=g, dtype=torch.float64) * 3 + 0.2
    drift = torch.rand(T, generator=g, dtype=torch.float64) * 0.6 + 0.7
    basis = torch.randn(max(1, T // 2), P, generator=g, dtype=torch.float64)

    def draw():
        if kind == "rank_deficient":
            return torch.randn(T, basis.shape[0], generator=g, dtype=torch.float64) @ basis
        return torch.randn(T, P, generator=g, dtype=torch.float64)

    out = []
    for k in range(steps):
        G = draw()
        factor = (norms * drift**k)[:, None] * scale / G.norm(dim=1, keepdim=True).clamp_min(
            1e-300)
        step = [G] if draws == 1 else [G + 0.5 * draw() for _ in range(draws)]
        out.append(step[0] * factor if draws == 1 else tuple(B * factor for B in step))
    return out


def _same(Gs):
    """The single-batch form: each step's G as all three of LibMTL's mini-batches."""
    return [(G, G, G) for G in Gs]


def _stacked_gram(Gs3):
    """The ``(3T, 3T)`` Gram of the three mini-batches' losses stacked batch-major."""
    G = torch.cat(Gs3)
    return G @ G.T


def _cases():
    for T in TS:
        for kind in KINDS:
            for scale in SCALES:
                yield pytest.param(T, kind, scale, id=f"T{T}-{kind}-s{scale:g}")


# ------------------------------------------------------------------------- transcriptions
def _libmtl_modo_projection(y):
    """LibMTL's ``MoDo._projection2simplex``, loop for loop."""
    m = len(y)
    s = np.sort(y)[::-1]
    tmpsum = 0.0
    tmax_f = (np.sum(y) - 1.0) / m
    for i in range(m - 1):
        tmpsum += s[i]
        tmax = (tmpsum - 1) / (i + 1.0)
        if tmax > s[i + 1]:
            tmax_f = tmax
            break
    return np.maximum(y - tmax_f, 0.0)


def modo_reference(steps, gamma=1e-3, rho=0.1):
    """Per step ``(G1, G2, G3)`` (LibMTL's ``grads[0..2]``, three mini-batches):
    ``lambda <- Proj(lambda - gamma (G1 (G2^T lambda) + rho lambda))``; returns the weights
    (lambda) and the updates ``lambda @ G3``."""
    T = steps[0][0].shape[0]
    lam = np.full(T, 1.0 / T)
    out = []
    for G1, G2, G3 in steps:
        G1, G2, G3 = G1.numpy(), G2.numpy(), G3.numpy()
        lam = _libmtl_modo_projection(lam - gamma * (G1 @ (G2.T @ lam) + rho * lam))
        out.append((lam.copy(), lam @ G3))
    return out


def _libmtl_sdmgrad_projection(v, s=1.0):
    """LibMTL's ``SDMGrad.euclidean_proj_simplex`` (numpy, float64)."""
    v = v.astype(np.float64)
    n = v.shape[0]
    if v.sum() == s and np.all(v >= 0):
        return v
    u = np.sort(v)[::-1]
    cssv = np.cumsum(u)
    rho = np.nonzero(u * np.arange(1, n + 1) > (cssv - s))[0][-1]
    theta = float(cssv[rho] - s) / (rho + 1)
    return (v - theta).clip(min=0)


def sdmgrad_step_reference(w, Gs3, lamda=0.3, niter=20, lr=5.0, momentum=0.5):
    """One step of LibMTL's SDMGrad on ``Gs3 = (xi1, xi2, zeta)`` (LibMTL unpacks its grads
    as ``zeta, xi1, xi2``) from the kept ``w``: ``GG = xi1 xi2^T`` scaled by its clamped
    diagonal, ``niter`` steps of ``torch.optim.SGD(lr, momentum)`` (fresh each step) on ``w``
    each followed by the projection; returns the new ``w``, the weights of ``d`` (on ``zeta``)
    and ``d = (w @ zeta + lamda mean(zeta)) / (1 + lamda)``."""
    xi1, xi2, zeta = (G.numpy() for G in Gs3)
    T = zeta.shape[0]
    w = np.array(w, dtype=np.float64)
    GG = xi1 @ xi2.T
    diag = np.diag(GG).copy()
    diag[diag < 0] = 0
    scale = np.mean(np.sqrt(diag))
    GG = GG / (scale**2 + 1e-8)
    Gg = np.mean(GG, axis=1)
    buf = None
    for _ in range(niter):
        grad = GG @ w + lamda * Gg
        buf = grad.copy() if buf is None else momentum * buf + grad
        w = _libmtl_sdmgrad_projection(w - lr * buf)
    d = (w @ zeta + lamda * zeta.mean(0)) / (1 + lamda)
    return w, (w + lamda / T) / (1 + lamda), d


def sdmgrad_reference(steps, **kw):
    """The steps of :func:`sdmgrad_step_reference` from ``w = 1/T``, ``w`` kept across steps."""
    T = steps[0][0].shape[0]
    w = np.full(T, 1.0 / T)
    out = []
    for Gs3 in steps:
        w, weights, d = sdmgrad_step_reference(w, Gs3, **kw)
        out.append((weights, d))
    return out


def excess_reference(Gs, robust_step_size=1e-2, eps=1e-7, baseline_steps=1):
    """LibMTL's ExcessMTL: AdaGrad sums, ``w_i = g_i (1/h_i) . g_i``, the first step's ``w``
    kept as ``initial_w``, then ``alpha <- alpha exp(eta w / initial_w)``, renormalized to sum
    T; the update is ``alpha @ G``. ``baseline_steps > 1``: ``initial_w`` is the mean of the
    first ``baseline_steps`` steps' ``w``, ``alpha = 1`` during them. Returns (alpha, update)
    per step."""
    T = Gs[0].shape[0]
    alpha = np.ones(T)
    grad_sum = None
    seen = []
    out = []
    for G in Gs:
        G = G.numpy()
        if grad_sum is None:
            grad_sum = np.zeros_like(G)
        w = np.zeros(T)
        for i in range(T):
            grad_sum[i] += G[i] ** 2
            h = np.sqrt(grad_sum[i] + eps)
            w[i] = (G[i] * (1 / h)) @ G[i]
        if len(seen) < baseline_steps:
            seen.append(w)
        else:
            initial = np.mean(seen, axis=0)
            alpha = alpha * np.exp(w / initial * robust_step_size)
            alpha = alpha / alpha.sum() * T
        out.append((alpha.copy(), alpha @ G))
    return out


_M32 = 0xFFFFFFFF


def _mix(x):
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def rgw_normals_reference(seed, step, n):
    """The documented counter stream in Python integers (the spec of ``counter_normals``)."""
    key = 0x9E3779B9
    for part in (seed & _M32, (seed >> 32) & _M32, step & _M32, (step >> 32) & _M32):
        key = _mix(key ^ part)
    out = []
    for i in range(n):
        w = [_mix(_mix(((4 * i + j) & _M32) ^ key) ^ key) for j in range(4)]
        u1 = (((w[0] << 21) | (w[1] >> 11)) + 1) / 2**53
        u2 = ((w[2] << 21) | (w[3] >> 11)) / 2**53
        out.append(math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2))
    return np.array(out)


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _close(got, expected, rtol, atol_rel, what):
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    atol = atol_rel * max(float(np.abs(expected).max()), 1e-300)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, err_msg=what)


# ---------------------------------------------------------------------- against the rules
@pytest.mark.parametrize("T,kind,scale", list(_cases()))
def test_modo_matches_transcription(T, kind, scale):
    Gs = _sequence(T, kind, scale, seed=1)
    method = M.MoDo()
    for k, (G, (lam, d)) in enumerate(zip(Gs, modo_reference(_same(Gs)), strict=True)):
        w = method.weights(G @ G.T)
        _close(w, lam, 1e-9, 1e-12, f"weights, step {k}")
        _close(w @ G, d, 1e-9, 1e-12, f"update, step {k}")
        _close(method.lambd, lam, 1e-9, 1e-12, f"state, step {k}")
        assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-12


@pytest.mark.parametrize("gamma,rho", [(1e-2, 0.0), (0.5, 1.0), (1e-5, 10.0)])
def test_modo_hyper_parameters_match_transcription(gamma, rho):
    Gs = _sequence(5, "full", 1.0, seed=2)
    method = M.MoDo(gamma=gamma, rho=rho)
    for G, (lam, _) in zip(Gs, modo_reference(_same(Gs), gamma, rho), strict=True):
        _close(method.weights(G @ G.T), lam, 1e-9, 1e-12, (gamma, rho))


@pytest.mark.parametrize("T,kind,scale", list(_cases()))
def test_sdmgrad_matches_transcription(T, kind, scale):
    """Step by step from the method's own kept ``w``: at LibMTL's ``lr = 5`` the inner loop is
    not a contraction (documented), so two float64 runs of the whole sequence drift apart by up
    to 1e-5 within a few steps from rounding alone; each step is compared from the same state
    instead (to 1e-9), and the state it leaves is the next step's start."""
    method = M.SDMGrad()
    for k, G in enumerate(_sequence(T, kind, scale, seed=3)):
        before = np.full(T, 1.0 / T) if method.inner_weights is None else \
            method.inner_weights.numpy().copy()
        w_state, w_ref, d = sdmgrad_step_reference(before, (G, G, G))
        w = method.weights(G @ G.T)
        _close(w, w_ref, 1e-9, 1e-9, f"weights, step {k}")
        _close(w @ G, d, 1e-9, 1e-9, f"update, step {k}")
        _close(method.inner_weights, w_state, 1e-9, 1e-9, f"state, step {k}")
        floor = 0.3 / T / 1.3
        assert (w >= floor * (1 - 1e-12)).all() and abs(float(w.sum()) - 1) < 1e-12


@pytest.mark.parametrize("T,kind", [(3, "full"), (8, "rank_deficient"), (17, "wide")])
def test_sdmgrad_contracting_inner_loop_matches_whole_run(T, kind):
    """With a step size the inner loop contracts at (lr = 0.1), the whole multi-step run
    (state evolution included) matches the transcription's to 1e-10."""
    Gs = _sequence(T, kind, 1.0, seed=15)
    method = M.SDMGrad(lr=0.1)
    ref = sdmgrad_reference(_same(Gs), lr=0.1)
    for k, (G, (w_ref, d)) in enumerate(zip(Gs, ref, strict=True)):
        w = method.weights(G @ G.T)
        _close(w, w_ref, 1e-10, 1e-12, f"weights, step {k}")
        _close(w @ G, d, 1e-10, 1e-12, f"update, step {k}")


@pytest.mark.parametrize("lamda,niter,lr,momentum", [(0.0, 1, 1.0, 0.0), (1.0, 5, 0.1, 0.9),
                                                     (0.3, 40, 5.0, 0.5)])
def test_sdmgrad_hyper_parameters_match_transcription(lamda, niter, lr, momentum):
    method = M.SDMGrad(lamda=lamda, niter=niter, lr=lr, momentum=momentum)
    for G in _sequence(6, "rank_deficient", 1.0, seed=4):
        before = np.full(6, 1 / 6) if method.inner_weights is None else \
            method.inner_weights.numpy().copy()
        _, w_ref, d = sdmgrad_step_reference(before, (G, G, G), lamda, niter, lr, momentum)
        w = method.weights(G @ G.T)
        _close(w, w_ref, 1e-9, 1e-9, (lamda, niter, lr, momentum))
        _close(w @ G, d, 1e-9, 1e-9, "update")


# ---------------------------------------- three mini-batches (batches=3): LibMTL's exact step
def _check_three_batch_weights(w, T, expected, what):
    """Zeros on xi1 and xi2 (exactly), ``expected`` on zeta."""
    assert w.shape == (3 * T,)
    assert torch.equal(w[:2 * T], torch.zeros(2 * T, dtype=w.dtype)), what
    _close(w[2 * T:], expected, 1e-9, 1e-12, what)


@pytest.mark.parametrize("T,kind,scale", list(_cases()))
def test_modo_three_batches_match_transcription(T, kind, scale):
    steps = _sequence(T, kind, scale, seed=31, draws=3)
    method = M.MoDo(batches=3)
    for k, (Gs3, (lam, d)) in enumerate(zip(steps, modo_reference(steps), strict=True)):
        assert not torch.equal(Gs3[0], Gs3[1]) and not torch.equal(Gs3[1], Gs3[2])  # 3 draws
        w = method.weights(_stacked_gram(Gs3))
        _check_three_batch_weights(w, T, lam, f"weights, step {k}")
        _close(w @ torch.cat(Gs3), d, 1e-9, 1e-12, f"update, step {k}")
        _close(method.lambd, lam, 1e-9, 1e-12, f"state, step {k}")
        assert method.lambd.shape == (T,) and method.num_tasks == 3 * T
    if scale >= 1:
        # The cross block is not the single-batch Gram: the steps differ from those on zeta.
        single = modo_reference(_same([Gs3[2] for Gs3 in steps]))
        assert max(float(np.abs(a[0] - b[0]).max())
                   for a, b in zip(single, modo_reference(steps), strict=True)) > 1e-6


@pytest.mark.parametrize("gamma,rho", [(1e-2, 0.0), (0.5, 1.0)])
def test_modo_three_batches_hyper_parameters(gamma, rho):
    steps = _sequence(5, "full", 1.0, seed=32, draws=3)
    method = M.MoDo(gamma=gamma, rho=rho, batches=3)
    for Gs3, (lam, _) in zip(steps, modo_reference(steps, gamma, rho), strict=True):
        _check_three_batch_weights(method.weights(_stacked_gram(Gs3)), 5, lam, (gamma, rho))


@pytest.mark.parametrize("T,kind,scale", list(_cases()))
def test_sdmgrad_three_batches_match_transcription(T, kind, scale):
    """Step by step from the method's own kept ``w`` (lr = 5 does not contract, see above)."""
    method = M.SDMGrad(batches=3)
    for k, Gs3 in enumerate(_sequence(T, kind, scale, seed=33, draws=3)):
        before = np.full(T, 1.0 / T) if method.inner_weights is None else \
            method.inner_weights.numpy().copy()
        w_state, w_ref, d = sdmgrad_step_reference(before, Gs3)
        w = method.weights(_stacked_gram(Gs3))
        assert torch.equal(w[:2 * T], torch.zeros(2 * T, dtype=w.dtype))
        _close(w[2 * T:], w_ref, 1e-9, 1e-9, f"weights, step {k}")
        _close(w @ torch.cat(Gs3), d, 1e-9, 1e-9, f"update, step {k}")
        _close(method.inner_weights, w_state, 1e-9, 1e-9, f"state, step {k}")
        assert method.inner_weights.shape == (T,) and abs(float(w.sum()) - 1) < 1e-12


@pytest.mark.parametrize("T,kind", [(3, "full"), (8, "rank_deficient"), (17, "wide")])
def test_sdmgrad_three_batches_contracting_whole_run(T, kind):
    steps = _sequence(T, kind, 1.0, seed=34, draws=3)
    method = M.SDMGrad(lr=0.1, batches=3)
    for k, (Gs3, (w_ref, d)) in enumerate(zip(steps, sdmgrad_reference(steps, lr=0.1),
                                              strict=True)):
        w = method.weights(_stacked_gram(Gs3))
        _close(w[2 * T:], w_ref, 1e-10, 1e-12, f"weights, step {k}")
        _close(w @ torch.cat(Gs3), d, 1e-10, 1e-12, f"update, step {k}")


@pytest.mark.parametrize("T", [3, 8])
def test_sdmgrad_three_batches_negative_cross_diagonal(T):
    """Independent batches (no common part): some ``g_xi1,i . g_xi2,i`` are negative and are
    clamped to 0 in the scale, as LibMTL; each step from the same kept ``w``."""
    g = torch.Generator().manual_seed(35 + T)
    method = M.SDMGrad(lr=0.1, batches=3)
    negatives = 0
    for _ in range(STEPS):
        Gs3 = tuple(torch.randn(T, T + 2, generator=g, dtype=torch.float64) for _ in range(3))
        negatives += int(((Gs3[0] * Gs3[1]).sum(1) < 0).sum())
        before = np.full(T, 1.0 / T) if method.inner_weights is None else \
            method.inner_weights.numpy().copy()
        w_state, w_ref, d = sdmgrad_step_reference(before, Gs3, lr=0.1)
        w = method.weights(_stacked_gram(Gs3))
        _close(w[2 * T:], w_ref, 1e-9, 1e-9, "weights")
        _close(method.inner_weights, w_state, 1e-9, 1e-9, "state")
    assert negatives > 0


@pytest.mark.parametrize("cls", [M.MoDo, M.SDMGrad], ids=lambda c: c.__name__)
@pytest.mark.parametrize("T", [2, 8, 17])
def test_three_equal_batches_are_the_single_batch_form(cls, T):
    """Three equal blocks: the same weights (on zeta) and state as ``batches=1``, over the
    steps from the tiled Gram (the same products; a strided block may sum in another order),
    and per step from the stacked matrix's Gram."""
    one, tiled, stacked = cls(), cls(batches=3), cls(batches=3)
    for G in _sequence(T, "rank_deficient", 2.0, seed=36):
        K = G @ G.T
        w = one.weights(K)
        wt = tiled.weights(K.repeat(3, 3))
        assert torch.equal(wt[:2 * T], torch.zeros(2 * T, dtype=w.dtype))
        _close(wt[2 * T:], w, 1e-12, 1e-14, "tiled")
        state = cls.state_names[0]
        _close(getattr(tiled, state), getattr(one, state), 1e-12, 1e-14, "tiled state")
        if cls is M.SDMGrad:
            tiled.inner_weights.copy_(one.inner_weights)
        ws = stacked.weights(_stacked_gram((G, G, G)))
        _close(ws[2 * T:], w, 1e-9, 1e-12, "stacked")
        if cls is M.SDMGrad:  # lr = 5 amplifies the Gram's rounding: from the same state
            stacked.inner_weights.copy_(one.inner_weights)


@pytest.mark.parametrize("cls", [M.MoDo, M.SDMGrad], ids=lambda c: c.__name__)
def test_three_batches_aggregate_the_stacked_matrix(cls):
    """``method(G)`` on the stacked ``(3T, P)`` matrix is ``weights @ G``: the zeta block's."""
    steps = _sequence(4, "full", 1.0, seed=37, draws=3)
    a, b = cls(batches=3), cls(batches=3)
    for Gs3 in steps:
        w = a.weights(_stacked_gram(Gs3))
        _close(b(torch.cat(Gs3)), w[8:] @ Gs3[2], 1e-9, 1e-12, cls.__name__)
        if cls is M.SDMGrad:
            b.inner_weights.copy_(a.inner_weights)


@pytest.mark.parametrize("cls", [M.MoDo, M.SDMGrad], ids=lambda c: c.__name__)
@pytest.mark.parametrize("batches,exc", [(2, ValueError), (0, ValueError), (4, ValueError),
                                         (3.0, TypeError), (True, TypeError), ("3", TypeError)])
def test_bad_batches(cls, batches, exc):
    with pytest.raises(exc, match="batches"):
        cls(batches=batches)


@pytest.mark.parametrize("cls", [M.MoDo, M.SDMGrad], ids=lambda c: c.__name__)
def test_three_batches_validation_changes_nothing(cls):
    """A loss count not divisible by 3 (first step or later) and a Gram of another size after
    the first step are ValueErrors; the state, T and the later steps stay as a twin's."""
    state = cls.state_names[0]
    steps = _sequence(4, "full", 1.0, seed=38, draws=3)
    method, twin = cls(batches=3), cls(batches=3)
    with pytest.raises(ValueError, match=r"batches=3.*got 7, not a multiple of 3"):
        method.weights(torch.eye(7, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"batches=3"):
        method.propose_weights(torch.eye(8, dtype=torch.float64), None)  # below check_tasks
    assert getattr(method, state) is None and method.num_tasks is None
    for k, Gs3 in enumerate(steps):
        if k == 2:
            before = getattr(method, state).clone()
            with pytest.raises(ValueError, match="not a multiple of 3"):
                method.weights(torch.eye(13, dtype=torch.float64))
            with pytest.raises(ValueError, match="T=12"):
                method.weights(torch.eye(15, dtype=torch.float64))
            assert torch.equal(getattr(method, state), before) and method.num_tasks == 12
        K = _stacked_gram(Gs3)
        torch.testing.assert_close(method.weights(K), twin.weights(K), rtol=0, atol=0)
    # A state bound to T = 4 with a Gram of 15 reaching the step (no check_tasks): caught there.
    with pytest.raises(ValueError, match="keeps weights of shape"):
        method.propose_weights(torch.eye(15, dtype=torch.float64), None)


@pytest.mark.parametrize("cls", [M.MoDo, M.SDMGrad], ids=lambda c: c.__name__)
def test_three_batches_skipped_step_and_state_dict(cls):
    """A non-finite step under "skip" returns zeros and changes nothing; the state_dict
    carries the T-sized state and the 3T-loss count into a fresh method."""
    steps = _sequence(5, "full", 1.0, seed=39, draws=3)
    method, twin = cls(batches=3, on_nonfinite="skip"), cls(batches=3)
    for k, Gs3 in enumerate(steps[:3]):
        K = _stacked_gram(Gs3)
        if k == 1:
            bad = K.clone()
            bad[0, 7] = float("nan")
            assert torch.equal(method.weights(bad), torch.zeros(15, dtype=K.dtype))
        torch.testing.assert_close(method.weights(K), twin.weights(K), rtol=0, atol=0)
    fresh = cls(batches=3)
    fresh.load_state_dict(copy.deepcopy(twin.state_dict()))
    state = cls.state_names[0]
    assert getattr(fresh, state).shape == (5,) and fresh.num_tasks == 15
    for Gs3 in steps[3:]:
        K = _stacked_gram(Gs3)
        torch.testing.assert_close(fresh.weights(K), twin.weights(K), rtol=0, atol=0)
    assert "batches=3" in repr(fresh) and "batches=1" in repr(cls())


class _TinyModel(torch.nn.Module):
    """A shared trunk and two linear heads; ``losses(x, y)`` the two tasks' mean losses."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                         torch.nn.Linear(6, 5), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList(torch.nn.Linear(5, 1) for _ in range(2))

    def losses(self, x, y, features=None):
        z = self.trunk(x) if features is None else features
        return torch.stack([((h(z).squeeze(-1) - y[:, t]) ** 2).mean()
                            for t, h in enumerate(self.heads)])


def _three_batches(seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g, dtype=torch.float64),
             torch.randn(8, 2, generator=g, dtype=torch.float64)) for _ in range(3)]


@pytest.mark.parametrize("cls", [M.MoDo, M.SDMGrad], ids=lambda c: c.__name__)
@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
def test_three_batches_end_to_end(cls, mode):
    """Three forward passes, one ``mtlfast.backward`` of the stacked 6 losses, two steps: the
    trunk's ``.grad`` is ``lambda @ G_zeta`` from the transcription on the three per-batch
    Jacobians computed by hand, the heads' the plain gradient of all six losses."""
    torch.manual_seed(0)
    model = _TinyModel().double()
    method = cls(gamma=0.5, batches=3) if cls is M.MoDo else cls(batches=3)
    shared = list(model.trunk.parameters())
    w_kept, seen = np.full(2, 0.5), []
    for step in range(2):
        batches = _three_batches(40 + step)
        model.zero_grad(set_to_none=True)
        losses = torch.cat([model.losses(x, y) for x, y in batches])
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared,
                                                                      retain_graph=True)])
                for loss in losses]
        head_ref = torch.autograd.grad(losses.sum(), list(model.heads.parameters()),
                                       retain_graph=True)
        Gs3 = tuple(torch.stack(rows[2 * b:2 * b + 2]) for b in range(3))
        info = mtlfast.backward(losses, model.trunk, method, mode=mode)
        if cls is M.MoDo:  # the whole run so far, lambda carried across the steps
            seen.append(Gs3)
            lam, d = modo_reference(seen, gamma=0.5)[-1]
        else:  # lr = 5 does not contract: each step from the method's own kept w
            _, lam, d = sdmgrad_step_reference(w_kept, Gs3)
            w_kept = method.inner_weights.numpy().copy()
        grad = torch.cat([p.grad.reshape(-1) for p in shared])
        _close(grad, d, 1e-9, 1e-12, f"trunk grad, step {step}")
        _close(info.weights[4:], lam, 1e-9, 1e-12, f"weights, step {step}")
        assert torch.equal(info.weights[:4], torch.zeros(4, dtype=info.weights.dtype))
        for p, g in zip(model.heads.parameters(), head_ref, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
        assert method.num_tasks == 6 and getattr(method, cls.state_names[0]).shape == (2,)


def test_three_batches_refuse_features_mode():
    """Per-task gradients with respect to different batches' features have zero products:
    ``mode="features"`` with ``batches=3`` is a ValueError before anything is written."""
    model = _TinyModel().double()
    batches = _three_batches(50)
    zs = [model.trunk(x) for x, _ in batches]
    losses = torch.cat([model.losses(x, y, z) for (x, y), z in zip(batches, zs, strict=True)])
    for cls in (M.MoDo, M.SDMGrad):
        method = cls(batches=3)
        with pytest.raises(ValueError, match=r"mode='features'.*batches=3"):
            mtlfast.backward(losses, model.trunk, method, features=zs, mode="features",
                             retain_graph=True)
        assert all(p.grad is None for p in model.parameters())
        assert getattr(method, cls.state_names[0]) is None and method.num_tasks is None


@pytest.mark.parametrize("T,kind,scale", list(_cases()))
@pytest.mark.parametrize("eta,baseline", [(1e-2, 1), (0.7, 1), (0.7, 3)])
def test_excess_mtl_matches_transcription(T, kind, scale, eta, baseline):
    Gs = _sequence(T, kind, scale, seed=5)
    method = M.ExcessMTL(robust_step_size=eta, baseline_steps=baseline)
    ref = excess_reference(Gs, eta, baseline_steps=baseline)
    for k, (G, (alpha, d)) in enumerate(zip(Gs, ref, strict=True)):
        update = method(G)
        _close(method.loss_weight, alpha, 1e-10, 1e-13, f"weights, step {k}")
        _close(update, d, 1e-10, 1e-12, f"update, step {k}")
        assert (method.loss_weight > 0).all()
        assert abs(float(method.loss_weight.sum()) - T) < 1e-10 * T
    if eta == 0.7 and kind == "full" and baseline == 1:
        # The drifting norms must actually have moved the weights off 1.
        assert float((method.loss_weight - 1).abs().max()) > 1e-3


@pytest.mark.parametrize("T", TS)
def test_rgw_matches_transcription(T):
    Gs = _sequence(T, "full", 1.0, seed=6)
    method = M.RGW(seed=12345)
    for step, G in enumerate(Gs):
        w_ref = _softmax(rgw_normals_reference(12345, step, T))
        d = method(G)
        _close(d, w_ref @ G.numpy(), 1e-12, 1e-14, f"update, step {step}")
        assert method.rng_state.tolist() == [12345, step + 1]
    # weights() draws from the same stream
    w = method.weights(Gs[0] @ Gs[0].T)
    _close(w, _softmax(rgw_normals_reference(12345, STEPS, T)), 1e-12, 1e-15, "weights")


def test_rgw_stream_transcription_large_seed_and_step():
    state = torch.tensor([2**63 - 5, 2**40 + 3], dtype=torch.int64)
    z, advanced = counter_normals(state, (3, 7), "cpu")
    np.testing.assert_allclose(z.reshape(-1).numpy(),
                               rgw_normals_reference(2**63 - 5, 2**40 + 3, 21), rtol=1e-13,
                               atol=1e-13)
    assert advanced.tolist() == [2**63 - 5, 2**40 + 4]
    assert state.tolist() == [2**63 - 5, 2**40 + 3]  # the input is not modified


# ------------------------------------------------------------------------------ invariants
def _perm(T):
    return torch.randperm(T, generator=torch.Generator().manual_seed(T))


@pytest.mark.parametrize("cls", [M.MoDo, M.SDMGrad], ids=lambda c: c.__name__)
@pytest.mark.parametrize("T", [3, 8, 17])
def test_gram_methods_permutation_equivariant_over_steps(cls, T):
    """Permuted tasks permute the weights and the state, step after step (SDMGrad: each step
    from the permuted state of the other, its inner loop not being a contraction)."""
    perm = _perm(T)
    a, b = cls(), cls()
    for G in _sequence(T, "full", 1.0, seed=7):
        wa = a.weights(G @ G.T)
        wb = b.weights(G[perm] @ G[perm].T)
        _close(wb, wa[perm], 1e-9, 1e-11, cls.__name__)
        if cls is M.SDMGrad:
            b.inner_weights.copy_(a.inner_weights[perm])


@pytest.mark.parametrize("T", [3, 8, 17])
def test_excess_mtl_permutation_equivariant_over_steps(T):
    perm = _perm(T)
    a, b = M.ExcessMTL(robust_step_size=0.5), M.ExcessMTL(robust_step_size=0.5)
    for G in _sequence(T, "rank_deficient", 1.0, seed=8):
        _close(b(G[perm]), a(G), 1e-10, 1e-12, "update")
        _close(b.loss_weight, a.loss_weight[perm], 1e-10, 1e-12, "weights")


@pytest.mark.parametrize("s", [1e-3, 1e3])
def test_modo_scale_rule(s):
    """``K -> s K`` with ``gamma -> gamma / s`` and ``rho -> s rho``: the same steps."""
    a, b = M.MoDo(gamma=0.01, rho=0.1), M.MoDo(gamma=0.01 / s, rho=0.1 * s)
    for G in _sequence(6, "full", 1.0, seed=9):
        K = G @ G.T
        _close(b.weights(K * s), a.weights(K), 1e-9, 1e-12, s)


@pytest.mark.parametrize("s", [1e-2, 1e4])
def test_sdmgrad_scale_invariant_away_from_eps(s):
    """The scaled Gram ``K / (s^2 + eps)`` makes a step scale-free where ``eps = 1e-8`` is
    negligible (documented limit: norms near 1e-4): each step from the same kept ``w``, with
    a contracting inner loop (lr = 0.1; at lr = 5 the eps term's relative 1e-8 is amplified)."""
    a, b = M.SDMGrad(lr=0.1), M.SDMGrad(lr=0.1)
    for G in _sequence(6, "full", 10.0, seed=10):
        K = G @ G.T
        wa = a.weights(K)
        _close(b.weights(K * s), wa, 1e-6, 1e-8, s)
        b.load_state_dict(a.state_dict())


def test_sdmgrad_zero_gram_keeps_uniform_weights():
    w = M.SDMGrad().weights(torch.zeros(4, 4, dtype=torch.float64))
    torch.testing.assert_close(w, torch.full((4,), 0.25, dtype=torch.float64))


def test_excess_mtl_zero_initial_gradient_is_finite():
    """A task with an exactly zero gradient at the first step (``e^0 = 0``, where LibMTL
    divides by zero): its ratio is 0 and the weights stay finite and sum to T."""
    Gs = _sequence(4, "full", 1.0, seed=11)
    Gs[0] = Gs[0].clone()
    Gs[0][2] = 0
    method = M.ExcessMTL(robust_step_size=0.5)
    for G in Gs:
        assert torch.isfinite(method(G)).all()
    alpha = method.loss_weight
    assert torch.isfinite(alpha).all() and abs(float(alpha.sum()) - 4) < 1e-12
    # Transcription with task 2's ratio replaced by 0 from the second step on.
    ref = np.ones(4)
    acc = np.zeros_like(Gs[0].numpy())
    init = None
    for G in Gs:
        G = G.numpy()
        acc += G**2
        e = ((G**2) / np.sqrt(acc + 1e-7)).sum(1)
        if init is None:
            init = e
            continue
        ratio = np.where(init > 0, e / np.where(init > 0, init, 1), 0)
        ref = ref * np.exp(0.5 * ratio)
        ref = ref / ref.sum() * 4
    _close(alpha, ref, 1e-10, 1e-13, "zero first gradient")


def test_excess_mtl_large_ratios_saturate_instead_of_overflowing():
    """Task 0's gradient grows 1e6x after the first step: ``exp(eta e / e^0)`` overflows in
    LibMTL's product form; the log-space form gives weight ~T to task 0, finite."""
    G0 = torch.eye(3, 5, dtype=torch.float64)
    G1 = G0.clone()
    G1[0] *= 1e6
    method = M.ExcessMTL(robust_step_size=1.0)
    method(G0)
    d = method(G1)
    assert torch.isfinite(d).all()
    torch.testing.assert_close(method.loss_weight, torch.tensor([3.0, 0, 0], dtype=torch.float64),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls", [M.MoDo, M.SDMGrad, M.RGW], ids=lambda c: c.__name__)
def test_batched_grams_are_independent_problems(cls):
    """A batch of Grams ``(L, T, T)``: each row of weights follows its own Gram (RGW: each row
    is a softmax of its own draws, all different)."""
    Ks = torch.stack([G @ G.T for G in _sequence(5, "full", 1.0, seed=12, steps=3)])
    method = cls(seed=4) if cls is M.RGW else cls()
    singles = [cls(seed=4) if cls is M.RGW else cls() for _ in range(3)]
    for _ in range(3):
        W = method.weights(Ks)
        assert W.shape == (3, 5)
        assert (W >= 0).all()
        torch.testing.assert_close(W.sum(-1), torch.ones(3, dtype=torch.float64))
        if cls is M.RGW:
            assert len({tuple(w.tolist()) for w in W}) == 3
        else:
            for i, m in enumerate(singles):
                _close(W[i], m.weights(Ks[i]), 1e-7, 1e-9, i)


# --------------------------------------------------------------- state, skips, randomness
def _factories():
    return {
        "MoDo": (lambda **kw: M.MoDo(gamma=0.05, **kw), "gram"),
        "SDMGrad": (lambda **kw: M.SDMGrad(**kw), "gram"),
        "RGW": (lambda **kw: M.RGW(seed=99, **kw), "gram"),
        "ExcessMTL": (lambda **kw: M.ExcessMTL(robust_step_size=0.5, **kw), "jacobian"),
        "ExcessMTL-baseline3": (lambda **kw: M.ExcessMTL(robust_step_size=0.5,
                                                         baseline_steps=3, **kw), "jacobian"),
    }


def _call(method, kind, G):
    if kind == "gram":
        return method.weights(G @ G.T)
    return method(G)


@pytest.mark.parametrize("name", list(_factories()))
@pytest.mark.parametrize("where", [0, 2])
def test_skipped_step_changes_nothing(name, where):
    """With ``on_nonfinite="skip"``, a non-finite step (first or later) returns zeros and the
    next steps equal those of a twin that never saw it (state, counter, first-step flags)."""
    make, kind = _factories()[name]
    Gs = _sequence(5, "full", 1.0, seed=13)
    method, twin = make(on_nonfinite="skip"), make()
    for k, G in enumerate(Gs):
        if k == where:
            bad = G.clone()
            bad[1, 0] = float("nan")
            out = _call(method, kind, bad)
            assert torch.equal(out, torch.zeros_like(out))
        torch.testing.assert_close(_call(method, kind, G), _call(twin, kind, G), rtol=0, atol=0)


def test_rgw_reproducible_under_manual_seed():
    K = torch.eye(6, dtype=torch.float64)
    torch.manual_seed(123)
    a = M.RGW()
    torch.manual_seed(123)
    b = M.RGW()
    torch.manual_seed(124)
    c = M.RGW()
    wa = [a.weights(K) for _ in range(4)]
    wb = [b.weights(K) for _ in range(4)]
    wc = [c.weights(K) for _ in range(4)]
    for x, y, z in zip(wa, wb, wc, strict=True):
        assert torch.equal(x, y) and not torch.equal(x, z)
    assert not torch.equal(wa[0], wa[1])  # fresh weights every step


def test_rgw_state_dict_resumes_the_stream():
    K = torch.eye(4, dtype=torch.float64)
    a = M.RGW(seed=5)
    for _ in range(3):
        a.weights(K)
    b = M.RGW(seed=6)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert torch.equal(a.weights(K), b.weights(K))


def test_rgw_draws_are_standard_normal():
    """The counter stream against N(0, 1): Kolmogorov-Smirnov on 20000 draws of one step and
    on one coordinate across 2000 steps, the first two moments, and no correlation between
    neighbouring draws, between steps, or between nearby seeds."""
    stats = pytest.importorskip("scipy.stats")
    z, _ = counter_normals(torch.tensor([17, 0]), (20000,), "cpu")
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    assert abs(float(z.mean())) < 0.05 and abs(float(z.var()) - 1) < 0.05
    assert abs(float(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1])) < 0.05
    state = torch.tensor([17, 0])
    across = []
    for _ in range(2000):
        zz, state = counter_normals(state, (2,), "cpu")
        across.append(zz)
    across = torch.stack(across)
    assert stats.kstest(across[:, 0].numpy(), "norm").pvalue > 1e-3
    assert abs(float(torch.corrcoef(across.T)[0, 1])) < 0.1
    assert abs(float(torch.corrcoef(torch.stack([across[:-1, 0], across[1:, 0]]))[0, 1])) < 0.1
    other, _ = counter_normals(torch.tensor([18, 0]), (20000,), "cpu")
    assert abs(float(torch.corrcoef(torch.stack([z, other]))[0, 1])) < 0.05


def test_rgw_weights_follow_the_softmax_of_normals():
    """From the weights alone: ``log w_0 - log w_1 = z_0 - z_1 ~ N(0, 2)`` across steps."""
    stats = pytest.importorskip("scipy.stats")
    method = M.RGW(seed=3)
    K = torch.eye(2, dtype=torch.float64)
    diffs = np.array([float(torch.log(w[0] / w[1])) for w in
                      (method.weights(K) for _ in range(1500))])
    assert stats.kstest(diffs / math.sqrt(2), "norm").pvalue > 1e-3


def test_float32_grams_keep_float32_state():
    G = _sequence(4, "full", 1.0, seed=14)[0].float()
    for method, name in ((M.MoDo(), "lambd"), (M.SDMGrad(), "inner_weights")):
        w = method.weights(G @ G.T)
        assert w.dtype == torch.float32 and getattr(method, name).dtype == torch.float32
    m = M.ExcessMTL()
    assert m(G).dtype == torch.float32 and m.grad_sq_sum.dtype == torch.float32


def test_task_count_is_fixed_by_the_state():
    for method in (M.MoDo(), M.SDMGrad()):
        method.weights(torch.eye(3, dtype=torch.float64))
        with pytest.raises(ValueError, match="T=3"):
            method.weights(torch.eye(4, dtype=torch.float64))
    rgw = M.RGW()  # no T-dependent state
    rgw.weights(torch.eye(3))
    assert rgw.weights(torch.eye(4)).shape == (4,)


def test_registry_names():
    for name, cls in (("excess_mtl", M.ExcessMTL), ("ExcessMTL", M.ExcessMTL), ("modo", M.MoDo),
                      ("SDMGrad", M.SDMGrad), ("rgw", M.RGW)):
        assert type(M.get(name)) is cls


@pytest.mark.parametrize("make,exc,match", [
    (lambda: M.MoDo(gamma=0.0), ValueError, "gamma"),
    (lambda: M.MoDo(gamma="1"), TypeError, "gamma"),
    (lambda: M.MoDo(rho=-1.0), ValueError, "rho"),
    (lambda: M.MoDo(rho=float("nan")), ValueError, "rho"),
    (lambda: M.SDMGrad(lamda=-0.1), ValueError, "lamda"),
    (lambda: M.SDMGrad(niter=0), ValueError, "niter"),
    (lambda: M.SDMGrad(niter=2.0), TypeError, "niter"),
    (lambda: M.SDMGrad(lr=0.0), ValueError, "lr"),
    (lambda: M.SDMGrad(momentum=1.0), ValueError, "momentum"),
    (lambda: M.SDMGrad(eps=-1e-8), ValueError, "eps"),
    (lambda: M.ExcessMTL(robust_step_size=-1.0), ValueError, "robust_step_size"),
    (lambda: M.ExcessMTL(robust_step_size=True), TypeError, "robust_step_size"),
    (lambda: M.ExcessMTL(eps=0.0), ValueError, "eps"),
    (lambda: M.ExcessMTL(baseline_steps=0), ValueError, "baseline_steps"),
    (lambda: M.ExcessMTL(baseline_steps=1.5), TypeError, "baseline_steps"),
    (lambda: M.RGW(seed=-1), ValueError, "seed"),
    (lambda: M.RGW(on_nonfinite="ignore"), ValueError, "on_nonfinite"),
])
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# -------------------------------------------------------- a second opinion: torchjd >= 0.18
@pytest.mark.parametrize("T", [2, 8, 17])
def test_modo_agrees_with_torchjd_on_single_batch_grams(T):
    """torchjd's ``MoDoWeighting`` fed ``J_1 J_2^T`` with ``J_1 = J_2 = G`` is the same rule."""
    agg = pytest.importorskip("torchjd.aggregation")
    if not hasattr(agg, "MoDoWeighting"):
        pytest.skip("torchjd without MoDoWeighting")
    theirs = agg.MoDoWeighting(gamma=1e-3, rho=0.1)
    ours = M.MoDo()
    for G in _sequence(T, "rank_deficient", 3.0, seed=16):
        K = G @ G.T
        _close(ours.weights(K), theirs(K), 1e-9, 1e-12, "MoDo vs torchjd")


@pytest.mark.parametrize("T", [2, 8, 17])
def test_sdmgrad_agrees_with_torchjd_on_single_batch_grams(T):
    """torchjd's ``SDMGradWeighting`` (at LibMTL's lr = 5; torchjd's default is 10) fed
    ``K = G G^T``, each step from the same kept ``w``."""
    agg = pytest.importorskip("torchjd.aggregation")
    if not hasattr(agg, "SDMGradWeighting"):
        pytest.skip("torchjd without SDMGradWeighting")
    theirs = agg.SDMGradWeighting(lr=5.0, momentum=0.5, n_iter=20, lambda_=0.3)
    ours = M.SDMGrad()
    for G in _sequence(T, "full", 1.0, seed=17):
        K = G @ G.T
        w = ours.weights(K)
        _close(w, theirs(K), 1e-9, 1e-9, "SDMGrad vs torchjd")
        theirs._w = ours.inner_weights.clone()


def test_simplex_projection_matches_libmtl_loops():
    """The sort-free projection shared by MoDo and SDMGrad against both of LibMTL's loops, on
    2000 vectors of T = 1..19 with scales 1e-6..1e6 and many ties, and a batch at once."""
    from mtlfast.methods._simplex import project_simplex

    g = torch.Generator().manual_seed(21)
    batch = []
    for trial in range(2000):
        T = int(torch.randint(1, 20, (1,), generator=g))
        scale = 10 ** float(torch.empty(()).uniform_(-6, 6, generator=g))
        v = torch.randn(T, generator=g, dtype=torch.float64) * scale
        if trial % 3 == 0:
            v = torch.round(v / scale * 2) / 2 * scale
        x = project_simplex(v)
        ref = _libmtl_modo_projection(v.numpy())
        _close(x, ref, 1e-12, 1e-15, (trial, v))
        _close(x, _libmtl_sdmgrad_projection(v.numpy()), 1e-12, 1e-15, (trial, v))
        # v - theta cancels: the sum is exact to the rounding of the largest entry.
        slack = 1e-15 * T * max(1.0, float(v.abs().max()))
        assert (x >= 0).all() and abs(float(x.sum()) - 1) <= slack + 1e-15, (trial, v)
        if T == 7:
            batch.append((v, x))
    V = torch.stack([v for v, _ in batch])
    torch.testing.assert_close(project_simplex(V), torch.stack([x for _, x in batch]))
