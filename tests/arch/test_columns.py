"""Column architectures (Cross-stitch, MTAN, LTB): the batched modules against their plain
LibMTL-style references (forward, backward, BatchNorm state, dtypes), state_dict interop both
ways, gradcheck, odd sizes, bad input, and ``mtlfast.backward`` on each."""

import copy
import io

import pytest
import torch
from torch import nn

import mtlfast
from mtlfast.arch import (
    LTB,
    MTAN,
    CrossStitch,
    CrossStitchLoop,
    LTBLoop,
    MTANLoop,
    StackedColumns,
    register_batchable,
    resnet,
    split_stages,
)
from mtlfast.methods import MGDA, UW, UPGrad
from tests.conftest import rel_err

ARCHS = ["cross_stitch", "mtan", "ltb"]


def _factory(width=4, layers=(1, 2, 2, 2), block="basic"):
    return lambda: resnet(layers, width, block)


def _pair(arch, T=3, width=4, block="basic", layers=(1, 2, 2, 2)):
    """(batched, reference) with the same parameters (random stitch/alpha), training mode."""
    f = _factory(width, layers, block)
    if arch == "cross_stitch":
        ref = CrossStitchLoop(T, f)
        bat = CrossStitch(T, f)
    elif arch == "mtan":
        enc = f()
        ref = MTANLoop(T, copy.deepcopy(enc))
        bat = MTAN(T, enc)
    else:
        ref = LTBLoop(T, f)
        bat = LTB(T, f)
        ref.set_epoch(5, 10)
        bat.set_epoch(5, 10)
    with torch.no_grad():
        for p in (getattr(ref, "stitch", None), getattr(ref, "alpha", None)):
            if p is not None:
                p.uniform_(-1, 1)
        for m in ref.modules():  # non-trivial running statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    bat.load_state_dict(ref.state_dict())
    return bat, ref


def _run(model, x, seed=1):
    torch.manual_seed(seed)  # LTB: the same Gumbel noise for both
    return model(x)


