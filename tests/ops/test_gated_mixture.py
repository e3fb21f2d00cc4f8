"""Softmax gates and their mixture as one op: the C++ kernel and the unfused path against the
per-gate loop reference over gate families (dense MMoE gates, CGC / PLE subsets, ragged and
one-column gates, one expert), widths across the kernel's vector blocks and tails,
dtypes, strided inputs, batched gradients, extreme logits, bad input; ``GateBank.mix``."""

import pytest
import torch

from mtlfast import _ext
from mtlfast.arch.gates import GateBank
from mtlfast.ops import gated_mixture as gm
from mtlfast.ops._dispatch import backend
from mtlfast.ops.mixture import mixture
from tests.conftest import count_calls, rel_err

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def _family(name: str) -> tuple[list[list[int]], int]:
    """(per-gate expert lists, E)."""
    if name == "mmoe":  # dense, every gate over all experts in order
        return [list(range(6))] * 5, 6
    if name == "cgc":  # 2 shared + 1 or 2 own per task
        return [[0, 1, 2], [0, 1, 3, 4], [0, 1, 5]], 6
    if name == "ple_inner":  # shared gate over all, task gates of 2
        return [list(range(9))] + [[0, t + 1] for t in range(8)], 9
    if name == "ragged":  # permuted column orders, sizes 3, 1, 5, 2
        return [[4, 0, 2], [3], [1, 4, 0, 3, 2], [2, 1]], 5
    if name == "many":  # 17 gates: their gradient rows 4 KB apart at B=32, D=32
        return [[t % 4, (t + 1) % 4] for t in range(17)], 4
    if name == "one_column":
        return [[1], [0], [2]], 3
    return [[0]], 1  # E = 1


FAMILIES = ["mmoe", "cgc", "ple_inner", "ragged", "one_column", "single"]


def _inputs(name, B, D, dtype, layout="arch", scale=1.0, seed=0):
    torch.manual_seed(seed)
    sel, E = _family(name)
    experts = torch.tensor([e for s in sel for e in s])
    sizes = [len(s) for s in sel]
    N = sum(sizes)
    if layout == "arch":  # logits a GEMM's (B, N); h a transposed view of (B, E, D)
        logits = torch.randn(B, N) * scale
        h = torch.randn(B, E, D).transpose(0, 1)
    else:  # a strided logits view and a (E, B, D) h with a non-unit last stride
        logits = torch.randn(N, B).t() * scale
        h = torch.randn(E, B, D, 2)[..., 0]
    dz = torch.randn(len(sizes), B, D)
    return [t.to(dtype) for t in (logits, h, dz)], experts, sizes


def _reference(logits, h, experts, sizes, dz):
    lr = logits.detach().double().requires_grad_()
    hr = h.detach().double().requires_grad_()
    z = gm.gated_mixture_reference(lr, hr, experts, sizes)
    dl, dh = torch.autograd.grad(z, (lr, hr), dz.double())
    return z.detach(), dl, dh


cpp_available = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="needs the C++ extension")


