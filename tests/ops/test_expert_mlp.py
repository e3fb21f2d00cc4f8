"""expert_mlp: the C++ CPU kernel (forward and backward) against its reference (one F.linear
per expert under autograd) and against torch's bmm formula of the backward, over banks of
every layout it takes: shared or grouped input, one or two stored parts, depth 1-3, ReLU or
none, fp32/fp64/fp16/bf16; batched gradients; and ExpertBank's dispatch to it."""

import pytest
import torch

from mtlfast import _ext
from mtlfast.arch.experts import ExpertBank
from mtlfast.ops import _dispatch
from mtlfast.ops._dispatch import backend
from mtlfast.ops.expert_mlp import expert_mlp, expert_mlp_backward_torch, expert_mlp_reference
from tests.conftest import rel_err

pytestmark = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="needs the C++ extension")

TOL = {torch.float64: 1e-12, torch.float32: 3e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}

# (parts, per_group, K, widths, M)
BANKS = [
    ((3,), 0, 7, (5,), 4),
    ((1, 8), 0, 16, (9, 6), 33),
    ((2, 3), 1, 5, (4, 4, 3), 17),
    ((1, 4), 0, 3, (1,), 1),
    ((4,), 2, 6, (8, 2), 9),
    ((2, 2), 4, 12, (16, 8), 64),
]


