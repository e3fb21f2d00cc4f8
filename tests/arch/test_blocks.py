"""Fused expert blocks (MMoE, CGC, PLE, DSelect-k) against their loop definitions: forward,
parameter and input gradients in fp32/fp16/bf16, gradcheck in fp64, ragged shapes, state_dict
round trips both ways, bad input, and the FusedHeads per-task path on their output."""

import copy
import io
import math

import numpy as np
import pytest
import torch

from mtlfast import FusedHeads, _ext
from mtlfast.arch import CGC, PLE, DSelectK, MMoE
from mtlfast.arch.experts import ExpertBank
from mtlfast.arch.gates import GateBank
from mtlfast.arch.loops import CGCLoop, PLELoop
from tests.conftest import count_calls, rel_err

K = 12


def _models(dtype=torch.float32):
    """(name, fused block) covering ragged widths, odd E/T, E=1, T=1, no activation."""
    f = {"dtype": dtype}
    return [
        ("mmoe", MMoE(K, 3, [8, 6], 4, **f)),
        ("mmoe_ragged", MMoE(K, 3, [[8, 5], [3, 5], [7, 5]], ["a", "b"], activation=None, **f)),
        ("mmoe_E1_T1", MMoE(K, 1, [5], 1, activation="gelu", **f)),
        ("mmoe_nobias", MMoE(K, 5, [4, 4, 3], 3, gate_bias=False, activation="silu", **f)),
        ("mmoe_top2", MMoE(K, 5, [8, 6], 3, top_k=2, **f)),
        ("cgc", CGC(K, 2, [1, 0, 2], [8, 6], 3, **f)),
        ("cgc_T1", CGC(K, 1, 1, [7], 1, **f)),
        ("ple", PLE(K, 3, 1, 2, [8, 6], 3, **f)),
        ("ple_ragged", PLE(K, 2, 2, [1, 0, 3], [[4, 6], [9, 6], [4, 6], [5, 6], [3, 6],
                                                [4, 6]], 3, **f)),
        ("ple_no_shared", PLE(K, 2, 0, 2, [5], 2, **f)),
        ("ple_two_per_owner", PLE(K, 2, 2, 2, [8, 6], 3, **f)),
        ("dselect", DSelectK(K, 5, 2, [8, 6], 3, **f)),
        ("dselect_pow2", DSelectK(K, 4, 3, [8], 2, kgamma=50.0, **f)),
    ]


NAMES = [n for n, _ in _models()]
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2, torch.float64: 1e-12}


def _model(name, dtype=torch.float32):
    torch.manual_seed(0)
    return dict(_models(dtype))[name]


def _grads_in_loop_keys(fused, grads):
    """The fused gradients, named by the loop's state_dict keys (through the key map)."""
    holder = copy.deepcopy(fused)
    with torch.no_grad():
        for p, g in zip(holder.parameters(), grads, strict=True):
            p.copy_(g)
    return holder.state_dict()