def _gumbel_fp32_noise(logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
    """``F.gumbel_softmax`` (straight-through when ``hard``) with its noise drawn in fp32
    whatever the logits' dtype: a model's fp64 twin then samples what the model samples."""
    g = -torch.empty(logits.shape, dtype=torch.float32).exponential_().log()
    y = ((logits + g.to(logits.dtype)) / tau).softmax(dim)
    if not hard:
        return y
    one_hot = torch.zeros_like(y).scatter_(dim, y.argmax(dim, keepdim=True), 1.0)
    return one_hot - y.detach() + y


def _grads(model, ref):
    """The batched model's parameter gradients in the reference's layout (by state_dict key)."""
    saved = [p.data for p in model.parameters()]
    for p in model.parameters():
        p.data = p.grad if p.grad is not None else torch.zeros_like(p)
    sd = model.state_dict()
    for p, d in zip(model.parameters(), saved, strict=True):
        p.data = d
    names = dict(ref.named_parameters())
    return {k: sd[k] for k in names}


def _ref_grads(ref):
    return {k: p.grad if p.grad is not None else torch.zeros_like(p)
            for k, p in ref.named_parameters()}


def _loss(outs):
    return sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() + o.pow(2).mean()
               for o in outs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("T,B", [(3, 2), (1, 2), (2, 1)])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_matches_reference(arch, T, B, train, dtype, monkeypatch):
    """Forward, input and parameter gradients, BatchNorm buffers. float64 shows the two
    definitions agree to rounding. In float32 the gradients are held to the fp32 reference's
    own error against its float64 twin (training-mode BatchNorm over two samples cancels
    most of the input gradient, and the fp32 reference alone misses it by 1e-4 to 1e-1
    depending on the draw and on the CPU's GEMM kernels), and to 1e-3 where that is smaller."""
    monkeypatch.setattr(torch.nn.functional, "gumbel_softmax", _gumbel_fp32_noise)
    tol, atol = (1e-3, 1e-5) if dtype == torch.float32 else (1e-9, 1e-11)
    bat, ref = _pair(arch, T)
    bat.to(dtype).train(train)
    ref.to(dtype).train(train)
    twin = copy.deepcopy(ref).double()
    size = 64 if B == 1 else 32  # B=1 in training: BatchNorm needs > 1 value per channel
    x = torch.randn(B, 3, size, size, dtype=dtype, requires_grad=True)
    out_b, out_r = _run(bat, x), _run(ref, x)
    assert len(out_b) == len(out_r) == T
    for a, b in zip(out_b, out_r, strict=True):
        assert a.shape == b.shape and a.dtype == dtype
        assert rel_err(a, b) < tol / 10
    _loss(out_b).backward()
    gx = x.grad.clone()
    x.grad = None
    _loss(out_r).backward()
    gb, gr = _grads(bat, ref), _ref_grads(ref)
    assert all(gb[k].shape == gr[k].shape for k in gr)
    x64 = x.detach().double().requires_grad_()
    _loss(_run(twin, x64)).backward()
    g64 = _ref_grads(twin)
    flat = [torch.cat([g[k].reshape(-1).double() for k in gr]) for g in (gb, gr, g64)]
    for got, own, exact in ((gx.double(), x.grad.double(), x64.grad), flat):
        assert rel_err(got, exact) < max(tol, 2 * rel_err(own, exact))
    if dtype == torch.float64:  # each parameter (a bias before a training-mode BatchNorm has
        for k in gr:            # a zero gradient: atol)
            assert rel_err(gb[k], gr[k]) < tol or (gb[k] - gr[k]).abs().max() < atol, k
    # BatchNorm running statistics (and counters) updated alike
    sb, sr = bat.state_dict(), ref.state_dict()
    assert list(sb) == list(sr)
    for k in sr:
        assert torch.allclose(sb[k].double(), sr[k].double(), rtol=1e-5, atol=1e-6), k


def test_default_encoder_is_initialised_as_torchvision():
    """Convolutions kaiming-normal over fan_out (std sqrt(2 / (C_out k^2))), BatchNorm 1 / 0."""
    torch.manual_seed(0)
    enc = resnet((2, 2, 2, 2), 64)
    conv = enc.layer1[0].conv1
    want = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert abs(conv.weight.std().item() / want - 1) < 0.05
    assert torch.equal(enc.bn1.weight, torch.ones(64)) and torch.equal(enc.bn1.bias,
                                                                       torch.zeros(64))


@pytest.mark.parametrize("arch", ARCHS)
def test_bottleneck_encoder(arch):
    bat, ref = _pair(arch, T=2, width=4, block="bottleneck")
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(_run(bat, x), _run(ref, x), strict=True):
        assert rel_err(a, b) < 1e-4
    if arch == "mtan":
        assert bat.expansion == 4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_forward(arch, dtype):
    bat, ref = _pair(arch, T=2)
    bat.eval()
    ref.eval()
    x = torch.randn(2, 3, 32, 32)
    want = _run(ref, x)
    try:
        got = _run(bat.to(dtype), x.to(dtype))
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - depends on the build
        pytest.skip(f"{dtype} convolution not supported on this CPU build: {e}")
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype
        assert rel_err(a, b) < (2e-2 if dtype == torch.float16 else 8e-2)


@pytest.mark.parametrize("arch", ARCHS)
def test_autocast_bf16_matches_reference_under_autocast(arch):
    """Under torch.autocast the columns compute as their loop definition does (bf16 convs;
    compared in eval mode: training-mode BatchNorm over 2 values amplifies rounding), and a
    training step back-propagates into fp32 gradients."""
    bat, ref = _pair(arch, T=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = _run(bat.eval(), x), _run(ref.eval(), x)
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype == torch.bfloat16
            assert rel_err(a, b) < 8e-2
        _loss([o.float() for o in _run(bat.train(), x)]).backward()
    assert all(p.grad is None or (p.grad.dtype == torch.float32 and p.grad.isfinite().all())
               for p in bat.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_gradcheck_fp64(arch):
    bat, _ = _pair(arch, T=2, width=2, layers=(1, 2, 2, 2))
    bat = bat.double().eval()  # eval: a deterministic function of x (LTB: argmax branching)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    extra = getattr(bat, "stitch", None)

    def f(x, *p):
        return torch.cat([o.reshape(-1) for o in bat(x)])

    inputs = (x,) if extra is None else (x, extra)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, nondet_tol=0.0,
                                    fast_mode=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_both_ways_through_files_and_unfuse(arch):
    bat, ref = _pair(arch)
    assert list(bat.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    bat.eval()
    # batched -> a fresh reference, through a file
    with torch.no_grad():
        for p in bat.parameters():
            p.mul_(1.25)
    buf = io.BytesIO()
    torch.save(bat.state_dict(), buf)
    buf.seek(0)
    other = _pair(arch)[1].eval()
    other.load_state_dict(torch.load(buf))
    for a, b in zip(_run(bat, x), _run(other, x), strict=True):
        assert rel_err(a, b) < 1e-5
    # reference -> a fresh batched model
    fresh = _pair(arch)[0].eval()
    fresh.load_state_dict(other.state_dict())
    for a, b in zip(_run(fresh, x), _run(bat, x), strict=True):
        assert rel_err(a, b) < 1e-5
    # unfuse: the plain definition, equal outputs, same keys
    plain = bat.unfuse()
    assert type(plain) is type(ref)
    assert list(plain.state_dict()) == list(bat.state_dict())
    for a, b in zip(_run(plain, x), _run(bat, x), strict=True):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_partial_checkpoint_reports_per_task_keys(arch):
    bat, ref = _pair(arch, T=2)
    sd = ref.state_dict()
    key = next(k for k in sd if ".1." in k and k.endswith("weight") and
               ("columns" in k or "encoder_att" in k))
    del sd[key]
    result = bat.load_state_dict(sd, strict=False)
    assert result.missing_keys == [key] and result.unexpected_keys == []
    with pytest.raises(RuntimeError, match="size mismatch"):
        sd = ref.state_dict()
        sd[key] = torch.zeros(1)
        bat.load_state_dict(sd)


@pytest.mark.parametrize("arch", ARCHS)
def test_stacked_output(arch):
    bat, _ = _pair(arch, T=3)
    bat.eval()
    x = torch.randn(2, 3, 32, 32)
    outs = _run(bat, x)
    torch.manual_seed(1)
    st = bat(x, stacked=True)
    assert st.shape == (2, 3, *outs[0].shape[1:])
    for t in range(3):
        assert torch.equal(st[:, t], outs[t])


def _heads(model, T, x):
    with torch.no_grad():
        C = _run(model, x)[0].shape[1]
    return nn.ModuleList([nn.Conv2d(C, 1, 1) for _ in range(T)])


def _losses(model, heads, x, y):
    outs = _run(model, x)
    return [nn.functional.mse_loss(h(o).mean((1, 2, 3)), y[:, t])
            for t, (h, o) in enumerate(zip(heads, outs, strict=True))]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,mode", [
    (UPGrad, "jacobian"), (UPGrad, "gramian"), (MGDA, "jacobian"), (MGDA, "gramian"),
    (UW, "auto"),  # a loss method: one weighted backward (the engine refuses the other modes)
])
def test_mtlfast_backward(arch, mode, method):
    """Same ``.grad`` for the batched model as for the reference (shared and task-specific)."""
    T = 3
    bat, ref = _pair(arch, T)
    x, y = torch.randn(4, 3, 16, 16), torch.randn(4, T)
    heads = _heads(ref, T, x)
    heads_b = copy.deepcopy(heads)
    for model, hs in ((bat, heads_b), (ref, heads)):
        m = method(T) if method is UW else method()
        info = mtlfast.backward(_losses(model, hs, x, y), model.shared_parameters(), m,
                                mode=mode)
        assert info is not None
    gb, gr = _grads(bat, ref), _ref_grads(ref)
    shared = {id(p) for p in ref.shared_parameters()}
    names = {k for k, p in ref.named_parameters() if id(p) in shared}
    assert names  # something is shared
    for keys in (sorted(names), list(gr)):  # the combined shared gradient; everything
        b = torch.cat([gb[k].reshape(-1) for k in keys])
        r = torch.cat([gr[k].reshape(-1) for k in keys])
        assert torch.isfinite(b).all()
        assert rel_err(b, r) < 1e-3
    for hb, hr in zip(heads_b.parameters(), heads.parameters(), strict=True):
        assert rel_err(hb.grad, hr.grad) < 1e-4


def test_shared_parameter_conventions():
    for arch in ("cross_stitch", "ltb"):
        for model in _pair(arch):  # batched and reference: the tail stage is task-specific
            shared = {id(p) for p in model.shared_parameters()}
            tail = {id(p) for p in model.task_parameters()}
            assert tail == {id(p) for p in model.columns[4].parameters()}
            assert shared | tail == {id(p) for p in model.parameters()}
            assert not shared & tail
    cs, _ = _pair("cross_stitch")
    assert cs.stitch_parameters() == [cs.stitch]
    ltb, _ = _pair("ltb")
    assert ltb.branch_parameters() == [ltb.alpha]
    mt, _ = _pair("mtan")
    shared = {id(p) for p in mt.shared_parameters()}
    want = {id(p) for n, p in mt.named_parameters() if n.startswith(("shared_conv",
                                                                      "shared_layer"))}
    assert shared == want
    more = {id(p) for p in mt.shared_parameters(include_block_att=True)}
    assert more == want | {id(p) for p in mt.encoder_block_att.parameters()}


# ---------------------------------------------------------------------- batching machinery

class _Scale(nn.Module):
    """Not in the batchable set: forces the loop fallback."""

    def __init__(self, c):
        super().__init__()
        self.s = nn.Parameter(torch.randn(c))

    def forward(self, x):
        return x * self.s.view(1, -1, 1, 1)


def _stages():
    return [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), _Scale(4)),
            nn.Sequential(nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.MaxPool2d(2))]