def _bank(parts, per_group, K, widths, M, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    E = sum(parts)
    x_shape = (M, K) if per_group == 0 else (E // per_group, M, K)
    x = torch.randn(x_shape, generator=gen).to(dtype)
    weights, biases, fan_in = [], [], K
    for w in widths:
        for n in parts:
            weights.append((torch.randn(n * w * fan_in, generator=gen) / fan_in ** 0.5).to(dtype))
            biases.append((torch.randn(n * w, generator=gen) * 0.1).to(dtype))
        fan_in = w
    return x, weights, biases


def _run(fn, x, weights, biases, dy, need_x):
    x = x.clone().requires_grad_(need_x)
    params = [t.clone().requires_grad_() for t in (*weights, *biases)]
    n = len(weights)
    y = fn(x, params[:n], params[n:])
    grads = torch.autograd.grad(y, ([x] if need_x else []) + params, dy)
    return y.detach(), grads


@pytest.mark.parametrize("bank", BANKS)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", list(TOL))
def test_kernel_matches_reference(bank, relu, dtype):
    parts, per_group = bank[0], bank[1]
    x, weights, biases = _bank(*bank, dtype)
    E, M, D = sum(parts), bank[4], bank[3][-1]
    dy = torch.randn(E, M, D, generator=torch.Generator().manual_seed(9)).to(dtype)
    for need_x in (True, False):
        # the reference in float64, compared in the kernel's dtype
        y_ref, g_ref = _run(lambda x, w, b: expert_mlp_reference(x, w, b, parts, per_group, relu),
                            x.double(), [w.double() for w in weights],
                            [b.double() for b in biases], dy.double(), need_x)
        y, g = _run(lambda x, w, b: expert_mlp(x, w, b, parts, per_group, relu),
                    x, weights, biases, dy, need_x)
        assert y.dtype == dtype and y.shape == (E, M, D)
        assert rel_err(y.double(), y_ref) < TOL[dtype]
        assert len(g) == len(g_ref)
        for a, b in zip(g, g_ref, strict=True):
            assert a.shape == b.shape and a.dtype == dtype
            assert rel_err(a.double(), b) < TOL[dtype]


@pytest.mark.parametrize("bank", BANKS)
def test_torch_backward_formula_matches_kernel(bank):
    parts, per_group = bank[0], bank[1]
    x, weights, biases = _bank(*bank, torch.float64)
    outs = torch.ops.mtlfast.expert_mlp(x, weights, biases, list(parts), per_group, True)
    dy = torch.randn_like(outs[-1])
    res = torch.ops.mtlfast.expert_mlp_backward(dy, x, weights, biases, outs, list(parts),
                                                per_group, True, True)
    dx, dws, dbs = expert_mlp_backward_torch(dy, x, weights, biases, outs, parts, per_group,
                                             True, True)
    n = len(weights)
    for a, b in zip([dx, *dws, *dbs], [res[0], *res[1:1 + n], *res[1 + n:]], strict=True):
        assert rel_err(a, b) < 1e-12


def test_batched_gradients_use_the_torch_formula():
    """autograd.grad(..., is_grads_batched=True) (the engine's jacobian mode) hands the backward
    a legacy vmap tensor: each row must equal its own backward."""
    parts, per_group = (2, 3), 1
    x, weights, biases = _bank(parts, per_group, 5, (4, 3), 6, torch.float64)
    params = [t.clone().requires_grad_() for t in (*weights, *biases)]
    y = expert_mlp(x, params[:4], params[4:], parts, per_group, True)
    dys = torch.randn(4, *y.shape, dtype=y.dtype)
    batched = torch.autograd.grad(y, params, dys, is_grads_batched=True, retain_graph=True)
    for i in range(4):
        single = torch.autograd.grad(y, params, dys[i], retain_graph=True)
        for a, b in zip(batched, single, strict=True):
            assert rel_err(a[i], b) < 1e-12


def test_double_backward_raises():
    x, weights, biases = _bank((3,), 0, 4, (5,), 3, torch.float64)
    params = [t.clone().requires_grad_() for t in (*weights, *biases)]
    y = expert_mlp(x, params[:1], params[1:], (3,), 0, True)
    (g,) = torch.autograd.grad(y.square().sum(), params[0], create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_kernel_rejects_inconsistent_banks():
    x, weights, biases = _bank((2,), 0, 4, (5,), 3, torch.float32)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.mtlfast.expert_mlp(x, [weights[0][:-1]], biases, [2], 0, True)
    with pytest.raises(RuntimeError, match="grouped input"):
        torch.ops.mtlfast.expert_mlp(x.expand(3, 3, 4), weights, biases, [2], 1, True)
    outs = torch.ops.mtlfast.expert_mlp(x, weights, biases, [2], 0, True)
    dy = torch.randn_like(outs[0])
    for bad in (outs[0][0], outs[0].double(), outs[0][:, :2]):
        with pytest.raises(RuntimeError, match="saved output 0"):
            torch.ops.mtlfast.expert_mlp_backward(dy, x, weights, biases, [bad], [2], 0, True,
                                                  False)


@pytest.mark.parametrize("activation, groups", [("relu", None), (None, (2, 2)),
                                                ("relu", (1, 1, 1, 1))])
def test_expert_bank_dispatches_to_the_kernel(activation, groups, monkeypatch):
    """Eager CPU calls go to the kernel (its size threshold lowered to these small experts);
    torch.func keeps the bmm path; both agree."""
    monkeypatch.setattr(_dispatch, "EXPERT_KERNEL_MIN_MACS", 0)
    torch.manual_seed(0)
    bank = ExpertBank(6, [(8, 5)] * 4, groups, activation, split=1)
    x = torch.randn(30, 6) if groups is None else torch.randn(len(groups), 30, 6)
    calls = []
    kernel = torch.ops.mtlfast.expert_mlp
    monkeypatch.setattr(torch.ops.mtlfast, "expert_mlp",
                        lambda *a: calls.append(1) or kernel(*a), raising=False)
    y = bank(x)
    assert calls
    params = {k: v.detach() for k, v in bank.named_parameters()}
    y_func, vjp = torch.func.vjp(lambda p: torch.func.functional_call(bank, p, (x,)), params)
    assert len(calls) == 1  # under a torch.func transform: the bmm path
    assert rel_err(y, y_func) < 1e-5
    dy = torch.randn_like(y)
    (grads,) = vjp(dy)
    eager = torch.autograd.grad(y, list(bank.parameters()), dy)
    for name, g in zip(params, eager, strict=True):
        assert rel_err(grads[name], g) < 1e-5


def test_other_activations_small_experts_and_transforms_keep_the_torch_path():
    x, big = torch.zeros(2, 2), _dispatch.EXPERT_KERNEL_MIN_MACS
    assert backend("expert_mlp", x, eager=True, activation="relu", macs=big) == "cpu"
    assert backend("expert_mlp", x, eager=True, activation="none", macs=big) == "cpu"
    assert backend("expert_mlp", x, eager=True, activation="gelu", macs=big) == "torch"
    assert backend("expert_mlp", x, eager=False, activation="relu", macs=big) == "torch"
    assert backend("expert_mlp", x, eager=True, activation="relu", macs=big - 1) == "torch"


def test_bank_size_decides(monkeypatch):
    """256-128 experts at 256 rows (16.7M multiply-adds per expert's layer 1) take the kernel,
    64-32 experts at 256 rows (1M) the bmm's."""
    calls = []
    kernel = torch.ops.mtlfast.expert_mlp
    monkeypatch.setattr(torch.ops.mtlfast, "expert_mlp",
                        lambda *a: calls.append(1) or kernel(*a), raising=False)
    ExpertBank(256, [(256, 128)] * 2)(torch.randn(256, 256))
    assert len(calls) == 1
    ExpertBank(64, [(64, 32)] * 2)(torch.randn(256, 64))
    assert len(calls) == 1
