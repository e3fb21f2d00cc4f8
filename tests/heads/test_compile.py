"""torch.compile and torch.func over FusedHeads (the custom ops' fake, autograd and vmap
rules). Kept tiny: compilation dominates the time on a CPU."""

import pytest
import torch

from mtlfast import FusedHeads
from tests.conftest import rel_err

D = 8
TASKS = {"a": 1, "b": 3, "c": 5}


def test_compile_same_outputs_and_grads():
    torch._dynamo.reset()
    fused = FusedHeads(D, TASKS, hidden=[4, 6, 3], activation="gelu")
    compiled = torch.compile(fused, fullgraph=True)
    z = torch.randn(6, D, requires_grad=True)
    out, ref = compiled(z), fused(z)
    for t in TASKS:
        assert rel_err(out[t], ref[t]) < 1e-6
    g = torch.autograd.grad(sum(v.square().sum() for v in out.values()), z)[0]
    g_ref = torch.autograd.grad(sum(v.square().sum() for v in ref.values()), z)[0]
    assert rel_err(g, g_ref) < 1e-6


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fused = FusedHeads(D, TASKS, hidden=4)
        out = fused(torch.empty(2, 7, D))
    assert {t: tuple(v.shape) for t, v in out.items()} == {"a": (2, 7, 1), "b": (2, 7, 3),
                                                           "c": (2, 7, 5)}


@pytest.mark.parametrize("hidden", [None, [4, 6, 3]])
def test_vmap_over_vjp_gives_per_task_feature_grads(hidden):
    """The engine's batched-backward pattern: vmap of a VJP over T cotangents."""
    fused = FusedHeads(D, TASKS, hidden=hidden, activation="silu")
    z = torch.randn(5, D)

    def heads_cat(x):
        return torch.cat(list(fused(x).values()), dim=-1)

    y, vjp_fn = torch.func.vjp(heads_cat, z)
    N, T = y.shape[-1], len(TASKS)
    # cotangent t: a random grad on task t's columns only -> dL_t/dz
    cols = torch.repeat_interleave(torch.arange(T), torch.tensor(list(TASKS.values())))
    cot = torch.randn(T, *y.shape) * (cols[None, None, :] == torch.arange(T)[:, None, None])
    (J,) = torch.func.vmap(vjp_fn)(cot)
    J_ref = fused.task_feature_grads(cot.sum(0), z)
    assert J.shape == (T, 5, D) and rel_err(J, J_ref) < 1e-5
    assert N == sum(TASKS.values())


def test_vmap_over_inputs_and_params():
    fused = FusedHeads(D, TASKS, hidden=4)
    zs = torch.randn(3, 5, D)
    out = torch.func.vmap(lambda x: torch.cat(list(fused(x).values()), -1))(zs)
    ref = torch.cat(list(fused(zs).values()), -1)
    assert rel_err(out, ref) < 1e-6
    # per-sample parameter gradients: weight grads batched -> the loop fallback rule
    params = dict(fused.named_parameters())

    def loss(p, x):
        return sum(v.sum() for v in torch.func.functional_call(fused, p, (x[None],)).values())

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, zs[0])
    for i in range(2):
        ref_g = torch.autograd.grad(loss(params, zs[0, i]), list(params.values()))
        for g, r in zip(grads.values(), ref_g, strict=True):
            assert rel_err(g[i], r) < 1e-5
