"""The eager second-layer paths of FusedHeads (``grouped_linear_parts``: bmm, zero-padded bmm,
multiply-sum for width-1 groups, one F.linear per group) against the torch reference, forward
and backward, fp32/fp16/bf16; and a structural check: the MLP heads' forward + backward
dispatches no more ATen ops than the hand fusion (concatenated Linear + bmm)."""

import importlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mtlfast
from mtlfast import FusedHeads, baselines
from tests.conftest import rel_err

gl = importlib.import_module("mtlfast.ops.grouped_linear")
_dispatch = importlib.import_module("mtlfast.ops._dispatch")

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# path -> (in widths, out widths, _BMM_MAX_MK, _PAD_BUDGET on the CPU) that select it
PATHS = {
    "bmm": ((8,) * 3, (5,) * 3, 2**15, 2**20),
    "padded bmm": ((8,) * 4, (1, 7, 3, 7), 2**15, 2**20),
    "multiply-sum": ((8,) * 5, (1,) * 5, 2**15, 2**20),
    "loop (ragged out, padding too dear)": ((8,) * 4, (1, 7, 3, 7), 2**15, 0),
    "loop (large groups)": ((8,) * 3, (5,) * 3, 0, 2**20),
    "loop (ragged in)": ((3, 8, 1, 5), (2, 1, 4, 4), 2**15, 2**20),
}


def _select(monkeypatch, path):
    _, _, max_mk, budget = PATHS[path]
    monkeypatch.setitem(gl._BMM_MAX_MK, "cpu", max_mk)
    monkeypatch.setitem(gl._PAD_BUDGET, "cpu", budget)


def aten_heads(monkeypatch):
    """FusedHeads' own composition of ATen ops for MLP heads (what runs where the C++ op of
    ``mtlfast.ops.mlp_heads`` does not: no extension, GPU, torch.func, compile)."""
    monkeypatch.setitem(_dispatch.RULES, "mlp_heads", (("torch", lambda op, t, f: True),))