def test_unbatchable_stage_falls_back_to_a_loop():
    ref = CrossStitchLoop(3, _stages, stitch_after=[0, 1])
    bat = CrossStitch(3, _stages, stitch_after=[0, 1])
    assert bat.batched_stages == (True, False, True)
    assert list(bat.state_dict()) == list(ref.state_dict())
    bat.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 8, 8)
    for a, b in zip(bat(x), ref(x), strict=True):
        assert rel_err(a, b) < 1e-6
    with pytest.raises(ValueError, match="cannot be batched"):
        CrossStitch(3, _stages, batched=True)
    loop = CrossStitch(3, _stages, stitch_after=[0, 1], batched=False)
    assert loop.batched_stages == (False, False, False)
    loop.load_state_dict(ref.state_dict())
    for a, b in zip(loop(x), ref(x), strict=True):
        assert rel_err(a, b) < 1e-6


def test_wide_stages_stay_separate_modules(monkeypatch):
    """batched=None keeps stages with wide convolutions as T modules (LOOP_CHANNELS)."""
    import mtlfast.arch._columns as columns

    monkeypatch.setattr(columns, "LOOP_CHANNELS", 16)
    ref = CrossStitchLoop(2, _factory())
    bat = CrossStitch(2, _factory())
    assert bat.batched_stages == (True, True, True, False, False)  # widths 4, 8, 16, 32
    assert CrossStitch(2, _factory(), batched=True).batched_stages == (True,) * 5
    bat.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(bat(x), ref(x), strict=True):
        assert rel_err(a, b) < 1e-5


