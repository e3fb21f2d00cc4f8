"""2-process workers for the distributed non-finite policy and exact accumulation (importable
by spawned processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mtlfast import MTLBackward, methods

from .workers import (
    Net,
    flat,
    fully_sharded_twin,
    gather,
    global_batch,
    local_part,
    losses_of,
    make_method,
)

T = 3


def _bad_on_rank_one(rank: int, mode: str, policy: str) -> dict:
    """Rank 1's task 2 loss is NaN; rank 0 is healthy. Both must skip (or raise) together and
    keep identical parameters and gradients."""
    torch.manual_seed(0)
    net = Net(T).double()
    engine = MTLBackward(net.trunk.parameters(), methods.UPGrad(), on_nonfinite=policy,
                         process_group=dist.group.WORLD, distributed_mode=mode)
    x, y = global_batch(0, dist.get_world_size(), T)
    losses = losses_of(net, local_part(x, rank), local_part(y, rank))
    if rank == 1:
        losses[2] = losses[2] * float("nan")
    out: dict = {}
    try:
        info = engine.backward(losses)
        out["skipped"] = bool(info.skipped)
    except ValueError as err:
        out["error"] = str(err)
    grads = flat(p.grad if p.grad is not None else torch.zeros_like(p) for p in net.parameters())
    out["grads_agree"] = bool(all(torch.equal(g, grads) for g in gather(grads, 2)))
    out["grads_zero"] = not bool(grads.any())
    return out


def accumulated_vs_single(rank: int, world: int, names: list[str], steps: int = 2) -> dict:
    """DDP exact with accumulate=2 vs one process on both micro-batches' global batch: the
    max |parameter difference| after each optimizer step, per method."""
    out: dict = {}
    for name in names:
        torch.manual_seed(0)
        net = Net(T).double()
        ref_net = Net(T).double()
        ref_net.load_state_dict(net.state_dict())
        torch.manual_seed(7)
        method = make_method(name)
        ref_method = make_method(name)
        ref_method.load_state_dict(method.state_dict())
        engine = MTLBackward(net.trunk.parameters(), method, process_group=dist.group.WORLD,
                             accumulate=2)
        ref = MTLBackward(ref_net.trunk.parameters(), ref_method)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(ref_net.parameters(), lr=0.1)
        diffs = []
        for step in range(steps):
            opt.zero_grad()
            ref_opt.zero_grad()
            micro = [global_batch(2 * step + k, world, T) for k in range(2)]
            for x, y in micro:
                engine.backward(losses_of(net, local_part(x, rank), local_part(y, rank)))
            x = torch.cat([m[0] for m in micro])
            y = torch.cat([m[1] for m in micro])
            ref.backward(losses_of(ref_net, x, y))
            opt.step()
            ref_opt.step()
            diffs.append((flat(net.parameters()) - flat(ref_net.parameters())).abs().max().item())
        out[name] = diffs
    return out


def fsdp2_pipeline(rank: int, world: int) -> dict:
    """FSDP2 through the engine's pipeline: a layer-wise Gram method equals DDP exact, and a
    NaN on one rank is skipped on every rank under on_nonfinite="skip" (nothing written)."""
    from torch.nn.parallel import DistributedDataParallel

    from mtlfast.distributed import FSDPBackward, no_sync

    torch.manual_seed(0)
    net = Net(T).double()
    sharded = fully_sharded_twin(net)
    ddp = DistributedDataParallel(net)
    engine = MTLBackward(net.trunk.parameters(), methods.GradVac(granularity="parameter", seed=3),
                         process_group=dist.group.WORLD)
    fsdp = FSDPBackward(sharded, sharded.trunk, methods.GradVac(granularity="parameter", seed=3),
                        on_nonfinite="skip")
    out: dict = {"grad_err": []}
    for step in range(2):
        net.zero_grad()
        sharded.zero_grad()
        x, y = global_batch(step, world, T)
        xl, yl = local_part(x, rank), local_part(y, rank)
        with no_sync(ddp):
            engine.backward(losses_of(ddp, xl, yl))
        with no_sync(sharded):
            info = fsdp.backward(losses_of(sharded, xl, yl))
        out["weights_shape"] = tuple(info.weights.shape)
        full = flat(p.grad.full_tensor() for p in sharded.parameters())
        out["grad_err"].append((full - flat(p.grad for p in net.parameters())).abs().max().item())
    before = flat(p.grad.full_tensor() for p in sharded.parameters())
    x, y = global_batch(5, world, T)
    with no_sync(sharded):
        losses = losses_of(sharded, local_part(x, rank), local_part(y, rank))
    if rank == 1:
        losses[0] = losses[0] * float("nan")
    info = fsdp.backward(losses)
    out["skipped"] = bool(info.skipped)
    after = flat(p.grad.full_tensor() for p in sharded.parameters())
    out["unchanged"] = bool(torch.equal(before, after))
    return out


def suite(rank: int, world: int) -> dict:
    out = {f"{mode}-{policy}": _bad_on_rank_one(rank, mode, policy)
           for mode in ("local", "exact") for policy in ("skip", "raise")}
    out["accumulate"] = accumulated_vs_single(rank, world, ["UPGrad", "PCGrad", "MGDA", "Mean"])
    out["fsdp2"] = fsdp2_pipeline(rank, world)
    return out