def _spy(monkeypatch):
    """Which of the eager paths ran (or the custom op)."""
    ran = []
    for name in ("_parts_bmm", "_parts_loop", "grouped_linear"):
        fn = getattr(gl, name)
        monkeypatch.setattr(gl, name, lambda *a, _fn=fn, _n=name, **k: ran.append(_n) or _fn(*a,
                                                                                           **k))
    return ran


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_parts_match_reference_forward_backward(path, dtype, bias, monkeypatch):
    _select(monkeypatch, path)
    ran = _spy(monkeypatch)
    ins, outs = PATHS[path][:2]
    M = 13
    x = torch.randn(M, sum(ins), dtype=dtype, requires_grad=True)
    w = (torch.randn(sum(gl.block_sizes(ins, outs))) / 3).to(dtype).requires_grad_()
    b = torch.randn(sum(outs), dtype=dtype, requires_grad=True) if bias else None
    parts = gl.grouped_linear_parts(x, w, b, ins, outs)
    assert [tuple(p.shape) for p in parts] == [(M, n) for n in outs]
    want = "_parts_loop" if path.startswith("loop") else "_parts_bmm"
    assert ran == [want]
    # the reference in float64
    leaves = [t for t in (x, w, b) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rx, rw = ref_leaves[:2]
    rb = ref_leaves[2] if bias else None
    ref = gl.grouped_linear_reference(rx, rw, rb, ins, outs)
    y = torch.cat(parts, dim=1)
    assert rel_err(y, ref) < TOL[dtype]
    g = torch.randn(M, sum(outs), dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, g.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, g)
    for got, exp in zip(grads, ref_grads, strict=True):
        assert got.dtype == dtype and got.shape == exp.shape
        assert rel_err(got, exp) < TOL[dtype]


def test_parts_outputs_are_views_of_one_buffer(monkeypatch):
    for path in PATHS:
        if path.startswith("loop"):  # one F.linear output per group: separate buffers
            continue
        _select(monkeypatch, path)
        ins, outs = PATHS[path][:2]
        parts = gl.grouped_linear_parts(torch.randn(4, sum(ins)),
                                        torch.randn(sum(gl.block_sizes(ins, outs))),
                                        torch.randn(sum(outs)), ins, outs)
        assert len({p._base.data_ptr() for p in parts}) == 1, path


@pytest.mark.parametrize("path", list(PATHS))
def test_parts_take_a_strided_x(path, monkeypatch):
    _select(monkeypatch, path)
    ins, outs = PATHS[path][:2]
    x = torch.randn(7, sum(ins) + 3)[:, 2:-1]  # a column window: not contiguous
    w, b = torch.randn(sum(gl.block_sizes(ins, outs))), torch.randn(sum(outs))
    got = torch.cat(gl.grouped_linear_parts(x, w, b, ins, outs), dim=1)
    assert rel_err(got, gl.grouped_linear_reference(x, w, b, ins, outs)) < 1e-6


def test_padding_rule_caps_fp32_cpu_padding_at_2x():
    outs = (1, 2, 5, 10, 20, 50, 100, 200)  # padded to 8 x 200: 4.1x the 388 columns
    assert not gl._bmm_ok(torch.empty(32, 8 * 32), 32, outs)
    assert gl._bmm_ok(torch.empty(32, 8 * 32, dtype=torch.bfloat16), 32, outs)
    assert gl._bmm_ok(torch.empty(32, 8 * 32), 32, (4, 5, 6, 7, 8, 8, 8, 8))  # 1.2x
    assert not gl._bmm_ok(torch.empty(4096, 8 * 32), 32, (4,) * 8)  # large groups: loop


def test_padding_rule_charges_the_gather():
    """Two ragged groups never pad (the gather costs what the second group's GEMMs would);
    three may. Equal widths need no gather."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.empty(32, 2 * 16, dtype=dtype)
        assert not gl._bmm_ok(x, 16, (1, 2))
        assert gl._bmm_ok(x, 16, (2, 2))
        assert gl._bmm_ok(torch.empty(32, 3 * 16, dtype=dtype), 16, (1, 2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("small", [True, False])
def test_width_one_groups_multiply_sum_or_bmm(dtype, small, monkeypatch):
    """Width-1 groups: the multiply-sum in fp32, and in fp16/bf16 below 8 groups, at k > 16 or
    at few rows; otherwise one baddbmm. Both against the float64 reference, forward and
    backward."""
    if not small:
        monkeypatch.setattr(gl, "_MULSUM_LOWP_MIN_MT", 0)
    ran = []
    monkeypatch.setattr(torch, "baddbmm", lambda *a, _f=torch.baddbmm: ran.append(1) or _f(*a))
    ins, outs, M = (8,) * 8, (1,) * 8, 13
    x = torch.randn(M, sum(ins), dtype=dtype, requires_grad=True)
    w = (torch.randn(sum(outs) * 8) / 3).to(dtype).requires_grad_()
    b = torch.randn(sum(outs), dtype=dtype, requires_grad=True)
    y = torch.cat(gl.grouped_linear_parts(x, w, b, ins, outs), dim=1)
    assert bool(ran) == (not small and dtype != torch.float32)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = gl.grouped_linear_reference(*ref_leaves, ins, outs)
    assert rel_err(y, ref) < TOL[dtype]
    g = torch.randn(M, sum(outs), dtype=torch.float64)
    for got, exp in zip(torch.autograd.grad(y, [x, w, b], g.to(dtype)),
                        torch.autograd.grad(ref, ref_leaves, g), strict=True):
        assert got.dtype == dtype and rel_err(got, exp) < TOL[dtype]


def test_parts_bad_arguments_are_named():
    with pytest.raises(ValueError, match="grouped_linear_parts: x must be"):
        gl.grouped_linear_parts(torch.randn(3, 5), torch.randn(8), None, (2, 2), (2, 2))


def test_padding_is_exact_for_inf_weights(monkeypatch):
    """Padded rows are zeros, never copies of a real row: an inf weight in a narrow head gives
    the loop's gradients (no 0 * inf = NaN from the padding)."""
    _select(monkeypatch, "padded bmm")
    ins, outs = PATHS["padded bmm"][:2]
    w = torch.randn(sum(gl.block_sizes(ins, outs)))
    w[0] = float("inf")  # group 0 (width 1) is padded to 7 rows
    x = torch.randn(6, sum(ins), requires_grad=True)
    wp = w.clone().requires_grad_()
    y = torch.cat(gl.grouped_linear_parts(x, wp, None, ins, outs), dim=1)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, [x, wp], g)
    wr = w.clone().requires_grad_()
    ref = gl.grouped_linear_reference(x, wr, None, ins, outs)
    rgx, rgw = torch.autograd.grad(ref, [x, wr], g)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(gx.isnan(), rgx.isnan())
    assert torch.equal(gw.isnan(), rgw.isnan())


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_heads_match_loop_on_every_path(path, dtype, monkeypatch):
    aten_heads(monkeypatch)
    _select(monkeypatch, path)
    ins, outs = PATHS[path][:2]
    fused = FusedHeads(6, {f"t{i}": n for i, n in enumerate(outs)}, hidden=list(ins),
                       activation="gelu", dtype=dtype)
    _assert_matches_unfused(fused, torch.randn(3, 5, 6, dtype=dtype, requires_grad=True))