def test_register_batchable():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x)

    mods = [Res() for _ in range(2)]
    assert not StackedColumns(mods).batched
    register_batchable(Res)
    st = StackedColumns(mods)
    assert st.batched
    x = torch.randn(2, 8, 5, 5)
    want = torch.cat([m(xi) for m, xi in zip(mods, x.chunk(2, 1), strict=True)], 1)
    assert rel_err(st(x), want) < 1e-6
    with pytest.raises(TypeError, match="cls"):
        register_batchable(3)


def test_split_stages_rule():
    enc = resnet((1, 1, 1, 1), 4)
    stages = split_stages(enc)
    assert len(stages) == 5 and stages[1] is enc.layer1 and stages[0][0] is enc.conv1
    seq = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
    assert split_stages(seq) == list(seq)
    with pytest.raises(TypeError, match="encoder"):
        split_stages(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least one stage"):
        split_stages([])


# ---------------------------------------------------------------------- LTB schedule

def test_ltb_schedule():
    bat, _ = _pair("ltb", T=3)
    ones = bat.branch_weights(0, 200)  # warm-up: epoch < epochs / 100
    assert torch.equal(ones, torch.ones(4, 3, 3))
    a = bat.branch_weights(50, 200)
    assert torch.equal(a.sum(-1), torch.ones(4, 3)) and set(a.unique().tolist()) <= {0.0, 1.0}
    a.sum().backward()  # straight-through gradient into alpha
    assert bat.alpha.grad is not None
    bat.eval()
    det = bat.branch_weights(50, 200)
    assert torch.equal(det.argmax(-1), bat.alpha.argmax(-1))
    bat.sample_in_eval = True
    torch.manual_seed(3)
    s1 = bat.branch_weights(50, 200)
    torch.manual_seed(3)
    assert torch.equal(s1, bat.branch_weights(50, 200))


# ---------------------------------------------------------------------- bad input

@pytest.mark.parametrize("build,err,match", [
    (lambda: CrossStitch(0, _factory()), ValueError, "tasks"),
    (lambda: CrossStitch("ab", _factory()), TypeError, "tasks"),
    (lambda: CrossStitch(["a", "a"], _factory()), ValueError, "duplicate"),
    (lambda: CrossStitch(["a.b"], _factory()), ValueError, "tasks"),
    (lambda: CrossStitch(2, nn.Linear(2, 2)), TypeError, "encoder"),
    (lambda: CrossStitch(2, _factory(), stitch_after=[4]), ValueError, "stitch_after"),
    (lambda: CrossStitch(2, _factory(), stitch_after=[2, 1]), ValueError, "stitch_after"),
    (lambda: CrossStitch(2, _factory(), stitch_after=3), TypeError, "stitch_after"),
    (lambda: LTB(True, _factory()), TypeError, "tasks"),
    (lambda: LTB(2, [nn.Conv2d(3, 3, 1)]), ValueError, "encoder"),
    (lambda: MTAN(2, _factory(), expansion=2), ValueError, "expansion"),
    (lambda: MTAN(2, [nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)]), TypeError, "encoder stage"),
    (lambda: MTAN(2, resnet((1, 1, 1, 1), 4)), ValueError, "encoder stage"),
    (lambda: MTAN(2, [nn.ReLU(), nn.Sequential(nn.ReLU())]), ValueError, "encoder"),
    (lambda: resnet(width=0), ValueError, "width"),
    (lambda: resnet(layers=(1, 1)), ValueError, "layers"),
    (lambda: resnet(block="wide"), ValueError, "block"),
])
def test_bad_construction(build, err, match):
    with pytest.raises(err, match=match):
        build()


