"""Small dense solvers on batches of T x T Gram matrices, exact and free of host syncs.

Two problems cover the QP-based methods (MGDA, CAGrad, UPGrad, DualProj):

- ``nnqp(A, b, simplex=False)``: ``argmin_{x >= 0} 1/2 x^T A x + b^T x`` (non-negative QP;
  UPGrad and DualProj after the substitution ``v = u + x``),
- ``nnqp(A, b, simplex=True)``: the same over the probability simplex ``x >= 0, sum x = 1``
  (MGDA's min-norm point, CAGrad's inner problem),

for ``A`` symmetric positive semi-definite (``b`` in the range of ``A`` when not ``simplex``, so
the problem is bounded). ``pcgrad_weights(K, orders)`` runs PCGrad's projection recursion on
the Gram matrix.

Every function has a torch reference (``*_reference``: the spec, any device, batched, fixed
iteration counts and masked updates, so it never reads the device) and one dispatch function
that uses the C++ kernels (``torch.ops.mtlfast.*``, csrc/cpu/solvers.cpp) for CPU tensors when
the extension is built. CUDA kernels must reproduce the reference algorithm step by step.

The QP algorithm is the Lawson-Hanson active-set method (Lawson & Hanson, *Solving Least
Squares Problems*, 1974, ch. 23) written on the Gram matrix, extended to the simplex by a
bordered KKT system. It is exact: once the active set is right, the last step solves the KKT
system of the true optimum, so the answer is the optimum to rounding error, not to a solver
tolerance. Each step changes the active set by one index, so ``steps(T)`` bounds the work.
"""

from __future__ import annotations

import torch

from . import _validate
from ._dispatch import backend

__all__ = [
    "CAGRAD_ROOT_STEPS",
    "DUAL_TOL",
    "HULL_NOISE",
    "NNQP_EXTRA_STEPS",
    "NNQP_STEPS_PER_TASK",
    "cagrad_weights",
    "cagrad_weights_reference",
    "cosine_gram",
    "nnqp",
    "nnqp_reference",
    "nnqp_steps",
    "normalize_gram",
    "pcgrad_orders",
    "pcgrad_orders_reference",
    "pcgrad_weights",
    "pcgrad_weights_reference",
    "zero_in_hull",
]

#: Active-set steps per task: one to add each index of the support plus room for drops.
NNQP_STEPS_PER_TASK = 3
#: Extra active-set steps on top of ``NNQP_STEPS_PER_TASK * T`` (small T needs a few drops).
NNQP_EXTRA_STEPS = 10
#: An index joins the active set only when its multiplier exceeds this (A scaled to max diag 1).
DUAL_TOL = 1e-12


#: Root-finding steps of CAGrad's outer problem (each one simplex QP solve).
CAGRAD_ROOT_STEPS = 16


def nnqp_steps(num_tasks: int) -> int:
    """The fixed number of active-set steps for T tasks: ``3 T + 10``."""
    return NNQP_STEPS_PER_TASK * num_tasks + NNQP_EXTRA_STEPS


def normalize_gram(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K / s, s)`` in float64 with ``s`` the largest diagonal entry (1 for an all-zero K).

    The QP solutions are invariant to this scale; solving at unit scale makes the tolerances
    absolute and keeps Grams with entries from 1e-12 to 1e12 in range.
    """
    K = gram.to(torch.float64)
    K = (K + K.transpose(-1, -2)) / 2
    s = K.diagonal(dim1=-2, dim2=-1).amax(-1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return K / s[..., None, None], s


def cosine_gram(K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, 1 / |g|)``: the cosine matrix ``C = D^-1 K D^-1`` of the task gradients
    (``D = diag(sqrt K_ii)``) and the inverse norms, with 0 for zero rows (their row of C is 0).

    C does not depend on the gradients' norms, so solves on it keep their accuracy when the
    norms span many orders of magnitude (the eigenvalues of K then span their squares).
    """
    norms = K.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    inv_norms = torch.where(norms > 0, 1 / torch.where(norms > 0, norms, 1.0), 0.0)
    return K * inv_norms.unsqueeze(-1) * inv_norms.unsqueeze(-2), inv_norms


