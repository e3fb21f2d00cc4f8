"""The expert blocks on their Triton path: grouped-linear Triton kernels for the experts and
gates, the Triton mixture kernels; in the interpreter on CPU tensors (MTLFAST_HEADS_TRITON=1),
compiled on a GPU. CUDA-only cases carry the cuda mark."""

import copy
import warnings

import pytest
import torch

import mtlfast
from mtlfast import _ext
from mtlfast.arch import PLE, DSelectK, MMoE
from mtlfast.arch.experts import ExpertBank
from mtlfast.methods import UPGrad
from mtlfast.ops._dispatch import backend
from tests.conftest import rel_err

pytestmark = pytest.mark.skipif(not _ext.has_triton(), reason="needs triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K = 12


def _blocks(device, dtype=torch.float32):
    f = {"device": device, "dtype": dtype}
    torch.manual_seed(0)
    return [MMoE(K, 3, [8, 6], 4, **f),
            MMoE(K, 3, [[8, 5], [3, 5], [7, 5]], 2, activation="gelu", **f),
            PLE(K, 2, 1, [1, 2, 1], [8, 6], 3, **f),
            DSelectK(K, 5, 2, [8, 6], 3, **f)]


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv("MTLFAST_HEADS_TRITON", "1")
    if DEVICE == "cpu" and not _ext.triton_interpreter():
        pytest.skip("TRITON_INTERPRET is not set")
    # uniform experts would take the CPU expert-major path: the Triton path is under test
    monkeypatch.setattr(ExpertBank, "_expert_major", lambda self, x: False)


@pytest.mark.parametrize("index", range(4))
def test_triton_blocks_match_their_loops(triton_path, index):
    fused = _blocks(DEVICE)[index]
    loop = fused.unfuse()
    x = torch.randn(9, K, device=DEVICE)
    assert backend("mixture", x.unsqueeze(0)) == "triton"
    xf, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    z, zl = fused(xf), loop(xl)
    assert rel_err(z, zl) < 1e-4
    c = torch.randn_like(z)
    gf = torch.autograd.grad((z * c).sum(), [xf, *fused.parameters()])
    gl = torch.autograd.grad((zl * c).sum(), [xl, *loop.parameters()])
    assert rel_err(gf[0], gl[0]) < 1e-4
    holder = fused.unfuse()  # the fused gradients through the key map, as loop parameters
    grads = copy.deepcopy(fused)
    with torch.no_grad():
        for p, g in zip(grads.parameters(), gf[1:], strict=True):
            p.copy_(g)
    holder.load_state_dict(grads.state_dict())
    for p, want in zip(holder.parameters(), gl[1:], strict=True):
        assert rel_err(p, want) < 1e-3


def test_triton_mmoe_under_the_engine(triton_path):
    fused = _blocks(DEVICE)[0]
    heads = mtlfast.FusedHeads(6, {"a": 1, "b": 2, "c": 1, "d": 1}, hidden=5).to(DEVICE)
    x, y = torch.randn(8, K, device=DEVICE), torch.randn(8, 2, device=DEVICE)
    out = heads(fused(x), per_task=True)
    losses = {t: ((o - y[:, :o.shape[1]]) ** 2).mean() for t, o in out.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the engine's loop fallback warns
        info = mtlfast.backward(losses, shared=fused, method=UPGrad(), mode="jacobian")
    assert torch.isfinite(info.weights).all()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", range(4))
def test_cuda_blocks_match_their_loops(index, dtype):
    fused = _blocks("cuda", dtype)[index]
    loop = fused.unfuse()
    x = torch.randn(300, K, device="cuda", dtype=dtype)
    ref = _blocks("cpu", torch.float64)[index].unfuse()
    ref.load_state_dict({k: v.double().cpu() for k, v in fused.state_dict().items()})
    want = ref(x.double().cpu())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel_err(fused(x), want) < tol
    assert rel_err(loop(x), want) < tol
