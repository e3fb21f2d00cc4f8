"""T x T solves of the non-QP Gram methods (Nash-MTL, FairGrad, Aligned-MTL, ConFIG, GradVac).

Each op has a torch reference (the spec: batched over ``(..., T, T)``, fixed iteration counts,
masked updates, no host read, so it runs on any device, ``meta`` included) and one dispatch
function that picks the C++ kernel for CPU tensors when the extension is built, and for
``power_fixed_point`` / ``imtl_weights`` / ``sym_eig`` the CUDA kernels on CUDA (T up to
``_dispatch.CUDA_SOLVER_MAX_T``; csrc/common/solver_core.h is the code of both); the choice is
``_dispatch.backend``'s. The kernels compute in float64 and return the
Gram's dtype; the references compute in float64 too (float32 where the device has no float64).

- ``power_fixed_point(K, alpha, iters)``: the positive root of ``K w = w^(-1/alpha)``
  (FairGrad; Nash-MTL is ``alpha = 1``), the minimizer of the convex
  ``f(w) = 1/2 w^T K w - sum_i h(w_i)`` with ``h' = w^(-1/alpha)``, by damped Newton.
- ``imtl_weights(K)``: IMTL-G's ``v / sum v``, ``v = K^+ sqrt(diag K)`` (on the cosine matrix
  for independent gradients).
- ``sym_eig(K)``: ascending eigenvalues and eigenvectors of a symmetric K (the eigensolver of
  the references: ``torch.linalg.eigh``, or on CUDA the Jacobi kernel, which unlike eigh does not
  read its error codes back to the host).
- ``aligned_mtl_weights(K, pref, scale_mode)``: ``w = sqrt(s) V diag(1/sqrt(lambda)) V^T pref``.
- ``config_weights(K, pref)``: ConFIG's pseudo-inverse direction and projection length.
- ``gradvac_sweep(K, phi_hat, perms, beta, eps)``: GradVac's pairwise vaccine corrections.
- ``clip_update_norm(w, K, max_norm)``: Nash-MTL's clip of ``|w @ G| = sqrt(w^T K w)``.
- ``gradnorm_update(K, w, losses, initial, has_initial, alpha, lr)``: one GradNorm step.
"""

from __future__ import annotations

import torch

from . import _validate, solvers
from ._dispatch import backend

__all__ = [
    "CONFIG_NOISE",
    "IMTL_SUM_TOL",
    "SCALE_MODES",
    "aligned_mtl_weights",
    "aligned_mtl_weights_reference",
    "clip_update_norm",
    "clip_update_norm_reference",
    "config_weights",
    "config_weights_reference",
    "gradvac_sweep",
    "gradnorm_update",
    "gradnorm_update_reference",
    "gradvac_sweep_reference",
    "imtl_weights",
    "imtl_weights_reference",
    "power_fixed_point",
    "power_fixed_point_reference",
    "sym_eig",
]

SCALE_MODES = ("min", "median", "rmse")

# Newton's start uses diag(K)/||K||_F floored here: a zero row has no finite root (w_i -> inf),
# the floor only makes its (irrelevant: g_i = 0) weight large and finite.
_DIAG_FLOOR = 1e-20
# Armijo backtracking: step sizes t_max * 2^-k for k < _LINE_SEARCH, tried all at once.
_LINE_SEARCH = 10
_ARMIJO = 1e-4


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64


def _kernel(op: str, K: torch.Tensor) -> bool:
    """The compiled kernel serves ``op`` for the Gram batch K (``_dispatch.backend``)."""
    return backend(op, K) in ("cpu", "cuda")


def _check_vector(op: str, name: str, v: torch.Tensor, K: torch.Tensor) -> None:
    """``v`` is a floating ``(..., T)`` tensor with K's batch dims, on K's device."""
    _validate.tensor(op, name, v, floating=True)
    _validate.trailing_batch(op, name, v, K.shape[:-2], (K.shape[-1],))
    _validate.same_device(op, K=K, **{name: v})