#: ``0`` is in the convex hull of the task gradients when the min-norm point of the hull of
#: their unit vectors has ``|u_w|^2 <= HULL_NOISE T eps`` (eps of the Gram's dtype).
HULL_NOISE = 4.0


def zero_in_hull(K: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whether ``0`` is in the convex hull of the gradients of the float64 Gram ``K``
    ``(..., T, T)`` (to the rounding of a Gram in ``dtype``): a bool ``(...)``, no host read.

    ``0`` is a convex combination of the ``g_i`` iff it is one of the unit vectors ``u_i``
    (or some ``g_i = 0``), so the test solves the min-norm problem on the cosine matrix, which
    is scale-free; its optimum is ``|u_w|^2 <= 0.25 T eps`` at stationary points and orders of
    magnitude above the bound otherwise, for norms spanning 1e-8..1e8 and float32 Grams.
    """
    C, _ = cosine_gram(K)
    T = K.shape[-1]
    b = torch.zeros(*K.shape[:-2], 1, T, dtype=K.dtype, device=K.device)
    w = nnqp(C, b, simplex=True).squeeze(-2)
    min_norm_sq = (w * (C @ w.unsqueeze(-1)).squeeze(-1)).sum(-1)
    return min_norm_sq <= HULL_NOISE * T * torch.finfo(dtype).eps


_F64 = (torch.float64,)


def _check_steps(op: str, name: str, steps: object) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{op}: {name} must be a non-negative int, got {steps!r}")


def _check_qp(A: torch.Tensor, b: torch.Tensor, steps: int | None) -> None:
    T = _validate.gram_batch("nnqp", "A", A, _F64)
    _validate.tensor("nnqp", "b", b, dtypes=_F64)
    if b.dim() < 2 or b.shape[-1] != T or b.shape[:-2] != A.shape[:-2]:
        raise ValueError(f"nnqp: b must have shape (..., m, T) with A's batch dims "
                         f"{tuple(A.shape[:-2])} and T={T}, got {tuple(b.shape)}")
    _validate.same_device("nnqp", A=A, b=b)
    if steps is not None:
        _check_steps("nnqp", "steps", steps)


def nnqp_reference(
    A: torch.Tensor, b: torch.Tensor, simplex: bool = False, steps: int | None = None
) -> torch.Tensor:
    """Solve ``min 1/2 x^T A x + b^T x`` s.t. ``x >= 0`` (and ``sum x = 1`` if ``simplex``).

    ``A``: ``(..., T, T)`` float64 PSD (scaled to max diagonal ~1, see ``normalize_gram``);
    ``b``: ``(..., m, T)``, m problems per ``A``. Returns ``x`` ``(..., m, T)``.

    The algorithm (Lawson-Hanson active set on the Gram), run for exactly ``steps`` steps
    (default ``nnqp_steps(T)``) with every update masked once a problem has converged:

    0. Start: non-negative case ``x = 0, S = {}``; simplex case ``x = e_j, S = {j}`` with
       ``j = argmin_j 1/2 A_jj + b_j`` (the best vertex).
    1. Solve the equality-constrained problem on the support ``S``: ``A_SS z_S = -b_S``
       (simplex: the bordered KKT system ``[A_SS 1; 1^T 0] [z_S; nu] = [-b_S; 1]``),
       ``z = 0`` off ``S``. The system is assembled at full size with identity rows off ``S``.
    2. If ``z_S > 0`` (feasible): ``x = z``. Multipliers ``mu = lam - (A x + b)`` with
       ``lam = 0`` (simplex: ``lam = x . (A x + b)``, the common gradient on ``S``). If
       ``max_{j not in S} mu_j > DUAL_TOL``, add that ``j`` to ``S``; otherwise ``x`` satisfies
       the KKT conditions and the problem is done.
    3. Else (some ``z_i <= 0``): move ``x += alpha (z - x)`` with the largest ``alpha`` that
       keeps ``x >= 0``, ``alpha = min_{i in S, z_i <= 0} x_i / (x_i - z_i)``; drop the index
       that reaches 0 (and any other at exactly 0) from ``S``.
    4. A non-finite solve (a singular system, which the theory excludes) freezes the problem.
    """
    _check_qp(A, b, steps)
    T = A.shape[-1]
    steps = nnqp_steps(T) if steps is None else steps
    A = A.unsqueeze(-3).expand(*b.shape[:-1], T, T)
    dev, dt = A.device, A.dtype
    eye = torch.eye(T, dtype=dt, device=dev)
    diag_A = A.diagonal(dim1=-2, dim2=-1)
    if simplex:
        j0 = (0.5 * diag_A + b).argmin(-1, keepdim=True)
        S = torch.zeros_like(b, dtype=torch.bool).scatter_(-1, j0, True)
    else:
        S = torch.zeros_like(b, dtype=torch.bool)
    x = S.to(dt)
    done = torch.zeros(b.shape[:-1], dtype=torch.bool, device=dev)
    for _ in range(steps):
        SS = S.unsqueeze(-1) & S.unsqueeze(-2)
        M = torch.where(SS, A, eye)
        rhs = torch.where(S, -b, 0.0)
        if simplex:
            s_col = S.to(dt).unsqueeze(-1)
            top = torch.cat([M, s_col], -1)
            bottom = torch.cat([s_col.transpose(-1, -2), torch.zeros_like(s_col[..., :1, :])], -1)
            sol = torch.linalg.solve_ex(
                torch.cat([top, bottom], -2), torch.cat([rhs, torch.ones_like(rhs[..., :1])], -1)
            )[0]
            z = sol[..., :T]
        else:
            z = torch.linalg.solve_ex(M, rhs)[0]
        z = torch.where(S, z, 0.0)
        finite = torch.isfinite(z).all(-1)
        feasible = torch.where(S, z > 0, True).all(-1)
        # Step 2: accept z, look for the most violated multiplier outside S.
        grad = (A @ z.unsqueeze(-1)).squeeze(-1) + b
        lam = (z * grad).sum(-1, keepdim=True) if simplex else torch.zeros_like(grad[..., :1])
        mu = torch.where(S, -torch.inf, lam - grad)
        mu_max, j = mu.max(-1, keepdim=True)
        add = mu_max.squeeze(-1) > DUAL_TOL
        S_add = S | (torch.zeros_like(S).scatter_(-1, j, True) & add.unsqueeze(-1))
        # Step 3: move towards z until the first index of S hits zero, drop it.
        blocking = S & (z <= 0)
        ratio = torch.where(blocking, x / (x - z).clamp_min(torch.finfo(dt).tiny), torch.inf)
        alpha, k = ratio.min(-1, keepdim=True)
        alpha = alpha.clamp(0.0, 1.0)
        x_move = (x + alpha * (z - x)).clamp_min(0.0)
        x_move = x_move.scatter(-1, k, 0.0)
        S_drop = S & (x_move > 0)
        x_next = torch.where(feasible.unsqueeze(-1), z, x_move)
        S_next = torch.where(feasible.unsqueeze(-1), S_add, S_drop)
        update = ~done & finite
        x = torch.where(update.unsqueeze(-1), x_next, x)
        S = torch.where(update.unsqueeze(-1), S_next, S)
        done = done | ~finite | (feasible & ~add)
    return x


def nnqp(
    A: torch.Tensor, b: torch.Tensor, simplex: bool = False, steps: int | None = None
) -> torch.Tensor:
    """``nnqp_reference``'s problem, by the C++ kernel on CPU or the CUDA kernel on CUDA
    (``T <= _dispatch.CUDA_SOLVER_MAX_T``; both run csrc/common/solver_core.h and stop each
    problem as soon as it has converged, within the same step budget), else by the torch
    reference.

    Cost: a problem whose support grows to ``k`` indices with ``d`` drops takes ``k + 2d``
    active-set steps, each ``O(T k)`` (the multipliers) plus ``O(k^2)`` (the Cholesky row and
    two triangular solves; a drop refactors, ``O(k^3)``), so ``O(T k^2)`` per problem and
    ``O(m T k^2)`` for ``m`` right-hand sides. UPGrad solves ``m = T`` problems per Gram with
    supports ``k ~ T/2`` on unrelated tasks: ``O(T^4)``. Measured for ``UPGrad().weights`` on
    one CPU thread (Gram of a random ``(T, 1000)`` float64 matrix, benchmarks/RESULTS.md): T=8
    0.13 ms, 32 0.32 ms, 64 2.6 ms, 128 29 ms, 200 0.15 s, 256 0.38 s; the problems of a batch
    split across CPU threads. From T ~ 200 a step costs a sizeable fraction of a second.
    """
    _check_qp(A, b, steps)
    steps = nnqp_steps(A.shape[-1]) if steps is None else steps
    if backend("nnqp", A) in ("cpu", "cuda"):
        return torch.ops.mtlfast.nnqp(A, b, bool(simplex), steps, DUAL_TOL)
    return nnqp_reference(A, b, simplex, steps)


def _check_pcgrad(K: torch.Tensor, orders: torch.Tensor) -> None:
    T = _validate.gram_batch("pcgrad_weights", "K", K)
    _validate.tensor("pcgrad_weights", "orders", orders, dtypes=(torch.int64,))
    _validate.trailing_batch("pcgrad_weights", "orders", orders, K.shape[:-2], (T, T))
    _validate.same_device("pcgrad_weights", K=K, orders=orders)
    # The entries' range is checked where they are read (the C++ kernel raises RuntimeError,
    # the reference's gather too): checking here would read the tensor on the host, a sync
    # that a captured step must not make.


def pcgrad_weights_reference(K: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """PCGrad (Yu et al., 2020, Algorithm 1) on the Gram: the coefficients ``C`` ``(..., T, T)``
    with ``g_i^PC = sum_j C_ij g_j``; the update is ``sum_i g_i^PC = C.sum(-2) @ G``.

    ``orders[..., i, :]`` is a permutation of the T tasks: task i is projected against
    ``g_j`` for ``j`` in that order, skipping ``j = i``. Step ``s`` (exactly T steps), for every
    i at once: ``j = orders[i, s]``, ``p = g_i^PC . g_j = (C K)_ij``; when ``p < 0`` and
    ``K_jj > 0``: ``C_ij -= p / K_jj`` (``g_i^PC -= p / |g_j|^2 g_j``).
    """
    _check_pcgrad(K, orders)
    T = K.shape[-1]
    C = torch.eye(T, dtype=K.dtype, device=K.device).expand_as(K).clone()
    diag = K.diagonal(dim1=-2, dim2=-1)
    own = torch.arange(T, device=K.device)
    for s in range(T):
        j = orders[..., :, s]
        K_j = K.gather(-2, j.unsqueeze(-1).expand_as(K))
        p = (K_j * C).sum(-1)
        k_jj = diag.gather(-1, j)
        project = (p < 0) & (k_jj > 0) & (j != own)
        coef = torch.where(project, p / torch.where(project, k_jj, 1.0), 0.0)
        C = C.scatter_add(-1, j.unsqueeze(-1), -coef.unsqueeze(-1))
    return C


def pcgrad_weights(K: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """``pcgrad_weights_reference(K, orders)`` by the C++ kernel on CPU, the CUDA kernel on CUDA
    (float64, ``T <= _dispatch.CUDA_SOLVER_MAX_T``), else the reference."""
    _check_pcgrad(K, orders)
    if backend("pcgrad", K) in ("cpu", "cuda"):
        return torch.ops.mtlfast.pcgrad(K, orders)  # csrc/cuda/solvers.cu: one block/problem
    return pcgrad_weights_reference(K, orders)



_M32 = 0xFFFFFFFF


def _philox4x32_10(ctr: list[int], key: int) -> list[int]:
    """Philox4x32-10 (Salmon et al., SC 2011) in Python integers (csrc/common/philox.h's spec)."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key & _M32, (key >> 32) & _M32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _M32, p1 & _M32, ((p0 >> 32) ^ c3 ^ k1) & _M32, \
            p0 & _M32
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return [c0, c1, c2, c3]


def _check_orders_state(state: torch.Tensor) -> None:
    if not (isinstance(state, torch.Tensor) and state.dtype == torch.int64
            and state.shape == (2,) and state.is_contiguous()):
        raise ValueError("pcgrad_orders: state must be a contiguous int64 tensor [seed, step], "
                         f"got {getattr(state, 'dtype', type(state))} "
                         f"{tuple(getattr(state, 'shape', ()))}")


def pcgrad_orders_reference(state: torch.Tensor, batch: int, T: int) -> torch.Tensor:
    """PCGrad's random task orders ``(batch, T, T)`` (row i: a permutation of the T tasks for
    task i) from the counter-based state ``[seed, step]``, then ``step += 1`` in place.

    Row ``r`` of problem ``b`` is a Fisher-Yates shuffle of ``0..T-1`` (position ``j = T-1 ..
    1`` takes draw ``d = T-1-j``, index ``floor(u_d (j + 1) / 2^32)``) where ``u_d`` is word
    ``d % 4`` of Philox4x32-10 at counter ``(d // 4, r, b, step mod 2^32)`` with key
    ``seed ^ (step & ~(2^32 - 1))``. Python integers: slow, the spec of the kernels.
    """
    _check_orders_state(state)
    seed, step = (int(v) & ((1 << 64) - 1) for v in state.tolist())
    key = seed ^ (step & ~_M32 & ((1 << 64) - 1))
    out = []
    for b in range(batch):
        for r in range(T):
            order = list(range(T))
            words: list[int] = []
            for d, j in enumerate(range(T - 1, 0, -1)):
                if d % 4 == 0:
                    words = _philox4x32_10([d // 4, r, b, step & _M32], key)
                pick = (words[d % 4] * (j + 1)) >> 32
                order[j], order[pick] = order[pick], order[j]
            out.append(order)
    state[1] = state[1] + 1
    return torch.tensor(out, dtype=torch.int64, device=state.device).reshape(batch, T, T)


def pcgrad_orders(state: torch.Tensor, batch: int, T: int) -> torch.Tensor:
    """``pcgrad_orders_reference`` by the C++ kernel on CPU or the CUDA kernel on CUDA, which
    read and advance ``state`` where it lives: no host sync, and a replayed CUDA graph draws
    new orders each time. Without the extension, the reference (which reads the state)."""
    _check_orders_state(state)
    if not (isinstance(batch, int) and isinstance(T, int) and not isinstance(batch, bool)
            and not isinstance(T, bool) and 1 <= batch < 2**32 and 1 <= T < 2**32):
        raise ValueError(f"pcgrad_orders: batch and T must be positive ints, got {batch}, {T}")
    if backend("pcgrad_orders", state) in ("cpu", "cuda"):
        return torch.ops.mtlfast.pcgrad_orders(state, batch, T)
    return pcgrad_orders_reference(state, batch, T)

def _affine_simplex_path(A: torch.Tensor, a: torch.Tensor, S: torch.Tensor):
    """On the support ``S``: ``w(beta) = w0 + beta w1`` solves ``min 1/2 w^T A w + beta a^T w``
    over ``{sum w = 1, w = 0 off S}`` (two solves of the bordered KKT system)."""
    T = A.shape[-1]
    dt = A.dtype
    SS = S.unsqueeze(-1) & S.unsqueeze(-2)
    M = torch.where(SS, A, torch.eye(T, dtype=dt, device=A.device))
    s_col = S.to(dt).unsqueeze(-1)
    top = torch.cat([M, s_col], -1)
    bottom = torch.cat([s_col.transpose(-1, -2), torch.zeros_like(s_col[..., :1, :])], -1)
    rhs0 = torch.cat([torch.zeros_like(a), torch.ones_like(a[..., :1])], -1)
    rhs1 = torch.cat([torch.where(S, -a, 0.0), torch.zeros_like(a[..., :1])], -1)
    sol = torch.linalg.solve_ex(torch.cat([top, bottom], -2), torch.stack([rhs0, rhs1], -1))[0]
    w01 = torch.where(S.unsqueeze(-1), sol[..., :T, :], 0.0)
    return w01[..., 0], w01[..., 1]


def _quad(A: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * (A @ v.unsqueeze(-1)).squeeze(-1)).sum(-1)


def _check_cagrad(A: torch.Tensor, p: torch.Tensor, c: float, steps: int) -> None:
    T = _validate.gram_batch("cagrad_weights", "A", A, _F64)
    _validate.tensor("cagrad_weights", "p", p, dtypes=_F64)
    _validate.trailing_batch("cagrad_weights", "p", p, A.shape[:-2], (T,), like="A")
    _validate.same_device("cagrad_weights", A=A, p=p)
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0:
        raise ValueError(f"cagrad_weights: c must be a float >= 0, got {c!r}")
    _check_steps("cagrad_weights", "steps", steps)


def cagrad_weights(
    A: torch.Tensor, p: torch.Tensor, c: float, steps: int = CAGRAD_ROOT_STEPS
) -> torch.Tensor:
    """``cagrad_weights_reference`` by the C++ kernel on CPU or the CUDA kernel on CUDA (both the
    shared core; they stop at the fixed point), else the reference."""
    _check_cagrad(A, p, c, steps)
    if backend("cagrad", A) in ("cpu", "cuda"):
        return torch.ops.mtlfast.cagrad(A, p, float(c), steps, nnqp_steps(A.shape[-1]), DUAL_TOL)
    return cagrad_weights_reference(A, p, c, steps)


def cagrad_weights_reference(
    A: torch.Tensor, p: torch.Tensor, c: float, steps: int = CAGRAD_ROOT_STEPS
) -> torch.Tensor:
    """CAGrad's inner problem (Liu et al., NeurIPS 2021, eq. 4, dual form), exactly:
    ``w = argmin_{w in simplex} g_w . g_0 + r |g_w|``, with ``g_0 = p @ G``, ``r = c |g_0|``,
    in Gram terms ``a^T w + r sqrt(w^T A w)``, ``a = A p``. ``A (..., T, T)`` float64 PSD
    scaled to max diagonal ~1, ``p (..., T)``. Returns ``w`` ``(..., T)``.

    ``r sqrt(q) = min_{t > 0} r (q / t + t) / 2`` turns it into a convex problem in
    ``(w, t)``: for fixed ``beta = t / r``, ``w(beta) = argmin_simplex 1/2 w^T A w + beta a^T w``
    (``nnqp(simplex=True)``), and the optimum is the root of the decreasing function
    ``phi(beta) = |g_w(beta)| - r beta`` on ``[0, max_i |g_i| / r]``. On a fixed support,
    ``w(beta) = w0 + beta w1`` is affine, so ``phi`` has a closed-form root there. Each of
    ``steps`` steps, from ``beta = hi / 2``:

    1. solve the QP at ``beta``; shrink the bracket ``[lo, hi]`` by the sign of ``phi(beta)``;
    2. on the QP's support ``S = {w > 0}``, get ``w0, w1`` and the smallest positive root of
       ``|g_{w0 + beta w1}|^2 = r^2 beta^2`` (a quadratic in ``beta``);
    3. next ``beta`` = that root if it lies in ``[lo, hi]``, else the bracket's midpoint.

    Once the support is the optimal one the root is exact, and it is a fixed point. The
    answer is the QP solution at the last ``beta``. Degenerate: when ``0`` is in the hull
    (``phi(0) = 0``) the root is ``beta = 0`` and ``w`` is the min-norm point.
    """
    _check_cagrad(A, p, c, steps)
    a = (A @ p.unsqueeze(-1)).squeeze(-1)
    r = c * _quad(A, p, p).clamp_min(0).sqrt()
    max_norm = A.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(0).sqrt()
    live = r > 0
    r_safe = torch.where(live, r, 1.0)
    lo = torch.zeros_like(r)
    hi = torch.where(live, max_norm / r_safe, 1.0)
    beta = hi / 2
    for _ in range(steps):
        w = nnqp_reference(A, (beta.unsqueeze(-1) * a).unsqueeze(-2), simplex=True).squeeze(-2)
        phi = _quad(A, w, w).clamp_min(0).sqrt() - r * beta
        lo = torch.where(phi >= 0, beta, lo)
        hi = torch.where(phi <= 0, beta, hi)
        w0, w1 = _affine_simplex_path(A, a, w > 0)
        qa = _quad(A, w1, w1) - r * r
        qb = _quad(A, w0, w1)
        qc = _quad(A, w0, w0)
        disc = qb * qb - qa * qc
        root = qc / (-qb + disc.clamp_min(0).sqrt())
        ok = torch.isfinite(root) & (disc >= 0) & (root >= lo) & (root <= hi)
        beta = torch.where(ok, root, (lo + hi) / 2)
    return nnqp_reference(A, (beta.unsqueeze(-1) * a).unsqueeze(-2), simplex=True).squeeze(-2)
