"""Grouped-linear kernels (Triton under the interpreter or on a GPU, and the torch CPU paths)
against the torch reference (a Python loop of F.linear)."""

import importlib

import pytest
import torch

from tests.conftest import rel_err

# the module, not the function of the same name that mtlfast.ops re-exports
gl = importlib.import_module("mtlfast.ops.grouped_linear")

triton_mod = pytest.importorskip("triton")
from mtlfast.kernels.triton import grouped_mm  # noqa: E402

# (in_widths, out_widths): ragged with width 1 and widths that are no multiple of any tile,
# uniform (the bmm path), and a single dense group (layer 1).
BLOCK_DIAG = [
    ((5, 17, 1, 70), (1, 33, 2, 65)),
    ((64,) * 6, (1,) * 6),
    ((3,), (129,)),
    ((1,), (1,)),
]
PER_TASK = [((24,) * 4, (1, 33, 2, 65)), ((16,) * 3, (7,) * 3), ((16,) * 3, (1,) * 3)]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _inputs(ins, outs, M, per_task, dtype, device="cpu"):
    x = torch.randn(len(ins), M, ins[0]) if per_task else torch.randn(M, sum(ins))
    w = torch.randn(sum(gl.block_sizes(ins, outs))) / max(ins) ** 0.5
    b = torch.randn(sum(outs))
    gy = torch.randn(M, sum(outs))
    return [t.to(device=device, dtype=dtype) for t in (x, w, b, gy)]


def _ref_forward(x, w, b, ins, outs, per_task, act):
    return gl.grouped_linear_reference(x.double(), w.double(), b.double(), ins, outs,
                                       per_task, act)


def _check_all(fwd, igrad, wgrad, ins, outs, per_task, act, dtype, device):
    for M in (1, 67):
        x, w, b, gy = _inputs(ins, outs, M, per_task, dtype, device)
        y, pre = fwd(x, w, b, ins, outs, per_task, act)
        assert y.dtype == dtype and y.shape == (M, sum(outs))
        assert rel_err(y, _ref_forward(x, w, b, ins, outs, per_task, act)) < TOL[dtype]
        if pre is not None:
            assert rel_err(pre, _ref_forward(x, w, b, ins, outs, per_task, "none")) < TOL[dtype]
        gx = igrad(gy, w, ins, outs, per_task)
        ref = gl.grouped_linear_input_grad_reference(gy.double(), w.double(), ins, outs,
                                                     per_task)
        assert gx.shape == ref.shape and rel_err(gx, ref) < TOL[dtype]
        gw = wgrad(gy, x, ins, outs, per_task)
        ref = gl.grouped_linear_weight_grad_reference(gy.double(), x.double(), ins, outs,
                                                      per_task)
        assert gw.shape == ref.shape and rel_err(gw, ref) < TOL[dtype]


def _triton_fwd(x, w, b, ins, outs, per_task, act):
    return grouped_mm.grouped_linear_triton(x, w, b, tuple(ins), tuple(outs), per_task, act,
                                            act in ("gelu", "silu"))


def _triton_igrad(gy, w, ins, outs, per_task):
    return grouped_mm.grouped_input_grad_triton(gy, w, tuple(ins), tuple(outs), per_task)


def _triton_wgrad(gy, x, ins, outs, per_task):
    return grouped_mm.grouped_weight_grad_triton(gy, x, tuple(ins), tuple(outs), per_task)


def _torch_fwd(x, w, b, ins, outs, per_task, act):
    return gl._forward_torch(x, w, b, ins, outs, per_task, act), None


SHAPES = [(i, o, False) for i, o in BLOCK_DIAG] + [(i, o, True) for i, o in PER_TASK]


# one activation per shape: the interpreter is slow
ACTS = ["relu", "gelu", "silu", "none", "relu", "silu", "gelu"]


@pytest.mark.parametrize("ins,outs,per_task,act",
                         [s + (a,) for s, a in zip(SHAPES, ACTS, strict=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernels_match_reference(ins, outs, per_task, act, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check_all(_triton_fwd, _triton_igrad, _triton_wgrad, ins, outs, per_task, act, dtype,
               device)


@pytest.mark.cuda
@pytest.mark.parametrize("ins,outs,per_task", SHAPES)
def test_triton_kernels_bf16_on_gpu(ins, outs, per_task):
    _check_all(_triton_fwd, _triton_igrad, _triton_wgrad, ins, outs, per_task, "gelu",
               torch.bfloat16, "cuda")


@pytest.mark.parametrize("ins,outs,per_task", SHAPES)
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_cpu_paths_match_reference(ins, outs, per_task, act, dtype):
    _check_all(_torch_fwd, gl._input_grad_torch, gl._weight_grad_torch, ins, outs, per_task,
               act, dtype, "cpu")


def test_schedule_is_cached_per_layout():
    ins, outs = (5, 17), (3, 40)
    a = grouped_mm._mm_schedule("forward", ins, outs, False, 64, torch.device("cpu"))
    b = grouped_mm._mm_schedule("forward", ins, outs, False, 64, torch.device("cpu"))
    assert a[0] is b[0] and a[1] is b[1]
    # group 1 has 40 output columns -> one 64-wide tile; group 0 one tile
    assert a[2] == 2


def test_bad_arguments_are_named():
    x, w, b, _ = _inputs((4, 5), (2, 3), 8, False, torch.float32)
    with pytest.raises(ValueError, match="x must be"):
        gl.grouped_linear(x[:, :3], w, b, (4, 5), (2, 3))
    with pytest.raises(ValueError, match="flat packed"):
        gl.grouped_linear(x, w[:-1], b, (4, 5), (2, 3))
    with pytest.raises(ValueError, match=">= 1"):
        gl.grouped_linear(x, w, b, (9, 0), (2, 3))
    with pytest.raises(TypeError, match="dtype"):
        gl.grouped_linear(x, w.double(), b, (4, 5), (2, 3))
    with pytest.raises(ValueError, match="activation"):
        gl.grouped_linear(x, w, b, (4, 5), (2, 3), activation="tanh")