def _assert_matches_unfused(fused, z):
    """Outputs, input gradient and every parameter gradient (each fused block against its
    unfused parameter, in the fused dtype) equal the unfused heads'."""
    plain = fused.unfuse()
    out = fused(z)
    ref = {t: head(z) for t, head in plain.items()}
    seeds = {t: torch.randn_like(v) for t, v in ref.items()}
    got = torch.autograd.grad(sum((out[t] * seeds[t]).sum() for t in out),
                              [z, *fused.parameters()])
    want = torch.autograd.grad(sum((ref[t] * seeds[t]).sum() for t in ref),
                               [z, *plain.parameters()])
    tol = TOL[z.dtype] * 2
    for t in ref:
        assert out[t].shape == ref[t].shape and rel_err(out[t], ref[t]) < tol, t
    assert rel_err(got[0], want[0]) < tol
    fused_g = dict(zip([n for n, _ in fused.named_parameters()], got[1:], strict=True))
    plain_g = dict(zip([n for n, _ in plain.named_parameters()], want[1:], strict=True))
    for name, blocks in fused._param_blocks().items():
        parts = fused_g[name].reshape(-1).split([b.numel() for _, b in blocks])
        for (key, block), g in zip(blocks, parts, strict=True):
            assert g.dtype == z.dtype and rel_err(g.view(block.shape), plain_g[key]) < tol, key


