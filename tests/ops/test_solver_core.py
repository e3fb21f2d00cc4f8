"""The shared solver core (csrc/common/solver_core.h): the C++ ops built on it and the same code
on a team of several CPU threads (the parallel paths the CUDA kernels take: strided loops, owned
entries, barriers, reductions), against the torch references on random batched Grams at ragged
T, rank-deficient ones included. The CUDA kernels: test_solver_core_cuda.py.

The team ops (csrc/test/solver_team_check.cpp) are test code, not part of mtlfast._C: the first
test that needs them builds them into a small extension of their own (about a minute, cached
under build/test_ext, rebuilt only when the sources change)."""

import functools
import glob
import hashlib
import os
import shutil

import pytest
import torch

from mtlfast import _ext
from mtlfast.ops import solvers
from mtlfast.ops import solvers_nonlinear as S
from tests.conftest import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_core = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="C++ extension not built")


@functools.cache
def _team_ops_missing() -> str:
    """Build and load the team ops once; the reason they are unavailable, or ""."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler to build the team-check extension"
    from torch.utils.cpp_extension import load

    source = os.path.join(ROOT, "csrc", "test", "solver_team_check.cpp")
    # torch's JIT cache keys on the .cpp alone; the headers it includes go into the name.
    digest = hashlib.sha1()
    for path in [source, *sorted(glob.glob(os.path.join(ROOT, "csrc", "common", "*.h")))]:
        with open(path, "rb") as f:
            digest.update(f.read())
    build_dir = os.path.join(ROOT, "build", "test_ext")
    os.makedirs(build_dir, exist_ok=True)
    try:
        load(name=f"mtlfast_team_check_{digest.hexdigest()[:12]}", sources=[source],
             extra_cflags=["-O1", "-std=c++20"], build_directory=build_dir,
             is_python_module=False, verbose=False)
    except (OSError, RuntimeError, ImportError) as exc:
        return f"could not build the team-check extension: {str(exc).splitlines()[0]}"
    return ""


@pytest.fixture
def team():
    """``torch.ops.mtlfast_test``: the solver core on a team of CPU threads."""
    missing = _team_ops_missing()
    if missing:
        pytest.skip(missing)
    return torch.ops.mtlfast_test


T_RAGGED = [1, 2, 3, 7, 32, 64]


def gram_batch(T, batch=(), rank=None, seed=0, device="cpu"):
    """A float64 Gram batch (..., T, T) scaled to max diagonal 1; ``rank`` < T: rank-deficient."""
    g = torch.Generator().manual_seed(seed)
    r = T + 3 if rank is None else rank
    G = torch.randn(*batch, T, r, generator=g, dtype=torch.float64)
    G = G * torch.logspace(-1, 1, T, dtype=torch.float64)[:, None]  # rows of different norms
    K, _ = solvers.normalize_gram(G @ G.mT)
    return K.to(device)


def qp_rhs(K, simplex, seed=0):
    """UPGrad-like (non-negative) or MGDA/CAGrad-like (simplex) linear terms, (..., 2, T)."""
    g = torch.Generator().manual_seed(seed + 1)
    u = torch.rand(*K.shape[:-1], generator=g, dtype=torch.float64).to(K.device)
    if simplex:
        b = torch.stack([-u, (K @ u[..., None])[..., 0]], -2)
    else:
        # in the range of K (the non-negative QP is bounded), mixed signs: some bounds active
        b = torch.stack([(K @ (u - 0.6)[..., None])[..., 0], 0.3 * K[..., 0, :]], -2)
    return b


def _team_cases(tasks=(1, 2, 3, 7, 17)):
    # 2 threads: every other index; 5: more ranks than indices for small T (idle ranks).
    return [(T, threads) for T in tasks for threads in (2, 5)]


# -- the core on a team of CPU threads (the code path of a thread block) ------------------------

@needs_core
@pytest.mark.parametrize("T,threads", _team_cases())
@pytest.mark.parametrize("simplex", [False, True])
@pytest.mark.parametrize("rank", [None, 2])
def test_team_nnqp_matches_reference(team, T, threads, simplex, rank):
    K = gram_batch(T, rank=min(rank or T + 3, T + 3), seed=T)
    b = qp_rhs(K, simplex, seed=T)
    ref = solvers.nnqp_reference(K, b, simplex)
    got = team.team_nnqp(K, b, simplex, solvers.nnqp_steps(T), solvers.DUAL_TOL,
                                      threads)
    serial = torch.ops.mtlfast.nnqp(K, b, simplex, solvers.nnqp_steps(T), solvers.DUAL_TOL)
    assert rel_err(got, ref) < 1e-9
    assert rel_err(got, serial) < 1e-12


@needs_core
@pytest.mark.parametrize("T", [2, 3, 7])  # the reference is slow: one team size, one problem
@pytest.mark.parametrize("rank", [None, 2])
def test_team_cagrad_matches_reference(team, T, rank):
    threads = 3
    K = gram_batch(T, rank=rank, seed=T)
    p = torch.full(K.shape[:-1], 1.0 / T, dtype=torch.float64)
    ref = solvers.cagrad_weights_reference(K, p, 0.4)
    got = team.team_cagrad(K, p, 0.4, solvers.CAGRAD_ROOT_STEPS,
                                        solvers.nnqp_steps(T), solvers.DUAL_TOL, threads)
    # K w: the update's direction (w itself is not unique when K is singular)
    assert rel_err(K @ got[..., None], K @ ref[..., None]) < 1e-8


@needs_core
@pytest.mark.parametrize("T,threads", _team_cases())
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_team_power_fixed_point_matches_reference(team, T, threads, alpha):
    K = gram_batch(T, batch=(2,), seed=T)
    ref = S.power_fixed_point_reference(K, alpha, 20)
    got = team.team_power_fixed_point(K, alpha, 20, threads)
    assert rel_err(got, ref) < 1e-9


@needs_core
@pytest.mark.parametrize("T,threads", _team_cases())
@pytest.mark.parametrize("rank", [None, 2])
def test_team_imtl_and_eig_match_reference(team, T, threads, rank):
    K = gram_batch(T, batch=(2,), rank=rank, seed=T)
    ref = S.imtl_weights_reference(K)
    assert rel_err(team.team_imtl_weights(K, S.IMTL_SUM_TOL, threads), ref) < 1e-8
    lam, V = team.team_sym_eig(K, threads)
    check_eig(K, lam, V)


# -- the C++ ops (the core on one thread) -----------------------------------------------------

def check_eig(K, lam, V):
    ref = torch.linalg.eigvalsh(K)
    scale = ref.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    assert ((lam - ref).abs() / scale).max() < 1e-12
    assert torch.all(lam[..., 1:] >= lam[..., :-1])
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    assert (V.mT @ V - eye).abs().max() < 1e-12
    assert ((V * lam[..., None, :]) @ V.mT - K).abs().max() < 1e-12 * scale.max()


@needs_core
@pytest.mark.parametrize("T", T_RAGGED)
@pytest.mark.parametrize("rank", [None, 1, 3])
def test_serial_imtl_weights_matches_reference(team, T, rank):
    if rank is not None and rank >= T:
        pytest.skip("full rank already covered")
    K = gram_batch(T, batch=(3,), rank=rank, seed=T)
    ref = S.imtl_weights_reference(K)
    got = team.team_imtl_weights(K, S.IMTL_SUM_TOL, 1)
    assert rel_err(got, ref) < 1e-8
    assert torch.allclose(got.sum(-1), torch.ones(3, dtype=torch.float64)) or T == 1


@needs_core
@pytest.mark.parametrize("T", T_RAGGED)
@pytest.mark.parametrize("rank", [None, 2])
def test_serial_sym_eig(team, T, rank):
    K = gram_batch(T, batch=(2,), rank=rank, seed=T)
    lam, V = team.team_sym_eig(K, 1)
    check_eig(K, lam, V)


@needs_core
def test_serial_sym_eig_zero_and_diagonal(team):
    K = torch.zeros(2, 5, 5, dtype=torch.float64)
    K[1] = torch.diag(torch.tensor([3.0, -1.0, 2.0, 0.0, 2.0], dtype=torch.float64))
    lam, V = team.team_sym_eig(K, 1)
    check_eig(K, lam, V)