def test_ltb_needs_a_schedule():
    model = LTB(2, _factory())
    with pytest.raises(ValueError, match="set_epoch"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="epochs"):
        model.set_epoch(0, 0)
    with pytest.raises(ValueError, match="epoch"):
        model.set_epoch(-1, 10)


@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_mtan_shared_block_batchnorm_as_t_sequential_calls(momentum):
    """The shared attention blocks' running statistics after steps equal LibMTL's T calls."""
    bat, ref = _pair("mtan", T=4)
    for model in (bat, ref):
        for m in model.encoder_block_att.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum
    bat.double()
    ref.double()
    for _ in range(3):
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        for a, b in zip(bat(x), ref(x), strict=True):
            assert rel_err(a, b) < 1e-10
    sb, sr = bat.state_dict(), ref.state_dict()
    for k in sr:
        if k.startswith("encoder_block_att"):
            assert torch.allclose(sb[k], sr[k], rtol=1e-10, atol=1e-12), k
    assert int(sr["encoder_block_att.0.bn1.num_batches_tracked"]) == 12


def test_encoder_forms():
    """A factory (independent columns), one module (deep-copied: equal columns), T modules."""
    torch.manual_seed(0)
    a = CrossStitch(2, _factory())
    w = a.state_dict()
    assert not torch.equal(w["columns.0.0.0.weight"], w["columns.0.1.0.weight"])
    enc = resnet((1, 1, 1, 1), 4)
    b = CrossStitch(2, enc).state_dict()
    assert torch.equal(b["columns.0.0.0.weight"], b["columns.0.1.0.weight"])
    assert torch.equal(b["columns.0.0.0.weight"], enc.conv1.weight)
    encs = [resnet((1, 1, 1, 1), 4) for _ in range(2)]
    c = LTB(["x", "y"], encs).state_dict()
    assert torch.equal(c["columns.2.1.0.conv1.weight"], encs[1].layer2[0].conv1.weight)