def _check_pref_arg(op: str, pref: torch.Tensor | None, K: torch.Tensor) -> None:
    """``pref`` is None or a floating ``(T,)`` vector on K's device or the CPU."""
    if pref is None:
        return
    _validate.tensor(op, "pref", pref, floating=True, dim=1)
    if pref.shape[0] != K.shape[-1]:
        raise ValueError(f"{op}: pref must have shape ({K.shape[-1]},) (one entry per task), "
                         f"got {tuple(pref.shape)}")
    if pref.device.type != "cpu":
        _validate.same_device(op, K=K, pref=pref)


def _check_float(op: str, name: str, x: object, low: float = float("-inf"),
                 low_open: bool = False) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x or (
            x <= low if low_open else x < low):
        bound = f" {'>' if low_open else '>='} {low:g}" if low != float("-inf") else ""
        raise ValueError(f"{op}: {name} must be{bound} (a real number), got {x!r}")


def sym_eig(K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda, V)`` with ``K = V diag(lambda) V^T``, ascending, for symmetric ``(..., T, T)``.

    ``torch.linalg.eigh`` except on CUDA with the kernels built (float64,
    ``T <= _dispatch.CUDA_SOLVER_MAX_T``): the Jacobi kernel of csrc/cuda/solvers.cu, because
    eigh reads its error codes on the host (a sync).
    """
    _validate.gram_batch("sym_eig", "K", K)
    if backend("sym_eig", K) == "cuda":
        return torch.ops.mtlfast.sym_eig(K)
    return torch.linalg.eigh(K)


def _symmetric(K: torch.Tensor) -> torch.Tensor:
    K = K.to(_work_dtype(K))
    return (K + K.mT) / 2


def _barrier(w: torch.Tensor, p: float) -> torch.Tensor:
    """h(w) with h'(w) = w^-p: log w for p = 1, w^(1-p) / (1-p) otherwise."""
    if p == 1.0:
        return torch.log(w)
    return w.pow(1.0 - p) / (1.0 - p)


def power_fixed_point_reference(K: torch.Tensor, alpha: float, iters: int) -> torch.Tensor:
    """The spec of :func:`power_fixed_point` in torch (float64, any device, no host read)."""
    out_dtype = K.dtype
    K = _symmetric(K)
    p = 1.0 / alpha
    eps = torch.finfo(K.dtype).eps
    # Scale-free solve on K / ||K||_F; the root scales as s^(-alpha/(alpha+1)).
    s = torch.linalg.matrix_norm(K)
    s = torch.where(s > 0, s, torch.ones_like(s))
    Kn = K / s[..., None, None]
    # Start: the root when tasks are orthogonal, K_ii w_i = w_i^-p.
    w = Kn.diagonal(dim1=-2, dim2=-1).clamp_min(_DIAG_FLOOR).pow(-alpha / (alpha + 1.0))
    ts = torch.pow(0.5, torch.arange(_LINE_SEARCH, dtype=K.dtype, device=K.device))
    for _ in range(iters):
        Kw = (Kn @ w[..., None])[..., 0]
        grad = Kw - w.pow(-p)
        H = Kn + torch.diag_embed(p * w.pow(-p - 1.0))
        step = -torch.linalg.solve_ex(H, grad[..., None])[0][..., 0]
        step = torch.where(torch.isfinite(step), step, torch.zeros_like(step))
        # Every coordinate stays in [0.1 w_i, 2 w_i]: positive, and bounded growth where no
        # finite root exists (a zero row, a non-negative null vector of K).
        ratio = step / w
        shrink = torch.maximum(ratio.amax(-1), (-ratio).amax(-1) / 0.9).clamp_min(1.0)
        t = ts / shrink[..., None]  # (..., L)
        cand = w[..., None, :] + t[..., :, None] * step[..., None, :]  # (..., L, T)
        wKw = (w * Kw).sum(-1)
        sKw = (step * Kw).sum(-1)
        sKs = (step * (Kn @ step[..., None])[..., 0]).sum(-1)
        h0 = _barrier(w, p).sum(-1)
        f0 = 0.5 * wKw - h0
        f = (0.5 * (wKw[..., None] + 2 * t * sKw[..., None] + t * t * sKs[..., None])
             - _barrier(cand, p).sum(-1))
        slack = 8 * eps * (0.5 * wKw.abs() + h0.abs())
        armijo = f <= f0[..., None] + _ARMIJO * t * (grad * step).sum(-1)[..., None] \
            + slack[..., None]
        ok = armijo & torch.isfinite(f)
        first = torch.argmax(ok.to(torch.int8), dim=-1, keepdim=True)
        t_acc = torch.where(ok.any(-1, keepdim=True), t.gather(-1, first), 0.0)
        w = w + t_acc * step
    w = w * s[..., None].pow(-alpha / (alpha + 1.0))
    return w.to(out_dtype)