@cpp_available
@pytest.mark.parametrize("name", [*FAMILIES, "many"])
@pytest.mark.parametrize("D", [1, 7, 32, 37, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["arch", "strided"])
def test_cpp_kernel_matches_reference(name, D, dtype, layout):
    (logits, h, dz), experts, sizes = _inputs(name, 32 if name == "many" else 19, D, dtype,
                                              layout)
    z_ref, dl_ref, dh_ref = _reference(logits, h, experts, sizes, dz)
    z, p = torch.ops.mtlfast.gated_mixture_cpu(logits, h, experts, sizes, True)
    assert z.shape == z_ref.shape and z.dtype == dtype and z.is_contiguous()
    assert rel_err(z, z_ref) < TOL[dtype]
    zt, pt = torch.ops.mtlfast.gated_mixture_cpu(logits, h, experts, sizes, False)
    assert torch.equal(zt, z) and torch.equal(pt, p) and zt.transpose(0, 1).is_contiguous()
    dl, dh = torch.ops.mtlfast.gated_mixture_backward_cpu(dz, p, h, experts, sizes, True, True)
    assert dl.shape == logits.shape and dh.shape == h.shape
    # a one-column gate's logit has no gradient (its softmax is 1): compare absolutely
    assert (dl.double() - dl_ref).norm() <= TOL[dtype] * max(dl_ref.norm().item(), 1.0)
    assert rel_err(dh, dh_ref) < TOL[dtype]
    dl1, dh1 = torch.ops.mtlfast.gated_mixture_backward_cpu(dz, p, h, experts, sizes, True, False)
    assert torch.equal(dl1, dl) and dh1.numel() == 0
    dl2, dh2 = torch.ops.mtlfast.gated_mixture_backward_cpu(dz, p, h, experts, sizes, False, True)
    assert torch.equal(dh2, dh) and dl2.numel() == 0


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [5, 300])
def test_public_op_matches_reference(name, dtype, B):
    """Both paths (the kernel from 256 rows for fp32/fp64, the unfused one otherwise)."""
    (logits, h, dz), experts, sizes = _inputs(name, B, 11, dtype)
    logits.requires_grad_(), h.requires_grad_()
    z = gm.gated_mixture(logits, h, experts, sizes)
    z.backward(dz)
    z_ref, dl_ref, dh_ref = _reference(logits, h, experts, sizes, dz)
    assert z.dtype == dtype and rel_err(z, z_ref) < TOL[dtype]
    assert (logits.grad.double() - dl_ref).norm() <= TOL[dtype] * max(dl_ref.norm().item(), 1.0)
    assert rel_err(h.grad, dh_ref) < TOL[dtype]


@cpp_available
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_public_op_uses_the_kernel_from_256_rows(dtype, monkeypatch):
    calls = count_calls(monkeypatch, torch.ops.mtlfast, "gated_mixture_backward_cpu")
    (logits, h, dz), experts, sizes = _inputs("cgc", 256, 9, dtype)
    logits.requires_grad_(), h.requires_grad_()
    gm.gated_mixture(logits, h, experts, sizes).backward(dz)
    assert calls
    (small, hs, dzs), _, _ = _inputs("cgc", 255, 9, dtype)
    calls.clear()
    gm.gated_mixture(small.requires_grad_(), hs.requires_grad_(), experts, sizes).backward(dzs)
    assert not calls


def test_dispatch_rule():
    many = torch.zeros(256, 4)
    assert backend("gated_mixture", torch.zeros(255, 4), eager=True) == "torch"
    assert backend("gated_mixture", many, eager=True) == ("cpu" if _ext.has_cpu_kernels()
                                                          else "torch")
    assert backend("gated_mixture", many, eager=False) == "torch"  # compile, torch.func
    assert backend("gated_mixture", many.bfloat16(), eager=True) == "torch"


@pytest.mark.parametrize("name", ["cgc", "ple_inner", "ragged"])
@pytest.mark.parametrize("B", [6, 260])
def test_batched_gradients(name, B):
    """``autograd.grad(..., is_grads_batched=True)`` (the engine's jacobian mode): the kernel
    path takes torch's formula from the saved probabilities."""
    (logits, h, _), experts, sizes = _inputs(name, B, 5, torch.float64)
    logits.requires_grad_(), h.requires_grad_()
    z = gm.gated_mixture(logits, h, experts, sizes)
    dzs = torch.randn(3, *z.shape, dtype=torch.float64)
    dlb, dhb = torch.autograd.grad(z, (logits, h), dzs, is_grads_batched=True)
    for i in range(3):
        _, dl_i, dh_i = _reference(logits, h, experts, sizes, dzs[i])
        assert rel_err(dlb[i], dl_i) < 1e-12 and rel_err(dhb[i], dh_i) < 1e-12


@pytest.mark.parametrize("B", [4, 256])
def test_gradcheck_fp64(B):
    (logits, h, _), experts, sizes = _inputs("cgc", B, 3, torch.float64)
    assert torch.autograd.gradcheck(
        lambda lg, hh: gm.gated_mixture(lg, hh, experts, sizes),
        (logits.requires_grad_(), h.requires_grad_()), fast_mode=True)