def _errors(model, x, c, ref_grads, keys, named_grads):
    """(output, input-gradient, parameter-gradient) relative errors of ``model`` in x's dtype."""
    x = x.clone().requires_grad_()
    z = model(x)
    grads = torch.autograd.grad((z * c.to(x.dtype)).sum(), [x, *model.parameters()],
                                allow_unused=True, materialize_grads=True)
    named = named_grads(grads[1:])
    got = torch.cat([named[k].double().reshape(-1) for k in keys])
    want = torch.cat([g.reshape(-1) for g in ref_grads[1:]])
    return z, rel_err(grads[0], ref_grads[0]), rel_err(got, want), named


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_matches_loop_forward_and_backward(name, dtype):
    """Both against the fp64 loop; in half types the fused block may be off by at most about
    what the loop itself is off (input gradients of deep blocks cancel in fp16/bf16)."""
    fused = _model(name, dtype)
    loop = fused.unfuse()
    ref_model = _model(name, torch.float64).unfuse()
    ref_model.load_state_dict(fused.state_dict())
    keys = [k for k, _ in ref_model.named_parameters()]
    for B in (1, 37):
        x = torch.randn(B, K, dtype=dtype)
        x64 = x.double().requires_grad_()
        z64 = ref_model(x64)
        c = torch.randn_like(z64)
        # (PLE without shared experts: the inner shared gate feeds nothing, unused in the loop)
        g64 = torch.autograd.grad((z64 * c).sum(), [x64, *ref_model.parameters()],
                                  allow_unused=True, materialize_grads=True)
        zf, fx, fp, named = _errors(fused, x, c, g64, keys,
                                    lambda g: _grads_in_loop_keys(fused, g))
        zl, lx, lp, _ = _errors(loop, x, c, g64, keys,
                                lambda g: dict(zip(keys, g, strict=True)))
        assert zf.shape == zl.shape == (len(fused.tasks), B, fused.out_features)
        assert rel_err(zf, z64) < TOL[dtype]
        assert rel_err(zl, z64) < max(TOL[dtype], 1e-5)
        assert fx < TOL[dtype] + 2 * lx  # input gradient
        assert fp < TOL[dtype] + 2 * lp  # every parameter gradient, in the loop's key order
        if dtype == torch.float32:  # half types: tiny gate gradients sit in fp16 subnormals
            for key, want in zip(keys, g64[1:], strict=True):
                assert rel_err(named[key], want) < 1e-4, key