def power_fixed_point(K: torch.Tensor, alpha: float, iters: int) -> torch.Tensor:
    """Positive root of ``K w = w^(-1/alpha)`` for each ``(T, T)`` block of ``K``.

    Solved on ``K / ||K||_F`` by damped Newton (Armijo backtracking, ``iters`` steps; the C++
    kernel stops early once a step is below rounding), then rescaled exactly to ``K``'s root
    (which scales as ``||K||_F^(-alpha/(alpha+1))``).
    Where no finite root exists (a zero row; tasks whose non-negative combination is 0) the
    weights along that direction grow at most 2x per step and stay finite.
    """
    _validate.gram_batch("power_fixed_point", "K", K)
    _check_float("power_fixed_point", "alpha", alpha, 0.0, low_open=True)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"power_fixed_point: iters must be an int >= 1, got {iters!r}")
    if _kernel("power_fixed_point", K):
        return torch.ops.mtlfast.power_fixed_point(K, float(alpha), int(iters))
    return power_fixed_point_reference(K, alpha, iters)


#: IMTL-G: weights are 0 when ``|sum v| <= IMTL_SUM_TOL sum |v|`` (as torchjd).
IMTL_SUM_TOL = 1e-12


def _pinv_apply(M: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M^+ b, full rank)`` for symmetric PSD ``M`` ``(..., T, T)``, ``b`` ``(..., T)``: the
    pseudo-inverse drops eigenvalues at most ``T eps`` times the largest (torch.linalg.pinv's
    default)."""
    evals, evecs = sym_eig(M)
    cutoff = M.shape[-1] * torch.finfo(M.dtype).eps * evals.abs().amax(-1, keepdim=True)
    keep = evals > cutoff
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, 1.0), 0.0)
    x = ((evecs * inv.unsqueeze(-2)) @ (evecs.transpose(-1, -2) @ b.unsqueeze(-1))).squeeze(-1)
    return x, keep.all(-1)


def _normalize_sum(v: torch.Tensor, sum_tol: float) -> torch.Tensor:
    """``v / sum(v)``, or 0 when ``|sum v| <= sum_tol sum |v|``."""
    total = v.sum(-1, keepdim=True)
    ok = total.abs() > sum_tol * v.abs().sum(-1, keepdim=True)
    return torch.where(ok, v / torch.where(ok, total, 1.0), 0.0)


def _imtl_on_cosines(K: torch.Tensor, sum_tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """IMTL-G's weights from the cosine matrix, ``v = D^-1 C^-1 1`` (``= K^-1 sqrt(diag K)``),
    and whether the non-zero gradients are independent (C invertible on them), where it holds.

    Zero rows get an identity row in C and weight 0 (their ``D^-1`` is 0).
    """
    C, inv_norms = solvers.cosine_gram(K)
    C = C + torch.diag_embed((inv_norms == 0).to(C.dtype))
    y, independent = _pinv_apply(C, torch.ones_like(inv_norms))
    return _normalize_sum(inv_norms * y, sum_tol), independent


def _imtl_on_gram(K: torch.Tensor, sum_tol: float) -> torch.Tensor:
    """IMTL-G's weights ``v = K^+ sqrt(diag K)`` for dependent gradients."""
    v, _ = _pinv_apply(K, K.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt())
    return _normalize_sum(v, sum_tol)


def imtl_weights_reference(K: torch.Tensor, sum_tol: float = IMTL_SUM_TOL) -> torch.Tensor:
    """The spec of :func:`imtl_weights` (float64 ``K``, eigh, masked pseudo-inverses)."""
    w, independent = _imtl_on_cosines(K, sum_tol)
    return torch.where(independent.unsqueeze(-1), w, _imtl_on_gram(K, sum_tol))