@pytest.mark.parametrize("B", [7, 300])
@pytest.mark.parametrize("scale", [1e4, 1e-6])
def test_extreme_logits_stay_finite(B, scale):
    """Logits of 1e4 (a naive exp overflows) and of 1e-6 (uniform gates)."""
    (logits, h, dz), experts, sizes = _inputs("ple_inner", B, 8, torch.float32, scale=scale)
    logits = logits + torch.linspace(-3e4, 3e4, logits.shape[1]) * (scale > 1)
    logits.requires_grad_(), h.requires_grad_()
    z = gm.gated_mixture(logits, h, experts, sizes)
    z.backward(dz)
    z_ref, dl_ref, dh_ref = _reference(logits, h, experts, sizes, dz)
    assert torch.isfinite(z).all() and torch.isfinite(logits.grad).all()
    assert rel_err(z, z_ref) < 1e-5 and rel_err(h.grad, dh_ref) < 1e-5
    assert (logits.grad.double() - dl_ref).norm() <= 1e-5 * max(dl_ref.norm().item(), 1.0)


def test_gate_positions():
    assert gm.gate_positions(torch.arange(3).repeat(2), [3, 3], 3) is None
    pos = gm.gate_positions(torch.tensor([0, 2, 1]), [2, 1], 3)
    assert pos.tolist() == [0, 2, 4]


def test_bad_input_raises_naming_the_argument():
    (logits, h, _), experts, sizes = _inputs("cgc", 4, 5, torch.float32)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        gm.gated_mixture([1.0], h, experts, sizes)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        gm.gated_mixture(logits[0], h, experts, sizes)
    with pytest.raises(ValueError, match="h must be \\(E, B=4, D\\)"):
        gm.gated_mixture(logits, h[:, :3], experts, sizes)
    with pytest.raises(TypeError, match="experts must be int64"):
        gm.gated_mixture(logits, h, experts.int(), sizes)
    with pytest.raises(ValueError, match="experts must index h's 6 experts"):
        gm.gated_mixture(logits, h, experts + 1, sizes)
    with pytest.raises(ValueError, match="sum\\(sizes\\)"):
        gm.gated_mixture(logits, h, experts, [3, 4, 2])
    with pytest.raises(ValueError, match="sizes must be ints >= 1"):
        gm.gated_mixture(logits, h, experts, [3, 4, 3, 0])
    with pytest.raises(ValueError, match="gate 1 names an expert twice"):
        gm.gated_mixture(logits, h, torch.tensor([0, 1, 2, 0, 0, 3, 4, 0, 1, 5]), sizes)
    with pytest.raises(TypeError, match="dtype"):
        gm.gated_mixture(logits, h.double(), experts, sizes)
    with pytest.raises(TypeError, match="floating point"):
        gm.gated_mixture(logits.long(), h, experts, sizes)


@cpp_available
def test_cpp_kernel_rejects_bad_input():
    (logits, h, dz), experts, sizes = _inputs("cgc", 4, 5, torch.float32)
    op = torch.ops.mtlfast
    with pytest.raises(RuntimeError, match="float32 or both float64"):
        op.gated_mixture_cpu(logits.half(), h.half(), experts, sizes, True)
    with pytest.raises(RuntimeError, match="out of range"):
        op.gated_mixture_cpu(logits, h, experts + 1, sizes, True)
    with pytest.raises(RuntimeError, match="one expert index per logit column"):
        op.gated_mixture_cpu(logits, h, experts[:-1], sizes, True)
    with pytest.raises(RuntimeError, match="at least one column"):
        op.gated_mixture_cpu(logits, h, experts, [*sizes, 0], True)
    _, p = op.gated_mixture_cpu(logits, h, experts, sizes, True)
    with pytest.raises(RuntimeError, match="dz must be"):
        op.gated_mixture_backward_cpu(dz[:, :, :3], p, h, experts, sizes, True, True)


# ----------------------------------------------------------------------------- GateBank

K = 6