def test_stem_without_a_leading_conv_reads_a_repeated_input():
    from mtlfast.arch import BasicBlock

    def stages():
        down = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
        return [BasicBlock(3, 4, downsample=down), nn.Sequential(BasicBlock(4, 4))]

    ref = LTBLoop(3, stages)
    bat = LTB(3, stages)
    assert bat.batched_stages == (True, True) and bat.columns[0]._repeat
    bat.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 6, 6)
    torch.manual_seed(2)
    want = ref(x, 10, 10)
    torch.manual_seed(2)
    for a, b in zip(bat(x, 10, 10), want, strict=True):
        assert rel_err(a, b) < 1e-5


# ---------------------------------------------------------------------- LibMTL checkpoints

class _LibMTLColumns(nn.Module):
    """LibMTL's ``_transform_resnet_cross`` / ``_transform_resnet_ltb`` layout and forward
    (restated here for a conformance check): per-task stems in a ModuleDict, per-layer
    ModuleLists, ``cross_unit`` (4, T, T) or ``alpha`` (6, T, T)."""

    def __init__(self, encoders, tasks, kind):
        super().__init__()
        self.tasks, self.kind = tasks, kind
        self.resnet_conv = nn.ModuleDict({t: nn.Sequential(e.conv1, e.bn1, e.relu, e.maxpool)
                                          for t, e in zip(tasks, encoders, strict=True)})
        self.resnet_layer = nn.ModuleDict({str(i): nn.ModuleList(
            [getattr(e, f"layer{i + 1}") for e in encoders]) for i in range(4)})
        T = len(tasks)
        if kind == "cross":
            self.cross_unit = nn.Parameter(torch.rand(4, T, T))
        else:
            self.alpha = nn.Parameter(torch.rand(6, T, T))

    def forward(self, x, epoch=None, epochs=None):
        T = len(self.tasks)
        if self.kind == "cross":
            rep = [self.resnet_layer["0"][t](self.resnet_conv[n](x))
                   for t, n in enumerate(self.tasks)]
            for i in range(1, 4):
                rep = [self.resnet_layer[str(i)][t](sum(self.cross_unit[i - 1][t][j] * rep[j]
                                                        for j in range(T))) for t in range(T)]
            return rep
        if epoch < epochs / 100:
            alpha = torch.ones(6, T, T)
        else:
            alpha = nn.functional.gumbel_softmax(self.alpha, dim=-1,
                                                 tau=epochs / 20 / (epoch + 1) ** 0.5, hard=True)
        rep = [self.resnet_conv[n](x) for n in self.tasks]
        for i in range(1, 5):
            rep = [self.resnet_layer[str(i - 1)][t](sum(alpha[i, t, j] * rep[j]
                                                        for j in range(T))) for t in range(T)]
        return rep