def _heads_loop_from(monkeypatch, dtype, mk):
    # (fp32 too: on a CPU with no native low-precision GEMM the op's GEMMs run in fp32, and
    # the rule reads their dtype)
    for dt in {dtype, torch.float32}:
        monkeypatch.setitem(gl._HEADS_LOOP_MK, ("cpu", dt), mk)
    monkeypatch.setattr(gl, "_HEADS_LOOP_MIN", min(gl._HEADS_LOOP_MK.values()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("aten", [True, False])
def test_large_groups_run_each_head_on_its_own(dtype, activation, bias, aten, monkeypatch):
    """Past ``_HEADS_LOOP_MK`` each MLP head runs both layers on views of the fused parameters
    (no fused hidden layer, no grouped second layer; as ATen ops, or the C++ op's per-head
    form): same outputs and gradients as the unfused heads, at ragged hidden and output
    widths."""
    if aten:
        aten_heads(monkeypatch)
    _heads_loop_from(monkeypatch, dtype, 0)
    ran = _spy(monkeypatch)
    torch.manual_seed(0)
    fused = FusedHeads(6, {"a": 1, "b": 7, "c": 3}, hidden=[5, 2, 4], activation=activation,
                       bias=bias, dtype=dtype)
    _assert_matches_unfused(fused, torch.randn(2, 5, 6, dtype=dtype, requires_grad=True))
    assert ran == []


def test_large_groups_dropout_is_per_head_and_off_in_eval(monkeypatch):
    _heads_loop_from(monkeypatch, torch.float32, 0)
    fused = FusedHeads(6, {"a": 3, "b": 3}, hidden=4, dropout=0.5)
    plain = fused.unfuse().eval()
    z = torch.randn(64, 6)
    fused.eval()
    for t, y in fused(z).items():
        assert rel_err(y, plain[t](z)) < 1e-6
    fused.train()
    torch.manual_seed(0)
    train = fused(z)
    assert not torch.equal(train["a"], fused.eval()(z)["a"])


def test_eager_paths_skip_the_custom_op_and_func_transforms_keep_it(monkeypatch):
    aten_heads(monkeypatch)
    ran = _spy(monkeypatch)
    fused = FusedHeads(6, {"a": 2, "b": 2}, hidden=4)
    z = torch.randn(3, 6)
    fused(z)
    assert ran == ["_parts_bmm"]
    ran.clear()
    names = [n for n, _ in fused.named_parameters()]
    params = dict(zip(names, [p.detach() for p in fused.parameters()], strict=True))
    torch.func.grad(lambda p: sum(v.sum() for v in torch.func.functional_call(
        fused, p, (z,)).values()))(params)
    assert ran == ["grouped_linear"]


#: ATen ops that only make views (no kernel launch on a GPU)
_VIEWS = {"view", "_unsafe_view", "transpose", "t", "unsqueeze", "expand", "detach", "split",
          "split_with_sizes", "select", "slice", "unbind", "permute", "alias", "squeeze"}


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _ops_per_step(model, z, cot):
    """(all ATen ops, ops that compute) of one forward + backward."""
    params = list(model.parameters())
    model(z)  # once before counting: first-call work (cached pad indices) is not per step
    with _CountOps() as mode:
        out = model(z)
        loss = (torch.cat(list(out.values()), dim=-1) * cot).sum()
        torch.autograd.grad(loss, [z, *params])
    return len(mode.ops), sum(op not in _VIEWS for op in mode.ops)


@pytest.mark.parametrize("T", [2, 8, 40])
@pytest.mark.parametrize("widths", ["binary", "uniform", "ragged"])
def test_mlp_heads_dispatch_no_more_aten_ops_than_concat_bmm(T, widths):
    """Structural (not timed): ATen ops dispatched by forward + backward, the host cost per
    step (on a GPU the computing ones are the kernel launches), at sizes where the CPU takes
    the bmm path. Ragged widths at T=2 are the known exception: the packed weights are
    gathered into the padded layout every step (pad + index_select, and their backward),
    which the hand fusion skips by storing padded copies as its parameters."""
    outs = {"binary": [1] * T, "uniform": [4] * T, "ragged": [(3 * t) % 7 + 1 for t in range(T)]}
    torch.manual_seed(0)
    heads = nn.ModuleDict({f"t{t}": nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, n))
                           for t, n in enumerate(outs[widths])})
    fused = mtlfast.fuse_heads(heads)
    concat = baselines.ConcatBmmHeads(heads)
    z = torch.randn(32, 16, requires_grad=True)
    cot = torch.randn(32, sum(outs[widths]))
    (all_f, compute_f), (all_c, compute_c) = _ops_per_step(fused, z, cot), \
        _ops_per_step(concat, z, cot)
    if widths == "ragged" and T == 2:
        assert compute_f <= compute_c + 10 and all_f <= all_c + 16
        return
    assert compute_f <= compute_c, (compute_f, compute_c)
    if T >= 8:
        assert all_f <= all_c, (all_f, all_c)


def test_large_groups_rule_by_dtype():
    """Whole heads on their own from M * hidden > 2^15 in fp32, > 2^17 in bf16; never on
    devices without a measured threshold."""
    assert not gl._large_groups(torch.empty(2**9, 64), (64, 8))
    assert gl._large_groups(torch.empty(2**10, 64), (64, 8))
    assert not gl._large_groups(torch.empty(2**10, 64, dtype=torch.bfloat16), (64, 8))
    assert gl._large_groups(torch.empty(2**10, 64, dtype=torch.bfloat16), (256, 8))
    assert not gl._large_groups(torch.empty(2**20, 64, device="meta"), (256,))


@pytest.mark.parametrize(("T", "k", "M", "bmm"), [(7, 4, 2**11, False), (8, 32, 2**10, False),
                                                   (8, 16, 2**9, False), (8, 16, 2**10, True)])
def test_width_one_rule_in_low_precision(T, k, M, bmm, monkeypatch):
    ran = []
    monkeypatch.setattr(torch, "baddbmm", lambda *a, _f=torch.baddbmm: ran.append(1) or _f(*a))
    x = torch.randn(M, T * k, dtype=torch.bfloat16)
    gl.grouped_linear_parts(x, torch.randn(T * k, dtype=torch.bfloat16),
                            torch.randn(T, dtype=torch.bfloat16), (k,) * T, (1,) * T)
    assert bool(ran) == bmm