def _bank_and_input(kind: str, B: int, seed: int = 0):
    torch.manual_seed(seed)
    sel, E = _family({"dense": "mmoe", "subset": "cgc", "inner": "ple_inner"}[kind])
    bank = GateBank(K, sel, E, top_k=None)
    return bank, torch.randn(B, K), torch.randn(E, B, 9)


@pytest.mark.parametrize("kind", ["dense", "subset", "inner"])
@pytest.mark.parametrize("B", [5, 300])
def test_gate_bank_mix_is_mixture_of_its_weights(kind, B):
    bank, x, h = _bank_and_input(kind, B)
    x.requires_grad_(), h.requires_grad_()
    z = bank.mix(x, h)
    ref = mixture(bank(x), h)
    assert rel_err(z, ref) < 1e-5
    c = torch.randn_like(z)
    got = torch.autograd.grad((z * c).sum(), [x, h, *bank.parameters()])
    want = torch.autograd.grad((ref * c).sum(), [x, h, *bank.parameters()])
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-5


def test_gate_bank_mix_top_k_and_autocast():
    sel, E = _family("mmoe")
    bank = GateBank(K, sel, E, top_k=2)
    x, h = torch.randn(300, K), torch.randn(E, 300, 9)
    z = bank.mix(x, h)
    assert rel_err(z, mixture(bank(x), h)) < 1e-6
    bank = GateBank(K, sel, E)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = bank.mix(x, h)
    assert zb.dtype == torch.bfloat16 and rel_err(zb, bank.mix(x, h)) < 2e-2


def test_gate_bank_mix_under_compile():
    bank, x, h = _bank_and_input("subset", 300)
    compiled = torch.compile(bank.mix, backend="aot_eager")
    assert rel_err(compiled(x, h), bank.mix(x, h)) < 1e-5


def test_skip_inputs_validation():
    with pytest.raises(ValueError, match="skip_inputs"):
        GateBank(K, [[0]], 1, skip_inputs=1)  # not grouped
    with pytest.raises(ValueError, match="skip_inputs"):
        GateBank(K, [[0]], 1, grouped=True, skip_inputs=-1)
    bank = GateBank(K, [[0]], 1, grouped=True, skip_inputs=1)
    with pytest.raises(ValueError, match="G=2"):
        bank.logits(torch.randn(1, 3, K))


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["cgc", "ple_inner", "ragged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_public_op_matches_reference(name, dtype):
    (logits, h, dz), experts, sizes = _inputs(name, 300, 11, dtype)
    logits, h, dz, experts = (t.cuda() for t in (logits, h, dz, experts))
    logits.requires_grad_(), h.requires_grad_()
    z = gm.gated_mixture(logits, h, experts, sizes)
    z.backward(dz)
    z_ref, dl_ref, dh_ref = _reference(logits.cpu(), h.cpu(), experts.cpu(), sizes, dz.cpu())
    assert rel_err(z, z_ref) < TOL[dtype] and rel_err(h.grad, dh_ref) < TOL[dtype]
    assert (logits.grad.double().cpu() - dl_ref).norm() <= TOL[dtype] * max(
        dl_ref.norm().item(), 1.0)


@pytest.mark.parametrize("B", [6, 300])
def test_non_finite_logits_propagate_to_their_rows_only(B):
    """A NaN or +-inf logit gives NaN in its own gate's output rows (as torch.softmax does),
    nothing else changes, nothing crashes."""
    (logits, h, _), experts, sizes = _inputs("cgc", B, 9, torch.float32)
    bad = logits.clone()
    bad[1, 0] = float("nan")
    bad[2, 4] = float("inf")
    bad[3, sizes[0] + sizes[1]:] = float("-inf")  # a whole gate at -inf
    z = gm.gated_mixture(bad, h, experts, sizes)
    ref = gm.gated_mixture_reference(bad.double(), h.double(), experts, sizes)
    assert torch.equal(torch.isnan(z), torch.isnan(ref))
    assert torch.isnan(z[0, 1]).all() and torch.isnan(z[1, 2]).all() and torch.isnan(z[2, 3]).all()
    ok = ~torch.isnan(ref)
    assert rel_err(z[ok], ref[ok]) < 1e-5