@pytest.mark.parametrize("kind", ["cross", "ltb"])
def test_libmtl_checkpoint_loads_and_matches_its_forward(kind, monkeypatch):
    tasks = ["seg", "depth", "normal"]
    lib = _LibMTLColumns([resnet((1, 2, 2, 2), 4) for _ in tasks], tasks, kind).eval()
    sd = {f"encoder.{k}": v for k, v in lib.state_dict().items()}  # a whole LibMTL model's
    sd["decoders.seg.weight"] = torch.zeros(1)
    model = CrossStitch(tasks, _factory()) if kind == "cross" else LTB(tasks, _factory())
    model.eval()
    model.load_libmtl_state_dict(sd)
    # LibMTL samples the branching in eval mode too; make the "sample" the argmax for both
    monkeypatch.setattr(nn.functional, "gumbel_softmax", lambda logits, tau, hard, dim:
                        nn.functional.one_hot(logits.argmax(dim), logits.shape[dim]).float())
    if kind == "ltb":
        model.sample_in_eval = True
    x = torch.randn(2, 3, 32, 32)
    for schedule in ((0, 200), (50, 200)) if kind == "ltb" else ((None, None),):
        want = lib(x, *schedule)
        got = model(x, *schedule) if kind == "ltb" else model(x)
        for a, b in zip(got, want, strict=True):
            assert rel_err(a, b) < 1e-5
    with pytest.raises(ValueError, match="task 'seg'"):
        (CrossStitch(3, _factory()) if kind == "cross" else LTB(3, _factory())) \
            .load_libmtl_state_dict(sd)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("which", ["batched", "loop"])
@pytest.mark.parametrize("x, error, match", [
    ([[1.0]], TypeError, "x must be a torch.Tensor"),
    (torch.ones(2, 3, 16, 16, dtype=torch.long), TypeError, "floating point"),
    (torch.randn(3, 16, 16), ValueError, r"x must be \(batch, 3, height, width\)"),
    (torch.randn(2, 4, 16, 16), ValueError, r"x must be \(batch, 3, height, width\)"),
    (torch.randn(2, 3, 16, 16, dtype=torch.float64), TypeError, "x has dtype torch.float64"),
    (torch.randn(2, 3, 16, 16, device="meta"), ValueError, "x is on meta"),
])
def test_bad_input_names_the_problem(arch, which, x, error, match):
    bat, ref = _pair(arch)
    with pytest.raises(error, match=match):
        (bat if which == "batched" else ref)(x)


@pytest.mark.parametrize("arch", ARCHS)
def test_empty_batch_matches_the_loop_and_leaves_the_statistics(arch):
    """B=0 in training mode: empty outputs of the right shape and the same state as the loop
    (BatchNorm's running statistics untouched by an empty batch), then normal steps agree."""
    bat, ref = _pair(arch)
    for B in (0, 4):
        x = torch.randn(B, 3, 32, 32)
        torch.manual_seed(1)  # LTB: the same Gumbel noise for both
        a = bat(x, stacked=True)
        torch.manual_seed(1)
        b = ref(x, stacked=True)
        assert a.shape == b.shape and a.shape[0] == B
        if B:
            assert rel_err(a, b) < 1e-4
        sa, sb = bat.state_dict(), ref.state_dict()
        for k in sa:
            assert torch.isfinite(sa[k].float()).all() and rel_err(sa[k], sb[k]) < 1e-4, k
