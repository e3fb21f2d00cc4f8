"""Adversarial inputs for every public op that can reach a kernel: wrong ranks, mismatched batch
shapes (off by one and far off), wrong dtypes, empty tensors, non-contiguous and expanded
views, mixed devices (cpu vs meta), NaN/Inf. Each case expects a clean ValueError/TypeError or
a correct result. The cases run in this process on purpose: a kernel that reads out of bounds
and crashes takes the whole test run down with it."""

from __future__ import annotations

import pytest
import torch

from mtlfast import ops
from mtlfast.ops import solvers
from mtlfast.ops import solvers_nonlinear as S

F64 = torch.float64


def _gram(T: int = 3, batch: tuple[int, ...] = (), dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(T)
    G = torch.randn(*batch, T, T + 2, generator=g, dtype=F64)
    K, _ = solvers.normalize_gram(G @ G.mT)
    return K.to(dtype)


def _orders(T: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    return torch.arange(T).expand(*batch, T, T).contiguous()


def _perms(T: int) -> torch.Tensor:
    return torch.arange(T - 1).expand(T, T - 1).contiguous()


def _gradnorm(K, w=None, losses=None, initial=None, has=None):
    batch = K.shape[:-2]
    T = K.shape[-1]
    w = torch.ones(*batch, T, dtype=F64) if w is None else w
    initial = torch.ones(*batch, T, dtype=F64) if initial is None else initial
    has = torch.zeros(*batch, 1, dtype=torch.bool) if has is None else has
    return S.gradnorm_update(K, w, losses, initial, has, 1.5, 0.1)


B2 = (2,)
BIG = (4096,)
# name -> (call on valid inputs of batch B2, list of (case id, call, expected error))
BAD_CASES: list[tuple[str, object, type[Exception]]] = [
    # gram
    ("gram rank 1", lambda: ops.gram(torch.ones(5)), ValueError),
    ("gram rank 3", lambda: ops.gram(torch.ones(2, 3, 4)), ValueError),
    ("gram int", lambda: ops.gram(torch.ones(2, 3, dtype=torch.int32)), TypeError),
    ("gram empty", lambda: ops.gram(torch.ones(0, 3)), ValueError),
    ("gram list", lambda: ops.gram([[1.0]]), TypeError),
    # combine
    ("combine w rank", lambda: ops.combine(torch.ones(3, 1), torch.ones(3, 5)), ValueError),
    ("combine w short", lambda: ops.combine(torch.ones(2), torch.ones(3, 5)), ValueError),
    ("combine w long", lambda: ops.combine(torch.ones(4000), torch.ones(3, 5)), ValueError),
    ("combine out short", lambda: ops.combine(torch.ones(3), torch.ones(3, 5), torch.ones(4)),
     ValueError),
    ("combine out long", lambda: ops.combine(torch.ones(3), torch.ones(3, 5),
                                             torch.ones(100000)), ValueError),
    ("combine int G", lambda: ops.combine(torch.ones(3), torch.ones(3, 5, dtype=torch.int64)),
     TypeError),
    ("combine int w", lambda: ops.combine(torch.ones(3, dtype=torch.int64), torch.ones(3, 5)),
     TypeError),
    ("combine int out", lambda: ops.combine(torch.ones(3), torch.ones(3, 5),
                                            torch.ones(5, dtype=torch.int32)), TypeError),
    ("combine meta w", lambda: ops.combine(torch.ones(3, device="meta"), torch.ones(3, 5)),
     ValueError),
    ("combine meta out", lambda: ops.combine(torch.ones(3), torch.ones(3, 5),
                                             torch.ones(5, device="meta")), ValueError),
    ("combine scale 2", lambda: ops.combine(torch.ones(3), torch.ones(3, 5),
                                            scale=torch.ones(2)), ValueError),
    ("combine scale meta", lambda: ops.combine(torch.ones(3), torch.ones(3, 5),
                                               scale=torch.ones((), device="meta")), ValueError),
    # graddrop
    ("graddrop G rank", lambda: ops.graddrop(torch.ones(5), torch.rand(5)), ValueError),
    ("graddrop u short", lambda: ops.graddrop(torch.ones(2, 5), torch.rand(4)), ValueError),
    ("graddrop u long", lambda: ops.graddrop(torch.ones(2, 5), torch.rand(10**6)), ValueError),
    ("graddrop leak long", lambda: ops.graddrop(torch.ones(2, 5), torch.rand(5), torch.rand(999)),
     ValueError),
    ("graddrop int u", lambda: ops.graddrop(torch.ones(2, 5), torch.ones(5, dtype=torch.int64)),
     TypeError),
    ("graddrop meta u", lambda: ops.graddrop(torch.ones(2, 5), torch.rand(5, device="meta")),
     ValueError),
    # nnqp
    ("nnqp A rank", lambda: solvers.nnqp(torch.ones(3, dtype=F64), torch.ones(1, 3, dtype=F64)),
     ValueError),
    ("nnqp A square", lambda: solvers.nnqp(torch.ones(3, 4, dtype=F64),
                                           torch.ones(1, 4, dtype=F64)), ValueError),
    ("nnqp b batch small", lambda: solvers.nnqp(_gram(3, B2), torch.ones(3, 1, 3, dtype=F64)),
     ValueError),
    ("nnqp b batch large", lambda: solvers.nnqp(_gram(3, B2), torch.ones(*BIG, 1, 3, dtype=F64)),
     ValueError),
    ("nnqp b T", lambda: solvers.nnqp(_gram(3), torch.ones(1, 4, dtype=F64)), ValueError),
    ("nnqp b rank", lambda: solvers.nnqp(_gram(3), torch.ones(3, dtype=F64)), ValueError),
    ("nnqp float32", lambda: solvers.nnqp(_gram(3, dtype=torch.float32),
                                          torch.ones(1, 3)), TypeError),
    ("nnqp int b", lambda: solvers.nnqp(_gram(3), torch.ones(1, 3, dtype=torch.int64)), TypeError),
    ("nnqp T=0", lambda: solvers.nnqp(torch.ones(0, 0, dtype=F64), torch.ones(1, 0, dtype=F64)),
     ValueError),
    ("nnqp meta b", lambda: solvers.nnqp(_gram(3), torch.ones(1, 3, dtype=F64, device="meta")),
     ValueError),
    ("nnqp steps", lambda: solvers.nnqp(_gram(3), torch.ones(1, 3, dtype=F64), steps=-1),
     ValueError),
    # cagrad
    ("cagrad p batch small", lambda: solvers.cagrad_weights(_gram(3, B2),
                                                            torch.ones(3, 3, dtype=F64), 0.4),
     ValueError),
    ("cagrad p batch large", lambda: solvers.cagrad_weights(_gram(3, B2),
                                                            torch.ones(*BIG, 3, dtype=F64), 0.4),
     ValueError),
    ("cagrad p T", lambda: solvers.cagrad_weights(_gram(3), torch.ones(4, dtype=F64), 0.4),
     ValueError),
    ("cagrad float32", lambda: solvers.cagrad_weights(_gram(3, dtype=torch.float32),
                                                      torch.ones(3), 0.4), TypeError),
    ("cagrad meta p", lambda: solvers.cagrad_weights(_gram(3), torch.ones(3, dtype=F64,
                                                                           device="meta"), 0.4),
     ValueError),
    ("cagrad c", lambda: solvers.cagrad_weights(_gram(3), torch.ones(3, dtype=F64), -1.0),
     ValueError),
    # pcgrad
    ("pcgrad orders batch small", lambda: solvers.pcgrad_weights(_gram(3, B2), _orders(3, (3,))),
     ValueError),
    ("pcgrad orders batch large", lambda: solvers.pcgrad_weights(_gram(3, B2), _orders(3, BIG)),
     ValueError),
    ("pcgrad orders float", lambda: solvers.pcgrad_weights(_gram(3), _orders(3).double()),
     TypeError),
    ("pcgrad K int", lambda: solvers.pcgrad_weights(torch.ones(3, 3, dtype=torch.int64),
                                                    _orders(3)), TypeError),
    ("pcgrad meta orders", lambda: solvers.pcgrad_weights(_gram(3), _orders(3).to("meta")),
     ValueError),
    ("pcgrad_orders state", lambda: solvers.pcgrad_orders(torch.zeros(3, dtype=torch.int64), 1, 3),
     ValueError),
    ("pcgrad_orders T", lambda: solvers.pcgrad_orders(torch.zeros(2, dtype=torch.int64), 1, 0),
     ValueError),
    ("pcgrad_orders T huge", lambda: solvers.pcgrad_orders(torch.zeros(2, dtype=torch.int64), 1,
                                                           2**40), ValueError),
    # sym_eig / power_fixed_point / imtl
    ("sym_eig rank", lambda: S.sym_eig(torch.ones(3, dtype=F64)), ValueError),
    ("sym_eig square", lambda: S.sym_eig(torch.ones(3, 4, dtype=F64)), ValueError),
    ("sym_eig int", lambda: S.sym_eig(torch.ones(3, 3, dtype=torch.int64)), TypeError),
    ("power rank", lambda: S.power_fixed_point(torch.ones(3, dtype=F64), 1.0, 5), ValueError),
    ("power int", lambda: S.power_fixed_point(torch.ones(3, 3, dtype=torch.int64), 1.0, 5),
     TypeError),
    ("power alpha", lambda: S.power_fixed_point(_gram(3), 0.0, 5), ValueError),
    ("power iters", lambda: S.power_fixed_point(_gram(3), 1.0, 0), ValueError),
    ("imtl square", lambda: S.imtl_weights(torch.ones(2, 3, 4, dtype=F64)), ValueError),
    ("imtl T=0", lambda: S.imtl_weights(torch.ones(0, 0, dtype=F64)), ValueError),
    # aligned / config
    ("aligned pref long", lambda: S.aligned_mtl_weights(_gram(3), torch.ones(4000, dtype=F64)),
     ValueError),
    ("aligned pref short", lambda: S.aligned_mtl_weights(_gram(3), torch.ones(2, dtype=F64)),
     ValueError),
    ("aligned pref rank", lambda: S.aligned_mtl_weights(_gram(3), torch.ones(1, 3, dtype=F64)),
     ValueError),
    ("aligned pref int", lambda: S.aligned_mtl_weights(_gram(3), torch.ones(3, dtype=torch.int64)),
     TypeError),
    ("aligned pref meta", lambda: S.aligned_mtl_weights(_gram(3), torch.ones(3, device="meta")),
     ValueError),
    ("aligned mode", lambda: S.aligned_mtl_weights(_gram(3), None, "max"), ValueError),
    ("aligned K rank", lambda: S.aligned_mtl_weights(torch.ones(3, dtype=F64)), ValueError),
    ("config pref long", lambda: S.config_weights(_gram(3), torch.ones(4000, dtype=F64)),
     ValueError),
    ("config K int", lambda: S.config_weights(torch.ones(3, 3, dtype=torch.int64)), TypeError),
    # gradvac
    ("gradvac phi batch small", lambda: S.gradvac_sweep(_gram(3, B2), torch.zeros(3, 3, 3),
                                                        _perms(3), 0.5, 1e-8), ValueError),
    ("gradvac phi batch large", lambda: S.gradvac_sweep(_gram(3, B2), torch.zeros(*BIG, 3, 3),
                                                        _perms(3), 0.5, 1e-8), ValueError),
    ("gradvac perms shape", lambda: S.gradvac_sweep(_gram(3), torch.zeros(3, 3), _perms(4), 0.5,
                                                    1e-8), ValueError),
    ("gradvac perms float", lambda: S.gradvac_sweep(_gram(3), torch.zeros(3, 3),
                                                    _perms(3).double(), 0.5, 1e-8), TypeError),
    ("gradvac phi int", lambda: S.gradvac_sweep(_gram(3), torch.zeros(3, 3, dtype=torch.int64),
                                                _perms(3), 0.5, 1e-8), TypeError),
    ("gradvac phi meta", lambda: S.gradvac_sweep(_gram(3), torch.zeros(3, 3, device="meta"),
                                                 _perms(3), 0.5, 1e-8), ValueError),
    # clip_update_norm
    ("clip w batch small", lambda: S.clip_update_norm(torch.ones(3, 3, dtype=F64), _gram(3, B2),
                                                      1.0), ValueError),
    ("clip w batch large", lambda: S.clip_update_norm(torch.ones(*BIG, 3, dtype=F64),
                                                      _gram(3, B2), 1.0), ValueError),
    ("clip w T", lambda: S.clip_update_norm(torch.ones(4, dtype=F64), _gram(3), 1.0), ValueError),
    ("clip w int", lambda: S.clip_update_norm(torch.ones(3, dtype=torch.int64), _gram(3), 1.0),
     TypeError),
    ("clip w meta", lambda: S.clip_update_norm(torch.ones(3, device="meta"), _gram(3), 1.0),
     ValueError),
    ("clip max_norm", lambda: S.clip_update_norm(torch.ones(3, dtype=F64), _gram(3), -1.0),
     ValueError),
    # gradnorm_update
    ("gradnorm w batch small", lambda: _gradnorm(_gram(3, B2), w=torch.ones(3, 3, dtype=F64)),
     ValueError),
    ("gradnorm w batch large", lambda: _gradnorm(_gram(3, B2), w=torch.ones(*BIG, 3, dtype=F64)),
     ValueError),
    ("gradnorm initial", lambda: _gradnorm(_gram(3, B2), initial=torch.ones(5, 3, dtype=F64)),
     ValueError),
    ("gradnorm has", lambda: _gradnorm(_gram(3, B2), has=torch.zeros(9, 1, dtype=torch.bool)),
     ValueError),
    ("gradnorm has dtype", lambda: _gradnorm(_gram(3, B2), has=torch.zeros(2, 1)), TypeError),
    ("gradnorm losses T", lambda: _gradnorm(_gram(3, B2), losses=torch.ones(4, dtype=F64)),
     ValueError),
    ("gradnorm losses batch", lambda: _gradnorm(_gram(3, B2),
                                                losses=torch.ones(*BIG, 3, dtype=F64)),
     ValueError),
    ("gradnorm losses meta", lambda: _gradnorm(_gram(3, B2),
                                               losses=torch.ones(3, device="meta")), ValueError),
]


@pytest.mark.parametrize("call, error", [pytest.param(c, e, id=n) for n, c, e in BAD_CASES])
def test_bad_input_raises_a_clean_error(call, error):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert ":" in message and len(message) > 20, message  # names the op and the argument


# Ops on a Gram batch (..., T, T) float64 that return tensors: (name, call).
GRAM_OPS = [
    ("nnqp", lambda K: solvers.nnqp(K, (K @ torch.full(K.shape[:-1], 0.3, dtype=K.dtype)
                                        [..., None])[..., 0].unsqueeze(-2))),
    ("nnqp simplex", lambda K: solvers.nnqp(K, torch.zeros(*K.shape[:-2], 1, K.shape[-1],
                                                           dtype=K.dtype), simplex=True)),
    ("cagrad", lambda K: solvers.cagrad_weights(K, torch.full(K.shape[:-1], 1 / K.shape[-1],
                                                              dtype=K.dtype), 0.4)),
    ("pcgrad", lambda K: solvers.pcgrad_weights(K, _orders(K.shape[-1], K.shape[:-2]))),
    ("sym_eig", lambda K: S.sym_eig(K)[0]),
    ("power_fixed_point", lambda K: S.power_fixed_point(K, 1.0, 10)),
    ("imtl_weights", lambda K: S.imtl_weights(K)),
    ("aligned_mtl_weights", lambda K: S.aligned_mtl_weights(K)),
    ("config_weights", lambda K: S.config_weights(K)),
    ("gradvac_sweep", lambda K: S.gradvac_sweep(K, torch.zeros_like(K), _perms(K.shape[-1]),
                                                0.5, 1e-8)[0]),
    ("clip_update_norm", lambda K: S.clip_update_norm(torch.ones(K.shape[:-1], dtype=K.dtype),
                                                      K, 0.5)),
    ("gradnorm_update", lambda K: _gradnorm(K)[0]),
]


# Index tensors out of range: the kernels check the entries where they read them (a check in
# Python would be a host read, which captured steps must not make): a RuntimeError, no crash.
OUT_OF_RANGE = [
    ("pcgrad orders", lambda: solvers.pcgrad_weights(_gram(3), _orders(3) + 10**6)),
    ("pcgrad orders negative", lambda: solvers.pcgrad_weights(_gram(3), _orders(3) - 10**6)),
    ("gradvac perms", lambda: S.gradvac_sweep(_gram(3), torch.zeros(3, 3, dtype=F64),
                                              _perms(3) + 10**6, 0.5, 1e-8)),
]


@pytest.mark.parametrize("call", [c for _, c in OUT_OF_RANGE], ids=[n for n, _ in OUT_OF_RANGE])
def test_out_of_range_indices_raise(call):
    with pytest.raises((RuntimeError, IndexError), match="orders|perms|index"):
        call()


@pytest.mark.parametrize("call", [c for _, c in GRAM_OPS], ids=[n for n, _ in GRAM_OPS])
def test_views_give_the_contiguous_result(call):
    K = _gram(4, (3,))
    ref = call(K)
    strided = torch.empty(3, 4, 8, dtype=F64)[..., ::2]  # row stride 8, column stride 2
    strided.copy_(K)
    assert not strided.is_contiguous()
    torch.testing.assert_close(call(strided), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(call(K.mT), ref, rtol=1e-12, atol=1e-12)  # K is symmetric
    expanded = K[:1].expand(3, 4, 4)
    torch.testing.assert_close(call(expanded), call(K[:1].contiguous()).expand_as(ref),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call", [c for _, c in GRAM_OPS], ids=[n for n, _ in GRAM_OPS])
def test_empty_batch_gives_an_empty_result(call):
    out = call(torch.zeros(0, 3, 3, dtype=F64))
    assert out.shape[0] == 0


@pytest.mark.parametrize("call", [c for _, c in GRAM_OPS], ids=[n for n, _ in GRAM_OPS])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gram_does_not_crash(call, bad):
    K = _gram(4, (2,))
    K[1, 0, 0] = bad
    try:
        out = call(K)
    except (ValueError, torch.linalg.LinAlgError):  # eigh refuses NaN input: a clean error
        return
    assert out.shape[0] == 2
    assert torch.isfinite(call(K[:1])).all()


def test_meta_tensors_run_the_reference():
    K = _gram(3, (2,)).to("meta")
    assert solvers.pcgrad_weights(K, _orders(3, (2,)).to("meta")).device.type == "meta"
    assert S.power_fixed_point(K, 1.0, 3).device.type == "meta"
    assert ops.gram(torch.ones(3, 5, device="meta")).shape == (3, 3)
    assert ops.combine(torch.ones(3, device="meta"), torch.ones(3, 5, device="meta")).shape == (5,)


@pytest.mark.parametrize("shape", [(1, 1), (3, 0), (5, 7)])
def test_combine_and_graddrop_edge_shapes(shape):
    T, P = shape
    G = torch.randn(T, P)
    w = torch.rand(T)
    torch.testing.assert_close(ops.combine(w, G), w @ G)
    torch.testing.assert_close(ops.combine(w, G.T.contiguous().T), w @ G)  # column-major G
    torch.testing.assert_close(ops.combine(w, G[:1].expand(T, P)), w @ G[:1].expand(T, P))
    out = torch.zeros(2 * P)[::2]  # a strided out
    ops.combine(w, G, out)
    torch.testing.assert_close(out, w @ G)
    assert ops.graddrop(G, torch.rand(P)).shape == (P,)