def imtl_weights(K: torch.Tensor, sum_tol: float = IMTL_SUM_TOL) -> torch.Tensor:
    """IMTL-G's ``w = v / sum(v)``, ``v = K^+ sqrt(diag K)``, for float64 Grams ``(..., T, T)``
    scaled to max diagonal 1 (``solvers.normalize_gram``); ``w = 0`` when
    ``|sum v| <= sum_tol sum |v|``.

    Independent gradients: ``v = D^-1 C^-1 1`` on the cosine matrix ``C = D^-1 K D^-1``
    (``D = diag(sqrt K_ii)``), exact whatever the spread of the norms (K's eigenvalues span the
    squares of the norms' ratios, and a cutoff on them would drop a small task). Dependent
    gradients (C singular to ``T eps``): torchjd's ``K^+`` on the Gram, whose pseudo-inverse
    drops eigenvalues below ``T eps`` times the largest.

    CUDA (``T <= _dispatch.CUDA_SOLVER_MAX_T``): the eigendecompositions run the Jacobi kernel,
    ``K^+`` the IMTL kernel of csrc/common/solver_core.h. Elsewhere eigh (the serial Jacobi is
    O(T^3) per sweep: slower on one CPU thread from T=32, benchmarks/RESULTS.md).
    """
    _validate.gram_batch("imtl_weights", "K", K)
    _check_float("imtl_weights", "sum_tol", sum_tol, 0.0)
    w, independent = _imtl_on_cosines(K, sum_tol)
    if _kernel("imtl_weights", K):
        dependent = torch.ops.mtlfast.imtl_weights(K, float(sum_tol))
    else:
        dependent = _imtl_on_gram(K, sum_tol)
    return torch.where(independent.unsqueeze(-1), w, dependent)


def _pref(pref: torch.Tensor | None, K: torch.Tensor, fill: float) -> torch.Tensor:
    T = K.shape[-1]
    if pref is None:
        return torch.full((T,), fill, dtype=K.dtype, device=K.device)
    return pref.to(dtype=K.dtype, device=K.device)


