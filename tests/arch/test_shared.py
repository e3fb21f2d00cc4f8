"""``shared_parameters()`` of CGC and PLE (fused and loop) against graph reachability: a
parameter is shared iff every task's output reaches it, and nothing every task reaches is
left out; fused and loop agree on the parameters and on the gradients ``mtlfast.backward``
writes with them as ``shared``."""

import copy

import pytest
import torch

import mtlfast
from mtlfast.arch import CGC, PLE, PLELoop
from mtlfast.methods import UPGrad
from tests.conftest import rel_err

K = 10

# S + k_t >= 2 everywhere: a softmax over one expert has an exactly zero gradient, which the
# fused block's per-block test below cannot tell from "not reached"
CASES = {
    "cgc": lambda: CGC(K, 2, [1, 0, 2], [8, 6], 3),
    "cgc_T2": lambda: CGC(K, 1, 2, [5], ["a", "b"]),
    "ple_L1": lambda: PLE(K, 1, 1, 2, [8, 6], 3),
    "ple_L2": lambda: PLE(K, 2, 1, 2, [8, 6], 3),
    "ple_L3": lambda: PLE(K, 3, 1, 2, [8, 6], 3),
    "ple_L2_zero_specific": lambda: PLE(K, 2, 2, [1, 0, 3], [6], 3),
    "ple_L3_zero_specific": lambda: PLE(K, 3, 2, [1, 0, 3], [7, 6], 3, activation="gelu"),
    "ple_L3_no_shared": lambda: PLE(K, 3, 0, 2, [5], 2),
    "ple_L3_two_shared": lambda: PLE(K, 3, 2, 1, [6], 4, activation=None),
}


def _build(name):
    torch.manual_seed(0)
    fused = CASES[name]()
    return fused, fused.unfuse()


def _task_outputs(loop, x):
    """The loop's per-task outputs before its final ``torch.stack`` (whose backward would
    connect every task to everything)."""
    levels = loop.levels if isinstance(loop, PLELoop) else loop._level
    inputs = [x] * (len(loop.tasks) + 1)
    for level in levels:
        inputs = level(inputs)
    return inputs


def _loop_reach(loop, x):
    """{loop key: tasks whose output reaches the parameter} (autograd, allow_unused)."""
    z = _task_outputs(loop, x)
    assert rel_err(torch.stack(z), loop(x)) == 0
    names = [n for n, _ in loop.named_parameters()]
    params = list(loop.parameters())
    reach = {n: set() for n in names}
    for t in range(len(z)):
        grads = torch.autograd.grad(z[t].sum(), params, retain_graph=True, allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                reach[n].add(t)
    return reach


def _fused_reach(fused, x):
    """The same per loop key for the fused block: a block of a fused parameter is reached by
    task t when t's output gradient is non-zero on it (other tasks' blocks get exact zeros)."""
    z = fused(x)
    names = [n for n, _ in fused.named_parameters()]
    params = list(fused.parameters())
    blocks = fused._param_blocks()
    reach: dict[str, set[int]] = {}
    for t in range(z.shape[0]):
        grads = torch.autograd.grad(z[t].sum(), params, retain_graph=True, allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            parts = [None] * len(blocks[n]) if g is None else \
                g.split([b.numel() for _, b in blocks[n]])
            for (key, _), part in zip(blocks[n], parts, strict=True):
                hit = part is not None and bool(part.ne(0).any())
                reach.setdefault(key, set()).update({t} if hit else set())
    return reach


def _fused_shared_keys(fused):
    ids = {id(p) for p in fused.shared_parameters()}
    blocks = fused._param_blocks()
    return {key for n, p in fused.named_parameters() if id(p) in ids for key, _ in blocks[n]}


@pytest.mark.parametrize("name", list(CASES))
def test_shared_parameters_are_what_every_task_reaches(name):
    fused, loop = _build(name)
    T = len(fused.tasks)
    x = torch.randn(17, K)
    everyone = set(range(T))
    # loop: by parameter (the brief's definition, autograd reachability)
    reach = _loop_reach(loop, x)
    names = dict((id(p), n) for n, p in loop.named_parameters())
    shared = {names[id(p)] for p in loop.shared_parameters()}
    assert len(shared) == len(loop.shared_parameters())
    assert shared == {n for n, r in reach.items() if r == everyone}, name
    # fused: block by block, the same reach, and its shared parameters hold exactly those keys
    assert _fused_reach(fused, x) == reach
    assert _fused_shared_keys(fused) == shared
    assert sum(p.numel() for p in fused.shared_parameters()) == \
        sum(p.numel() for p in loop.shared_parameters())


def test_libmtl_cgc_shares_the_shared_experts_only():
    fused, loop = _build("cgc")
    assert {n for n, p in loop.named_parameters()
            if any(p is q for q in loop.shared_parameters())} == \
        {n for n, _ in loop.experts_shared.named_parameters(prefix="experts_shared")}
    names = {id(p): n for n, p in fused.named_parameters()}
    assert sorted(names[id(p)] for p in fused.shared_parameters()) == sorted(
        f"level.experts.shared_{k}{i}" for k in ("weight", "bias") for i in range(2))


def test_ple_two_levels_shares_experts_and_the_shared_gate():
    """L = 2: both levels' shared experts, level 0's task experts and shared gate; no task
    gate (level 0's feed only their own task's last-level branch)."""
    _, loop = _build("ple_L2")
    names = {id(p): n for n, p in loop.named_parameters()}
    got = {(names[id(p)].split(".")[1], names[id(p)].split(".")[2])
           for p in loop.shared_parameters()}
    assert got == {("0", "experts_shared"), ("0", "experts_specific"), ("0", "gate_shared"),
                   ("1", "experts_shared")}


@pytest.mark.parametrize("name", [n for n in CASES if n != "ple_L3_no_shared"])
def test_backward_with_shared_parameters_fused_equals_loop(name):
    fused, loop = _build(name)
    x = torch.randn(16, K)
    c = torch.randn(len(fused.tasks), 16, fused.out_features)
    grads = []
    for block in (fused, loop):
        block.zero_grad(set_to_none=True)
        z = block(x)
        losses = {f"t{t}": (z[t] * c[t]).sum() for t in range(z.shape[0])}
        mtlfast.backward(losses, block.shared_parameters(), method=UPGrad())
        holder = copy.deepcopy(block)
        with torch.no_grad():
            for p, q in zip(holder.parameters(), block.parameters(), strict=True):
                p.copy_(q.grad if q.grad is not None else torch.zeros_like(q))
        grads.append(holder.state_dict())
    assert list(grads[0]) == list(grads[1]) or set(grads[0]) == set(grads[1])
    for key, want in grads[1].items():
        assert rel_err(grads[0][key], want) < 1e-4, key
