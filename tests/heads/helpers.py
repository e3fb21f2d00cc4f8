"""Checks shared by the tests of the heads' C++ ops (mlp_heads, linear_heads)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mtlfast
from tests.conftest import rel_err

_dispatch = importlib.import_module("mtlfast.ops._dispatch")
_mlp_heads = importlib.import_module("mtlfast.ops.mlp_heads")

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def lowp_gemms(monkeypatch, native: bool) -> None:
    """Run as on a CPU with (or without) native bf16/fp16 GEMMs: without them the heads' ops
    run their GEMMs in fp32 and the form choice reads fp32's rules."""
    emulated = frozenset() if native else frozenset({torch.bfloat16, torch.float16})
    monkeypatch.setattr(_mlp_heads, "_lowp_gemm_emulated", lambda: emulated)


class GemmDtypes(TorchDispatchMode):
    """The dtypes of the operands of every GEMM dispatched inside the block."""

    GEMMS = frozenset({"mm", "addmm", "bmm", "baddbmm"})

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.GEMMS:
            self.dtypes.update(a.dtype for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def assert_upcast_runs_gemms_in_fp32(call: Callable[[bool], list[torch.Tensor]],
                                     dtype: torch.dtype) -> None:
    """``call(upcast)`` runs an op on fresh ``dtype`` inputs and returns its outputs and
    gradients. With ``upcast`` every GEMM inside runs on fp32 operands for bf16/fp16, without it
    in ``dtype``; the results keep ``dtype``; fp32/fp64 ignore ``upcast`` bit for bit."""
    lowp = dtype in (torch.float16, torch.bfloat16)
    results = {}
    for upcast in (False, True):
        with GemmDtypes() as gemms:
            results[upcast] = call(upcast)
        assert gemms.dtypes == {torch.float32 if upcast and lowp else dtype}
        assert all(t.dtype == dtype for t in results[upcast])
    if not lowp:
        for a, b in zip(results[False], results[True], strict=True):
            assert torch.equal(a, b)


def assert_matches_reference(op: Callable, reference: Callable, args: list, dtype: torch.dtype
                             ) -> None:
    """``op(*args)`` (the heads' outputs) against ``reference(*args)`` run in float64, forward
    and the gradient of every tensor argument that requires one. The reference run in
    ``dtype`` (the unfused heads' own rounding) bounds the error allowed in fp16/bf16."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    ref_args = [a.detach().double().requires_grad_() if isinstance(a, torch.Tensor)
                and a.requires_grad else a for a in args]
    ref_leaves = [a for a in ref_args if isinstance(a, torch.Tensor) and a.requires_grad]
    ys, refs, same = op(*args), reference(*ref_args), reference(*args)
    for y, r, u in zip(ys, refs, same, strict=True):
        assert y.dtype == dtype and y.shape == r.shape
        assert rel_err(y, r) < max(TOL[dtype], 2 * rel_err(u, r))
    seeds = [torch.randn(r.shape, dtype=torch.float64) for r in refs]
    got = torch.autograd.grad(ys, leaves, [s.to(dtype) for s in seeds])
    want = torch.autograd.grad(refs, ref_leaves, seeds)
    unfused = torch.autograd.grad(same, leaves, [s.to(dtype) for s in seeds])
    for g, w, u in zip(got, want, unfused, strict=True):
        assert g.dtype == dtype and g.shape == w.shape
        assert rel_err(g, w) < max(TOL[dtype], 2 * rel_err(u, w))


def assert_engine_step_unchanged(monkeypatch, rule: str, hidden, mode: str,
                                 uses_op: Callable[[dict], bool]) -> None:
    """UPGrad's step on per-task features (a trunk's output split in three, into FusedHeads
    with ``per_task=True``, ``features=`` those features) writes the same ``.grad`` through
    the op as with dispatch rule ``rule`` sending FusedHeads to its ATen path."""
    grads = []
    for aten in (False, True):
        monkeypatch.undo()
        if aten:
            monkeypatch.setitem(_dispatch.RULES, rule, (("torch", lambda op, t, f: True),))
        torch.manual_seed(0)
        trunk = torch.nn.Linear(7, 3 * 12).double()
        heads = mtlfast.FusedHeads(12, {"a": 1, "b": 3, "c": 2}, hidden=hidden).double()
        x, y = torch.randn(9, 7, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
        z = torch.tanh(trunk(x)).view(9, 3, 12).transpose(0, 1)
        out = heads(z, per_task=True)
        assert uses_op(out) != aten
        losses = torch.stack([((o - y[:, c:c + o.shape[1]]) ** 2).mean()
                              for c, o in zip([0, 1, 4], out.values(), strict=True)])
        mtlfast.backward(losses, trunk, mtlfast.methods.UPGrad(), features=z, mode=mode)
        grads.append(torch.cat([p.grad.reshape(-1) for p in [*trunk.parameters(),
                                                              *heads.parameters()]]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
