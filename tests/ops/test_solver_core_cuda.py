"""The CUDA solver kernels (csrc/cuda/solvers.cu, the shared core on a thread block) against the
torch references on random batched Grams at ragged T (rank-deficient ones included), without a
host sync, with clear errors on bad input and the torch fallback beyond T = 64."""

import pytest
import torch

from mtlfast import _ext
from mtlfast.ops import solvers
from mtlfast.ops import solvers_nonlinear as S
from tests.conftest import rel_err
from tests.ops.test_solver_core import T_RAGGED, check_eig, gram_batch, qp_rhs

from ..conftest import no_host_sync

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="CUDA kernels not built"),
]


def _cuda_gram(T, rank, seed):
    return gram_batch(T, batch=(4,), rank=rank, seed=seed, device="cuda")


@pytest.mark.parametrize("T", T_RAGGED)
@pytest.mark.parametrize("simplex", [False, True])
@pytest.mark.parametrize("rank", [None, 2])
def test_cuda_nnqp(T, simplex, rank):
    K = _cuda_gram(T, rank, T)
    b = qp_rhs(K, simplex, seed=T)
    got = solvers.nnqp(K, b, simplex)
    ref = solvers.nnqp_reference(K, b, simplex)  # torch ops on the GPU
    assert got.device.type == "cuda"
    if rank is None:
        assert rel_err(got, ref) < 1e-9
    else:  # x is not unique when K is singular; K x (G^T x: the update) is
        assert rel_err(K @ got.mT, K @ ref.mT) < 1e-8


@pytest.mark.parametrize("T", T_RAGGED)
@pytest.mark.parametrize("rank", [None, 2])
def test_cuda_cagrad(T, rank):
    K = _cuda_gram(T, rank, T)
    p = torch.full(K.shape[:-1], 1.0 / T, dtype=torch.float64, device="cuda")
    got = solvers.cagrad_weights(K, p, 0.4)
    ref = solvers.cagrad_weights_reference(K, p, 0.4)
    # K w: the update's direction (w itself is not unique when K is singular)
    assert rel_err(K @ got[..., None], K @ ref[..., None]) < 1e-8


@pytest.mark.parametrize("T", T_RAGGED)
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_power_fixed_point(T, alpha, dtype):
    K = _cuda_gram(T, None, T).to(dtype)
    got = S.power_fixed_point(K, alpha, 20)
    ref = S.power_fixed_point_reference(K.double(), alpha, 20)
    assert got.dtype == dtype
    assert rel_err(got, ref) < (1e-9 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("T", T_RAGGED)
@pytest.mark.parametrize("rank", [None, 1, 3])
def test_cuda_imtl_and_eig(T, rank):
    K = _cuda_gram(T, rank, T)
    ref = S.imtl_weights_reference(K.cpu())  # LAPACK's eigh (on CUDA it would be the kernel)
    assert rel_err(S.imtl_weights(K), ref) < 1e-8
    lam, V = S.sym_eig(K)
    check_eig(K, lam, V)


@pytest.mark.parametrize("T", [8, 32])
def test_cuda_solvers_are_sync_free(T):
    K = _cuda_gram(T, None, 0)
    p = torch.full(K.shape[:-1], 1.0 / T, dtype=torch.float64, device="cuda")
    b = qp_rhs(K, False)
    with no_host_sync():
        solvers.nnqp(K, b)
        solvers.nnqp(K, b[..., :1, :], simplex=True)
        solvers.cagrad_weights(K, p, 0.4)
        S.power_fixed_point(K, 1.0, 20)
        S.imtl_weights(K)
        S.sym_eig(K)


def test_cuda_rejects_bad_input():
    K = _cuda_gram(4, None, 0)
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.mtlfast.imtl_weights(K.float(), 1e-12)
    with pytest.raises(RuntimeError, match="T <= 64"):
        torch.ops.mtlfast.sym_eig(torch.eye(65, dtype=torch.float64, device="cuda"))
    with pytest.raises(RuntimeError, match="b must have shape"):
        torch.ops.mtlfast.nnqp(K, K[..., :1], False, 10, 1e-12)


def test_cuda_beyond_64_falls_back_to_reference():
    K = gram_batch(70, seed=1).cuda()
    b = qp_rhs(K, False)
    assert rel_err(solvers.nnqp(K, b), solvers.nnqp_reference(K, b)) < 1e-9