def _cutoff(lam: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Eigenvalues above rounding noise of a Gram in ``dtype``: lam > lam_max * T * eps."""
    return lam > lam[..., -1:] * lam.shape[-1] * torch.finfo(dtype).eps


def aligned_mtl_weights_reference(
    K: torch.Tensor, pref: torch.Tensor | None, scale_mode: str
) -> torch.Tensor:
    """The spec of :func:`aligned_mtl_weights` (float64 eigh, masked rank, no host read)."""
    out_dtype = K.dtype
    Kw = _symmetric(K)
    T = Kw.shape[-1]
    pref = _pref(pref, Kw, 1.0 / T)
    lam, V = sym_eig(Kw)  # ascending
    keep = _cutoff(lam, out_dtype)
    rank = keep.sum(-1, keepdim=True)
    inv_sqrt = torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), 0.0)
    if scale_mode == "min":
        scale = torch.where(keep, lam, torch.inf).amin(-1, keepdim=True)
    elif scale_mode == "median":  # lower median of the kept (largest) eigenvalues
        idx = (T - rank + (rank - 1).div(2, rounding_mode="floor")).clamp(0, T - 1)
        scale = lam.gather(-1, idx)
    else:  # "rmse": the mean kept eigenvalue, as in the original code
        scale = torch.where(keep, lam, 0.0).sum(-1, keepdim=True) / rank.clamp_min(1)
    scale = torch.where(rank > 0, scale, 1.0)
    coef = (V.mT @ pref[..., None])[..., 0] * inv_sqrt * scale.sqrt()
    w = (V @ coef[..., None])[..., 0]
    return torch.where(rank > 0, w, pref).to(out_dtype)


def aligned_mtl_weights(
    K: torch.Tensor, pref: torch.Tensor | None = None, scale_mode: str = "min"
) -> torch.Tensor:
    """Aligned-MTL: ``w = sqrt(s) V diag(lambda^-1/2) V^T pref`` on the non-null eigenpairs of K.

    ``K = V diag(lambda) V^T``; eigenvalues at most ``lambda_max T eps`` (eps of K's dtype)
    count as zero; ``s`` is the smallest kept eigenvalue ("min"), their lower median
    ("median") or mean ("rmse"); a zero Gram gives ``w = pref`` (default ``1/T``).
    """
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"aligned_mtl_weights: scale_mode must be one of {SCALE_MODES}, "
                         f"got {scale_mode!r}")
    _validate.gram_batch("aligned_mtl_weights", "K", K)
    _check_pref_arg("aligned_mtl_weights", pref, K)
    if _kernel("aligned_mtl_weights", K):
        return torch.ops.mtlfast.aligned_mtl_weights(K, pref, SCALE_MODES.index(scale_mode))
    return aligned_mtl_weights_reference(K, pref, scale_mode)


#: ConFIG: the direction is rounding noise when ``|C C^+ pref| <= CONFIG_NOISE T eps |pref|``.
CONFIG_NOISE = 16.0


def _config_noise(num_tasks: int, dtype: torch.dtype) -> float:
    """Relative size of the rounding error of ``V^T pref`` for a Gram in ``dtype``."""
    return CONFIG_NOISE * num_tasks * torch.finfo(dtype).eps


def config_weights_reference(K: torch.Tensor, pref: torch.Tensor | None) -> torch.Tensor:
    """The spec of :func:`config_weights` (float64 eigh, no host read)."""
    out_dtype = K.dtype
    K = _symmetric(K)
    T = K.shape[-1]
    pref = _pref(pref, K, 1.0)
    cos, inv_n = solvers.cosine_gram(K)
    lam, V = sym_eig(cos)
    keep = _cutoff(lam, out_dtype)
    inv_lam = torch.where(keep, 1 / lam, 0.0)
    pref_in_V = (V.mT @ pref[..., None])[..., 0]
    beta = (V @ (pref_in_V * inv_lam)[..., None])[..., 0]
    c = inv_n * beta
    Kc = (K @ c[..., None])[..., 0]
    cKc = (c * Kc).sum(-1, keepdim=True)
    # u_i . d = (C C^+ pref)_i: when the part of pref that C represents is rounding noise, d is
    # noise too (its unit vector would be an arbitrary, conflicting direction): no update.
    represented = torch.where(keep, pref_in_V, 0.0).norm(dim=-1, keepdim=True)
    moving = (cKc > 0) & (represented > _config_noise(T, out_dtype) * pref.norm(dim=-1,
                                                                                 keepdim=True))
    w = c * Kc.sum(-1, keepdim=True) / torch.where(cKc > 0, cKc, 1.0)
    return torch.where(moving, w, 0.0).to(out_dtype)


def config_weights(K: torch.Tensor, pref: torch.Tensor | None = None) -> torch.Tensor:
    """ConFIG through the Gram: ``w = c (1^T K c) / (c^T K c)``, ``c = D^-1/2 C^+ pref``.

    ``D = diag(K)``, ``C = D^-1/2 K D^-1/2`` the cosine Gram of the unit vectors ``u_i``, so
    ``G^T c = pinv(U) pref`` is the direction with ``u_i . d = pref_i`` and the update
    ``w @ G`` is that direction's unit vector times ``sum_i g_i . unit`` (the paper's length).
    ``C^+`` drops eigenvalues at most ``lambda_max T eps``; zero rows get weight 0.
    ``w = 0`` when ``|C C^+ pref|`` (the projections ``u_i . d`` the direction achieves) is at
    most ``CONFIG_NOISE T eps |pref|``: ``pref`` is orthogonal to the range of ``C`` up to
    rounding (``g`` and ``-g``: ``pinv(U) pref = 0``), so ``d`` would be rounding noise.
    """
    _validate.gram_batch("config_weights", "K", K)
    _check_pref_arg("config_weights", pref, K)
    if _kernel("config_weights", K):
        return torch.ops.mtlfast.config_weights(K, pref)
    return config_weights_reference(K, pref)


def gradvac_sweep_reference(
    K: torch.Tensor, phi_hat: torch.Tensor, perms: torch.Tensor, beta: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec of :func:`gradvac_sweep`: all tasks i at once, T - 1 sequential pair steps."""
    out_dtype = K.dtype
    K = _symmetric(K)
    phi = phi_hat.to(K.dtype).clone()
    T = K.shape[-1]
    batch = K.shape[:-2]
    perms = perms.to(K.device)
    orders = perms + (perms >= torch.arange(T, device=K.device)[:, None])  # tasks j != i
    C = torch.eye(T, dtype=K.dtype, device=K.device).expand(*batch, T, T).clone()
    cK = K.clone()  # row i: (g_i^PC . g_k)_k = C[i] @ K
    sq_norm = K.diagonal(dim1=-2, dim2=-1).clamp_min(0)
    for s in range(T - 1):
        j = orders[:, s].expand(*batch, T)[..., None]  # task visited by each i at step s
        dot = cK.gather(-1, j)[..., 0]
        norm_i = (cK * C).sum(-1).clamp_min(0).sqrt()
        norm_j = sq_norm.gather(-1, j[..., 0]).sqrt()
        cos = dot / (norm_i * norm_j + eps)
        target = phi.gather(-1, j)[..., 0]
        sin_cos = (1 - cos * cos).clamp_min(0).sqrt()
        sin_target = (1 - target * target).clamp_min(0).sqrt()
        coef = norm_i * (target * sin_cos - cos * sin_target) / (norm_j * sin_target + eps)
        coef = torch.where(cos < target, coef, 0.0)
        C.scatter_add_(-1, j, coef[..., None])
        Kj = K.gather(-2, j.expand(*batch, T, T))  # row j_i of K for each i
        cK = cK + coef[..., None] * Kj
        phi.scatter_(-1, j, ((1 - beta) * target + beta * cos)[..., None])
    return C.sum(-2).to(out_dtype), phi.to(phi_hat.dtype)


def gradvac_sweep(
    K: torch.Tensor, phi_hat: torch.Tensor, perms: torch.Tensor, beta: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GradVac (Wang et al. 2021) on each ``(T, T)`` block: ``(w, new phi_hat)``.

    For each task i, visiting the others j in the order ``perms[i]`` (``(T, T-1)``, shared by
    all blocks; ``perms[i]`` permutes positions in the list ``[j for j in range(T) if j != i]``,
    i.e. ``j = p + (p >= i)``, as torchjd's ``randperm``):
    ``cos = g_i^PC . g_j / (|g_i^PC| |g_j| + eps)``; when ``cos < phi_hat[i, j]``,
    ``g_i^PC += |g_i^PC| (phi_hat sqrt(1-cos^2) - cos sqrt(1-phi_hat^2)) /
    (|g_j| sqrt(1-phi_hat^2) + eps) g_j``; always ``phi_hat[i,j] <- (1-beta) phi_hat + beta cos``.
    ``w = sum_i c_i`` where ``g_i^PC = c_i @ G``.
    """
    T = _validate.gram_batch("gradvac_sweep", "K", K)
    _validate.tensor("gradvac_sweep", "phi_hat", phi_hat, floating=True)
    _validate.trailing_batch("gradvac_sweep", "phi_hat", phi_hat, K.shape[:-2], (T, T))
    _validate.same_device("gradvac_sweep", K=K, phi_hat=phi_hat)
    _validate.tensor("gradvac_sweep", "perms", perms)
    if perms.dtype.is_floating_point or perms.dtype.is_complex or perms.dtype == torch.bool:
        raise TypeError(f"gradvac_sweep: perms must be an integer tensor, got {perms.dtype}")
    if perms.shape != (T, T - 1):
        raise ValueError(f"gradvac_sweep: perms must have shape ({T}, {T - 1}), "
                         f"got {tuple(perms.shape)}")
    # The entries' range is checked by the C++ kernel (RuntimeError), not here: reading them
    # would be a host read in a step that must make none.
    if perms.device.type != "cpu":
        _validate.same_device("gradvac_sweep", K=K, perms=perms)
    _check_float("gradvac_sweep", "beta", beta)
    _check_float("gradvac_sweep", "eps", eps)
    if _kernel("gradvac_sweep", K):
        return torch.ops.mtlfast.gradvac_sweep(K, phi_hat, perms.to(torch.int64),
                                               float(beta), float(eps))
    return gradvac_sweep_reference(K, phi_hat, perms, beta, eps)


def clip_update_norm_reference(w: torch.Tensor, K: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The spec of :func:`clip_update_norm`."""
    norm = (w * (K @ w[..., None])[..., 0]).sum(-1, keepdim=True).clamp_min(0).sqrt()
    return w * torch.where(norm > max_norm, max_norm / norm, 1.0)


def clip_update_norm(w: torch.Tensor, K: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``w * min(1, max_norm / |w @ G|)`` with ``|w @ G| = sqrt(w^T K w)``, per block."""
    _validate.gram_batch("clip_update_norm", "K", K)
    _check_vector("clip_update_norm", "w", w, K)
    _check_float("clip_update_norm", "max_norm", max_norm, 0.0)
    if _kernel("clip_update_norm", K):
        return torch.ops.mtlfast.clip_update_norm(w, K, float(max_norm))
    return clip_update_norm_reference(w, K, max_norm)


def gradnorm_update_reference(
    K: torch.Tensor, w: torch.Tensor, losses: torch.Tensor | None, initial: torch.Tensor,
    has_initial: torch.Tensor, alpha: float, lr: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The spec of :func:`gradnorm_update` (no host read)."""
    norms = K.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    weighted = w * norms
    target = weighted.mean(-1, keepdim=True)
    if losses is not None:
        losses = losses.to(w.dtype).expand(w.shape)
        initial = torch.where(has_initial, initial, losses)
        has_initial = torch.ones_like(has_initial)
        ratio = torch.where(initial != 0, losses / initial, 1.0)
        mean_ratio = ratio.mean(-1, keepdim=True)
        rel = torch.where(mean_ratio > 0, ratio / mean_ratio, 1.0).clamp_min(0)
        target = target * rel.pow(alpha)
    mean_norm = norms.mean(-1, keepdim=True)
    step = norms * torch.sign(weighted - target) / torch.where(mean_norm > 0, mean_norm, 1.0)
    new = (w - lr * step).clamp_min(0)
    total = new.sum(-1, keepdim=True)
    new = torch.where(total > 0, new * (w.shape[-1] / total), 1.0)
    return new, initial, has_initial


def gradnorm_update(
    K: torch.Tensor, w: torch.Tensor, losses: torch.Tensor | None, initial: torch.Tensor,
    has_initial: torch.Tensor, alpha: float, lr: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One GradNorm step on task weights ``w`` (``(..., T)``): ``(new w, L(0), has L(0))``.

    ``|g_i| = sqrt(K_ii)``; ``target_i = mean(w |g|) r_i^alpha`` with
    ``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))`` (``r = 1`` without losses; ``L(0)`` is
    taken from ``losses`` where ``has_initial`` is False); then
    ``w_i <- max(w_i - lr |g_i| sign(w_i |g_i| - target_i) / mean|g|, 0)`` renormalized to
    sum T (all ones if everything hit 0).
    """
    op = "gradnorm_update"
    T = _validate.gram_batch(op, "K", K)
    _check_vector(op, "w", w, K)
    _check_vector(op, "initial", initial, K)
    _validate.tensor(op, "has_initial", has_initial, dtypes=(torch.bool,))
    _validate.trailing_batch(op, "has_initial", has_initial, K.shape[:-2], (1,))
    _validate.same_device(op, K=K, has_initial=has_initial)
    if losses is not None:
        _validate.tensor(op, "losses", losses, floating=True)
        if losses.dim() > w.dim() or any(a not in (1, b) for a, b in zip(
                losses.shape[::-1], w.shape[::-1], strict=False)) or losses.shape[-1:] != (T,):
            raise ValueError(f"{op}: losses must have shape (..., {T}) broadcasting to w's "
                             f"{tuple(w.shape)}, got {tuple(losses.shape)}")
        _validate.same_device(op, K=K, losses=losses)
    _check_float(op, "alpha", alpha, 0.0)
    _check_float(op, "lr", lr)
    if _kernel(op, K):
        return torch.ops.mtlfast.gradnorm_update(K, w, losses, initial, has_initial,
                                                 float(alpha), float(lr))
    return gradnorm_update_reference(K, w, losses, initial, has_initial, alpha, lr)
