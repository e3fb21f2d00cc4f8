"""2-process workers for the distributed non-finite policy (importable by spawned processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mtlfast import MTLBackward, methods

from .workers import Net, flat, gather, global_batch, local_part, losses_of

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


def suite(rank: int, world: int) -> dict:
    return {f"{mode}-{policy}": _bad_on_rank_one(rank, mode, policy)
            for mode in ("local", "exact") for policy in ("skip", "raise")}