@pytest.mark.parametrize("name", ["mmoe_ragged", "cgc", "ple_ragged", "dselect"])
def test_gradcheck_small_model_fp64(name):
    torch.manual_seed(0)
    fused = _model(name, torch.float64)
    params = list(fused.parameters())
    x = torch.randn(3, K, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        with torch.no_grad():
            for p, v in zip(params, ps, strict=True):
                p.copy_(v)
        return torch.func.functional_call(
            fused, dict(zip([n for n, _ in fused.named_parameters()], ps, strict=True)), (x,))

    ps = [p.detach().clone().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(f, (x, *ps), fast_mode=True)


def test_batch_dims_and_return_experts():
    fused = _model("mmoe")
    x = torch.randn(2, 5, K)
    z, h = fused(x, return_experts=True)
    assert z.shape == (4, 2, 5, 6) and h.shape == (3, 10, 6)
    assert rel_err(z, fused.unfuse()(x)) < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trips_both_ways(name):
    fused = _model(name)
    loop = fused.unfuse()
    assert list(fused.state_dict()) == [k for k in loop.state_dict()] or \
        set(fused.state_dict()) == set(loop.state_dict())
    # loop checkpoint -> fused model (through torch.save)
    torch.manual_seed(1)
    other = copy.deepcopy(loop)
    for p in other.parameters():
        torch.nn.init.normal_(p)
    buf = io.BytesIO()
    torch.save(other.state_dict(), buf)
    buf.seek(0)
    fresh = _model(name)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(9, K)
    assert rel_err(fresh(x), other(x)) < 1e-5
    # fused checkpoint -> loop model
    back = copy.deepcopy(loop)
    back.load_state_dict(fresh.state_dict())
    for k, v in other.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert rel_err(fresh.unfuse()(x), other(x)) < 1e-5


@pytest.mark.parametrize("name", ["mmoe", "cgc", "ple", "dselect"])
def test_loop_fuse_is_the_inverse_of_unfuse(name):
    fused = _model(name)
    loop = fused.unfuse()
    back = loop.fuse()
    assert type(back) is type(fused)
    for (k1, v1), (k2, v2) in zip(back.state_dict().items(), fused.state_dict().items(),
                                  strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.randn(5, K)
    assert torch.equal(back(x), fused(x))


def test_load_reports_missing_and_mismatched_keys():
    fused = _model("mmoe")
    sd = fused.unfuse().state_dict()
    sd.pop("gate_specific.task1.0.bias")
    result = fused.load_state_dict(sd, strict=False)
    assert "gate_specific.task1.0.bias" in result.missing_keys
    sd = fused.unfuse().state_dict()
    sd["experts_shared.0.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="size mismatch for experts_shared.0.0.weight"):
        fused.load_state_dict(sd)


def test_named_parameters_are_the_fused_buffers():
    fused = _model("mmoe")
    assert [n for n, _ in fused.named_parameters()] == [
        "experts.weight0", "experts.bias0", "experts.weight1", "experts.bias1",
        "gates.weight", "gates.bias"]


@pytest.mark.parametrize("name", ["mmoe", "cgc", "ple", "dselect"])
def test_fused_heads_consume_the_per_task_output(name):
    block = _model(name)
    T, D = len(block.tasks), block.out_features
    heads = FusedHeads(D, {f"t{i}": i + 1 for i in range(T)}, hidden=5)
    loop_heads = heads.unfuse()
    x = torch.randn(11, K)
    z = block(x)
    out = heads(z, per_task=True)
    assert list(out) == list(heads.tasks)
    zl = block.unfuse()(x)
    for i, (t, y) in enumerate(out.items()):
        assert y.shape == (11, i + 1)
        assert rel_err(y, loop_heads[t](zl[i])) < 1e-5
    loss = sum(y.square().mean() for y in out.values())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())


def test_bad_input_raises():
    with pytest.raises(ValueError, match="same depth and the same last width"):
        MMoE(K, 2, [[4, 5], [4, 6]], 2)
    with pytest.raises(ValueError, match="per-expert width lists"):
        MMoE(K, 3, [[4, 5], [4, 5]], 2)
    with pytest.raises(ValueError, match="ints >= 1"):
        MMoE(K, 2, [4, 0], 2)
    with pytest.raises(ValueError, match="task names"):
        MMoE(K, 2, [4], ["a", "a"])
    with pytest.raises(ValueError, match="num_specific"):
        CGC(K, 1, [1, 2], [4], 3)
    with pytest.raises(ValueError, match="num_shared >= 1"):
        CGC(K, 0, [1, 0], [4], 2)
    with pytest.raises(ValueError, match="num_levels"):
        PLE(K, 0, 1, 1, [4], 2)
    with pytest.raises(ValueError, match="num_experts >= 2"):
        DSelectK(K, 1, 1, [4], 2)
    with pytest.raises(ValueError, match="activation"):
        MMoE(K, 2, [4], 2, activation="tanh")
    m = _model("mmoe")
    with pytest.raises(ValueError, match="in_features=12"):
        m(torch.randn(4, K + 1))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(4, K, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m([1.0] * K)
    with pytest.raises(TypeError, match="floating point"):
        m(torch.ones(4, K, dtype=torch.long))
    bank = ExpertBank(K, [(4,)] * 3, groups=(1, 2))
    with pytest.raises(ValueError, match="G=2"):
        bank(torch.randn(4, K))


_BLOCKS = {"mmoe": (MMoE, (4, [8], 3)), "cgc": (CGC, (1, 1, [8], 3)),
           "ple": (PLE, (2, 1, 1, [8], 3)), "dselect": (DSelectK, (4, 2, [8], 3))}


@pytest.mark.parametrize("kind", list(_BLOCKS))
@pytest.mark.parametrize("in_features", [0, -3, 16.0, "16", True, None])
def test_bad_in_features_raise_a_value_error_naming_it(kind, in_features):
    cls, args = _BLOCKS[kind]
    with pytest.raises(ValueError, match="in_features must be an int >= 1"):
        cls(in_features, *args)


@pytest.mark.parametrize("kind", list(_BLOCKS))
def test_integer_types_are_taken_for_in_features(kind):
    cls, args = _BLOCKS[kind]
    block = cls(np.int64(16), *args)
    assert block.in_features == 16 and type(block.in_features) is int
    assert block(torch.randn(5, 16)).shape[-2:] == (5, 8)


@pytest.mark.parametrize("num_shared, num_specific, match", [
    (0, 0, "at least one expert"), (-1, 1, "num_shared must be an int >= 0"),
    (1.5, 1, "num_shared must be an int >= 0"), (True, 1, "num_shared must be an int >= 0"),
    ("1", 1, "num_shared must be an int >= 0")])
@pytest.mark.parametrize("cls", [CGC, PLE, CGCLoop, PLELoop])
def test_bad_expert_counts_raise_a_value_error(cls, num_shared, num_specific, match):
    levels = (2,) if cls in (PLE, PLELoop) else ()
    with pytest.raises(ValueError, match=match):
        cls(16, *levels, num_shared, num_specific, [8], 3)


@pytest.mark.parametrize("widths, match", [
    ([], "one sequence of layer widths per expert"), ("abc", "one sequence of layer widths"),
    ([()], "non-empty lists of ints >= 1"), ([(0,)], "non-empty lists of ints >= 1"),
    ([(4.5,)], "non-empty lists of ints >= 1"), ([(4,), (5,)], "same depth and the same last"),
    ([(4, 8), (4,)], "same depth and the same last")])
def test_expert_bank_bad_widths(widths, match):
    with pytest.raises(ValueError, match=match):
        ExpertBank(16, widths)


@pytest.mark.parametrize("groups", [(-1, 4), "ab", (1.0, 2), (True, 2)])
def test_expert_bank_bad_groups(groups):
    with pytest.raises(ValueError, match="groups must be a sequence of ints >= 0"):
        ExpertBank(16, [(4,)] * 3, groups=groups)


def test_expert_bank_and_gate_bank_take_integer_sequences():
    bank = ExpertBank(16, [(4,)] * 3, groups=np.array([1, 2]))
    assert bank.groups == (1, 2) and bank(torch.randn(2, 5, 16)).shape == (3, 5, 4)
    gates = GateBank(16, [np.array([0, 1]), range(2)], 2)
    assert gates.select == ((0, 1), (0, 1)) and gates(torch.randn(5, 16)).shape == (2, 5, 2)


@pytest.mark.parametrize("select", ["ab", ["a"], [[0.5]], [[True]], [[-1]]])
def test_gate_bank_bad_select(select):
    with pytest.raises(ValueError, match="select must be|must be distinct, in"):
        GateBank(16, select, 2)


@pytest.mark.parametrize("kgamma", [0, -1.0, float("nan"), float("inf"), "a", True])
def test_dselect_k_bad_kgamma(kgamma):
    with pytest.raises(ValueError, match="kgamma must be a finite number > 0"):
        DSelectK(16, 4, 2, [8], 3, kgamma=kgamma)


@pytest.mark.parametrize("kind", list(_BLOCKS))
def test_meta_tensors(kind):
    """An input on another device than the parameters (meta here) is a ValueError naming
    both; a block built on meta takes meta inputs (shape inference)."""
    cls, args = _BLOCKS[kind]
    with pytest.raises(ValueError, match="x is on meta but the parameters are on cpu"):
        cls(16, *args)(torch.randn(5, 16, device="meta"))
    out = cls(16, *args, device="meta")(torch.randn(5, 16, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 5, 8)


def _op_counts(m, x):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        m(x)
    return {e.key: e.count for e in prof.key_averages()}


_GEMMS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm")


def test_each_layer_is_one_gemm_for_all_experts(monkeypatch):
    """The torch path of the experts (CUDA's and torch.compile's) is one GEMM per layer, no
    per-expert loop; eager CPU calls run the whole bank as one C++ op (large experts; the
    threshold lowered here)."""
    import mtlfast.arch.experts as experts
    from mtlfast.ops import _dispatch

    monkeypatch.setattr(_dispatch, "EXPERT_KERNEL_MIN_MACS", 0)
    m = MMoE(K, 6, [8, 5], 4)
    x = torch.randn(256, K)
    if _ext.has_cpu_kernels():
        counts = _op_counts(m, x)
        assert counts.get("mtlfast::expert_mlp") == 1, counts
    monkeypatch.setattr(experts, "backend", lambda *a, **k: "torch")
    counts = _op_counts(m, x)
    assert "mtlfast::expert_mlp" not in counts
    # layer 1 (addmm), layer 2 (baddbmm), the gates (addmm), the mixture (bmm, or the C++
    # gated-mixture kernel from 256 rows)
    mixers = ("mtlfast::mixture_cpu", "mtlfast::gated_mixture_cpu")
    assert sum(counts.get(k, 0) for k in (*_GEMMS, *mixers)) == 4, counts


@pytest.mark.parametrize("name", ["mmoe", "cgc", "ple", "dselect", "mmoe_E1_T1"])
def test_grouped_op_path_matches_loop(name, monkeypatch):
    """Uniform experts run expert-major bmm's on the CPU; the grouped-linear path (CUDA's,
    and every ragged layout's) must give the same answer."""
    fused = _model(name)
    loop = fused.unfuse()
    monkeypatch.setattr(ExpertBank, "_expert_major", lambda self, x: False)
    x = torch.randn(13, K, requires_grad=True)
    xl = x.detach().clone().requires_grad_()
    z, zl = fused(x), loop(xl)
    assert rel_err(z, zl) < 1e-5
    c = torch.randn_like(z)
    gf = torch.autograd.grad((z * c).sum(), [x, *fused.parameters()])
    gl = torch.autograd.grad((zl * c).sum(), [xl, *loop.parameters()], allow_unused=True,
                             materialize_grads=True)
    assert rel_err(gf[0], gl[0]) < 1e-5
    named = _grads_in_loop_keys(fused, gf[1:])
    for (key, _), want in zip(loop.named_parameters(), gl[1:], strict=True):
        assert rel_err(named[key], want) < 1e-4, key


@pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="needs the C++ extension")
@pytest.mark.parametrize("name", ["mmoe", "cgc", "ple", "ple_no_shared", "ple_two_per_owner",
                                  "dselect", "mmoe_ragged"])
def test_expert_kernel_path_matches_loop(name, monkeypatch):
    """Eager CPU banks of large enough experts run the C++ expert kernel (the threshold lowered
    to these): the block still equals its loop definition, output and every gradient (input
    included)."""
    import mtlfast.arch.experts as experts
    from mtlfast.ops import _dispatch

    monkeypatch.setattr(_dispatch, "EXPERT_KERNEL_MIN_MACS", 0)
    calls = count_calls(monkeypatch, experts, "expert_mlp")
    fused = _model(name, torch.float64)
    loop = fused.unfuse()
    x = torch.randn(300, K, dtype=torch.float64, requires_grad=True)
    xl = x.detach().clone().requires_grad_()
    z, zl = fused(x), loop(xl)
    assert bool(calls) == (name != "mmoe_ragged")  # ragged widths: the grouped op
    assert rel_err(z, zl) < 1e-12
    c = torch.randn_like(z)
    gf = torch.autograd.grad((z * c).sum(), [x, *fused.parameters()])
    gl = torch.autograd.grad((zl * c).sum(), [xl, *loop.parameters()], allow_unused=True,
                             materialize_grads=True)
    assert rel_err(gf[0], gl[0]) < 1e-12
    named = _grads_in_loop_keys(fused, gf[1:])
    for (key, _), want in zip(loop.named_parameters(), gl[1:], strict=True):
        assert rel_err(named[key], want) < 1e-12, key


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rows", [13, 300])  # both row regimes of the CPU mixture dispatch
def test_autocast_bf16_matches_loop_under_autocast(name, rows):
    """Under torch.autocast a block takes fp32 or bf16 input (a stem's autocast output),
    computes in bf16 like its loop definition, and its parameter gradients stay fp32."""
    fused = _model(name)
    loop = fused.unfuse()
    stem = torch.nn.Linear(K, K)
    x = torch.randn(rows, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for inp in (x, stem(x)):
            z, zl = fused(inp), loop(inp)
            assert z.dtype == zl.dtype == torch.bfloat16
            assert rel_err(z, zl) < TOL[torch.bfloat16]
            grads = torch.autograd.grad(z.float().square().sum(), list(fused.parameters()),
                                        allow_unused=True, materialize_grads=True)
            assert all(g.dtype == torch.float32 and g.isfinite().all() for g in grads)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_gates_are_sparse(k):
    """Each row mixes exactly k experts (random logits: no ties), softmax-normalized; the
    logits of the others get no gradient."""
    torch.manual_seed(0)
    m = MMoE(K, 4, [6], 3, top_k=k, dtype=torch.float64)
    x = torch.randn(50, K, dtype=torch.float64)
    g = m.gates(x)
    assert ((g > 0).sum(-1) == k).all()
    assert torch.allclose(g.sum(-1), torch.ones_like(g[..., 0]))
    logits = m.gates.logits(x).view(50, 3, 4).transpose(0, 1)
    chosen = logits >= logits.topk(k, -1).values[..., -1:]
    assert torch.equal(chosen, g > 0)
    few = x[:2]  # two rows: some experts chosen by no row of a task
    (dw,) = torch.autograd.grad(m(few).square().sum(), m.gates.weight)
    rows = dw.view(3, 4, K).abs().sum(-1)
    if k == 1:  # a softmax over one logit is constant: top-1 gates get no gradient
        assert (rows == 0).all()
    else:  # exactly the experts no row of task t chose have a zero gate-weight gradient row
        assert torch.equal(rows == 0, ~chosen[:, :2].any(1))


@pytest.mark.parametrize("E", [2, 3, 4, 5, 8, 9, 16])
def test_dselect_binary_codes_are_the_papers(E):
    """Expert e's code spells e in binary, most significant bit first (LibMTL's numpy cast
    turns every bit into 1)."""
    from mtlfast.arch.loops import binary_codes

    codes = binary_codes(E)
    assert codes.dtype == torch.bool and codes.shape == (E, math.ceil(math.log2(E)))
    assert [int("".join("1" if b else "0" for b in row), 2) for row in codes.tolist()] == \
        list(range(E))


@pytest.mark.parametrize("E", [2, 5, 8])
@pytest.mark.parametrize("fused", [True, False])
def test_dselect_saturated_selectors_pick_their_experts(E, fused):
    """Smooth steps saturated (|z| >= 1/2): each selector is one-hot on the expert its bits
    spell, and the task's expert weights are the selector softmax over those experts."""
    torch.manual_seed(0)
    T, k, nb = 2, 2, math.ceil(math.log2(E))
    m = DSelectK(K, E, k, [6], T, dtype=torch.float64)
    targets = torch.randint(0, E, (T, k))
    w_bias = torch.randn(T, k, dtype=torch.float64)
    bits = (targets[..., None] >> torch.arange(nb - 1, -1, -1)) & 1  # (T, k, nb)
    with torch.no_grad():
        m.gate_weight.zero_()
        m.gate_bias.copy_(torch.cat([(bits * 2.0 - 1).reshape(-1), w_bias.reshape(-1)]))
    block = m if fused else m.unfuse()
    x = torch.randn(5, K, dtype=torch.float64)
    z, h = m(x, return_experts=True)
    want_g = torch.zeros(T, E, dtype=torch.float64)
    for t in range(T):
        want_g[t].index_add_(0, targets[t], w_bias[t].softmax(0))
    assert rel_err(block(x), torch.einsum("te,emd->tmd", want_g, h)) < 1e-12
    if fused:
        assert rel_err(m.gates(x), want_g[:, None].expand(T, 5, E)) < 1e-12


@pytest.mark.parametrize("top_k", [0, 5, True, 1.5, "2"])
def test_bad_top_k(top_k):
    with pytest.raises(ValueError, match="top_k"):
        MMoE(K, 4, [6], 2, top_k=top_k)


def test_dtype_mismatch_outside_autocast_raises():
    with pytest.raises(TypeError, match="torch.autocast"):
        _model("mmoe")(torch.randn(3, K, dtype=torch.float64))
    with pytest.raises(TypeError, match="ExpertBank: x has dtype"):
        ExpertBank(K, [(4,)] * 2)(torch.randn(3, K, dtype=torch.bfloat16))


@pytest.mark.parametrize("name", ["mmoe", "ple_two_per_owner", "dselect"])
def test_compile_sees_through_the_block(name):
    fused = _model(name)
    x = torch.randn(7, K)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    z = compiled(x)
    assert rel_err(z, fused.unfuse()(x)) < 1e-5
    z.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fused.parameters())
