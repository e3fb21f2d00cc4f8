"""C++ kernels of ops/solvers_nonlinear.py against their torch references, and the references
on the equations they solve."""

import pytest
import torch

from mtlfast import _ext
from mtlfast.ops import solvers_nonlinear as S
from tests.conftest import devices, rel_err

needs_ext = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="C++ extension not built")

TASKS = [1, 2, 3, 7, 17, 32]


def _gram(T, P=None, batch=(), dtype=torch.float64, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    P = P or 3 * T + 5
    if rank is None:
        G = torch.randn(*batch, T, P, generator=g, dtype=torch.float64)
    else:
        G = (torch.randn(*batch, T, rank, generator=g, dtype=torch.float64)
             @ torch.randn(*batch, rank, P, generator=g, dtype=torch.float64))
    G = G * torch.rand(*batch, T, 1, generator=g, dtype=torch.float64).add(0.2)
    K = G @ G.mT
    return K.to(dtype)


@needs_ext
@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_power_fixed_point_kernel_matches_reference(T, dtype, alpha):
    K = _gram(T, batch=(3,), dtype=dtype, seed=T)
    got = torch.ops.mtlfast.power_fixed_point(K, alpha, 25)
    ref = S.power_fixed_point_reference(K, alpha, 25)
    assert got.dtype == dtype and got.shape == (3, T)
    assert rel_err(got, ref) < (1e-6 if dtype == torch.float32 else 1e-11)


@needs_ext
@pytest.mark.parametrize("case", ["zero_row", "rank_deficient", "all_conflicting", "mixed"])
def test_power_fixed_point_kernel_degenerate(case):
    G = torch.randn(6, 30, dtype=torch.float64)
    if case == "zero_row":
        G[2] = 0
    elif case == "rank_deficient":
        G = torch.randn(6, 2, dtype=torch.float64) @ torch.randn(2, 30, dtype=torch.float64)
    elif case == "all_conflicting":
        G = torch.stack([G[0], -G[0]])
    else:
        G = G * torch.logspace(-6, 6, 6, dtype=torch.float64)[:, None]
    K = G @ G.T
    got = torch.ops.mtlfast.power_fixed_point(K, 1.0, 20)
    ref = S.power_fixed_point_reference(K, 1.0, 20)
    assert torch.isfinite(got).all() and (got > 0).all()
    assert torch.isfinite(ref).all() and (ref > 0).all()
    # Same update where a root exists; where none does both grow without changing w @ G much.
    torch.testing.assert_close(got @ G, ref @ G, rtol=1e-6, atol=1e-9 * (ref @ G).norm())


@pytest.mark.parametrize("T", [2, 5, 16])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_power_fixed_point_reference_solves_equation(T, alpha):
    K = _gram(T, seed=T)
    w = S.power_fixed_point_reference(K, alpha, 25)
    assert (w > 0).all()
    rhs = w.pow(-1 / alpha)
    assert ((K @ w - rhs).norm() / rhs.norm()) < 1e-10


@pytest.mark.parametrize("device", devices())
def test_reference_runs_on_device(device):
    K = _gram(5).to(device)
    for w in [S.power_fixed_point_reference(K, 1.0, 20),
              S.aligned_mtl_weights_reference(K, None, "min"),
              S.config_weights_reference(K, None)]:
        assert w.device == K.device and torch.isfinite(w).all()


@needs_ext
@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", S.SCALE_MODES)
@pytest.mark.parametrize("rank", [None, 2])
def test_aligned_mtl_kernel_matches_reference(T, dtype, mode, rank):
    K = _gram(T, batch=(2,), dtype=dtype, seed=T, rank=rank)
    pref = torch.rand(T, dtype=dtype).add(0.1)
    got = torch.ops.mtlfast.aligned_mtl_weights(K, pref, S.SCALE_MODES.index(mode))
    ref = S.aligned_mtl_weights_reference(K, pref, mode)
    assert got.dtype == dtype and got.shape == (2, T)
    assert rel_err(got, ref) < (1e-5 if dtype == torch.float32 else 1e-9)


@needs_ext
@pytest.mark.parametrize("T", TASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank", [None, 2])
def test_config_kernel_matches_reference(T, dtype, rank):
    K = _gram(T, batch=(2,), dtype=dtype, seed=T + 1, rank=rank)
    pref = torch.rand(T, dtype=dtype).add(0.1)
    got = torch.ops.mtlfast.config_weights(K, pref)
    ref = S.config_weights_reference(K, pref)
    assert got.dtype == dtype and got.shape == (2, T)
    assert rel_err(got, ref) < (1e-5 if dtype == torch.float32 else 1e-9)


@needs_ext
@pytest.mark.parametrize("T", [1, 2, 3, 7, 17, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradvac_kernel_matches_reference(T, dtype):
    g = torch.Generator().manual_seed(T)
    K = _gram(T, batch=(3,), dtype=dtype, seed=T)
    phi = (torch.rand(3, T, T, generator=g, dtype=torch.float64) * 1.6 - 0.6).to(dtype)
    orders = torch.rand(T, T - 1, generator=g).argsort(-1)
    w, phi_new = torch.ops.mtlfast.gradvac_sweep(K, phi, orders, 0.3, 1e-8)
    w_ref, phi_ref = S.gradvac_sweep_reference(K, phi, orders, 0.3, 1e-8)
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    assert w.dtype == dtype and phi_new.dtype == dtype
    assert rel_err(w, w_ref) < tol and rel_err(phi_new, phi_ref) < tol


@needs_ext
def test_kernels_reject_bad_shapes():
    with pytest.raises(RuntimeError, match="pref must have shape"):
        torch.ops.mtlfast.config_weights(torch.eye(3, dtype=torch.float64), torch.ones(4))
    with pytest.raises(RuntimeError, match="perms must hold positions"):
        torch.ops.mtlfast.gradvac_sweep(torch.eye(2), torch.zeros(2, 2),
                                        torch.tensor([[0], [1]]), 0.5, 1e-8)
    with pytest.raises(ValueError, match="perms must have shape"):
        S.gradvac_sweep(torch.eye(3), torch.zeros(3, 3), torch.zeros(3, 1, dtype=torch.long),
                        0.5, 1e-8)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        S.power_fixed_point(torch.eye(3), 0.0, 5)


@needs_ext
@pytest.mark.parametrize("T", [1, 3, 32])
def test_default_pref_kernels_match_reference(T):
    K = _gram(T, batch=(2,), seed=T)
    for mode in S.SCALE_MODES:
        got = torch.ops.mtlfast.aligned_mtl_weights(K, None, S.SCALE_MODES.index(mode))
        assert rel_err(got, S.aligned_mtl_weights_reference(K, None, mode)) < 1e-9
    assert rel_err(torch.ops.mtlfast.config_weights(K, None),
                   S.config_weights_reference(K, None)) < 1e-9


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_update_norm_kernel_matches_reference(dtype):
    K = _gram(5, batch=(3,), dtype=dtype)
    w = torch.rand(3, 5, dtype=dtype).add(0.1)
    norms = (w * (K @ w[..., None])[..., 0]).sum(-1).sqrt()
    max_norm = float(norms[1])  # block 0 or 2 clipped or not, block 1 at the boundary
    got = torch.ops.mtlfast.clip_update_norm(w, K, max_norm)
    assert got.dtype == dtype
    torch.testing.assert_close(got, S.clip_update_norm_reference(w, K, max_norm))


@needs_ext
@pytest.mark.parametrize("T", [1, 4, 32])
@pytest.mark.parametrize("with_losses", [True, False])
def test_gradnorm_update_kernel_matches_reference(T, with_losses):
    K = _gram(T, batch=(2,), seed=T)
    w = torch.rand(2, T, dtype=torch.float64).add(0.5)
    initial = torch.rand(2, T, dtype=torch.float64).add(0.5)
    has = torch.tensor([[True], [False]])
    losses = torch.rand(T, dtype=torch.float64).add(0.5) if with_losses else None
    got = torch.ops.mtlfast.gradnorm_update(K, w, losses, initial, has, 1.5, 0.1)
    ref = S.gradnorm_update_reference(K, w, losses, initial, has, 1.5, 0.1)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
