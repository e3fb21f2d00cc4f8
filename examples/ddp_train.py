"""Multi-task training under DDP with mtlfast: FusedHeads + UPGrad, exact on the global batch.

    torchrun --nproc_per_node 2 examples/ddp_train.py            # CPU: gloo; GPUs: nccl
    torchrun --nproc_per_node 2 examples/ddp_train.py --distributed-mode local

Three tasks on scikit-learn's bundled digits (8x8 images): the digit (10 classes), its parity
and whether it is >= 5. The step is the ordinary loop with two changes: the forward runs under
``mtlfast.distributed.no_sync(model)``, and ``mtlfast.backward(..., process_group=...)`` replaces
``loss.backward()`` (the (T, P) per-task Jacobian all-reduced, in 25 MiB buckets started during
the backward, then UPGrad on the global Gram, identical on every rank). The backend is nccl when
CUDA is available, gloo otherwise (the nccl path is untested on the development machine).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import mtlfast
from mtlfast.distributed import no_sync


def load_tasks(device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32, device=device) / 16.0
    digit = torch.tensor(digits.target, device=device)
    return x, {"digit": digit, "parity": digit % 2, "large": (digit >= 5).long()}


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.heads = mtlfast.FusedHeads(64, {"digit": 10, "parity": 2, "large": 2})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.trunk(x))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--distributed-mode", choices=["exact", "local"], default="exact")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0,
                        help="exact: MiB of the Jacobian per all-reduce bucket")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # DDP broadcasts rank 0's weights anyway
    x, targets = load_tasks(device)
    model = DistributedDataParallel(Model().to(device),
                                    device_ids=[device.index] if cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    method = mtlfast.methods.UPGrad()
    order = torch.Generator().manual_seed(1)  # the same global batches on every rank
    for step in range(args.steps):
        batch = torch.randint(0, x.shape[0], (world * args.batch_size,), generator=order)
        mine = batch[rank * args.batch_size:(rank + 1) * args.batch_size].to(device)
        opt.zero_grad()
        with no_sync(model):
            logits = model(x[mine])
            losses = {t: F.cross_entropy(logits[t], y[mine]) for t, y in targets.items()}
        info = mtlfast.backward(losses, model.module.trunk, method,
                                process_group=dist.group.WORLD,
                                distributed_mode=args.distributed_mode,
                                bucket_cap_mb=args.bucket_cap_mb)
        opt.step()
        if rank == 0 and (step % 50 == 0 or step == args.steps - 1):
            shown = " ".join(f"{t}={v:.3f}" for t, v in zip(losses, info.losses.tolist(),
                                                            strict=True))
            print(f"step {step:4d}  global losses: {shown}", flush=True)

    with torch.no_grad():  # every rank holds the same weights: check it, then evaluate
        flat = torch.cat([p.reshape(-1) for p in model.parameters()])
        spread = torch.stack([flat, -flat])
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        max_spread = (spread[0] + spread[1]).max().item()
        logits = model.module(x)
        acc = {t: (logits[t].argmax(-1) == y).float().mean().item() for t, y in targets.items()}
    if rank == 0:
        print(f"max parameter difference across ranks: {max_spread:.3g}")
        print("train accuracy: " + " ".join(f"{t}={a:.3f}" for t, a in acc.items()), flush=True)
    # Every rank done with the group before it goes: tearing gloo down while the other rank
    # still talks to it can abort the process at exit.
    dist.barrier()
    dist.destroy_process_group()
    return {"max_spread": max_spread, **acc}


if __name__ == "__main__":
    main()
