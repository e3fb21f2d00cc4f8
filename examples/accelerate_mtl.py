"""Multi-task training with Hugging Face Accelerate and mtlfast (the drop-in in its loop).

    python examples/accelerate_mtl.py                         # one process
    accelerate launch --num_processes 2 examples/accelerate_mtl.py   # DDP, exact step

Only two lines differ from an ordinary Accelerate loop: the forward runs under
``accelerator.no_sync(model)`` and ``mtlfast.backward(...)`` replaces
``accelerator.backward(loss)``, with ``process_group`` set when Accelerate runs several
processes (the (T, P) per-task Jacobian all-reduced in buckets during the backward, then UPGrad
on the global Gram).
Same three digits tasks as examples/ddp_train.py.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator

import mtlfast

try:
    from ddp_train import Model, load_tasks  # run as a script from examples/
except ImportError:  # imported as examples.accelerate_mtl
    from examples.ddp_train import Model, load_tasks


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args(argv)

    accelerator = Accelerator()
    torch.manual_seed(0)
    x, targets = load_tasks(accelerator.device)
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    trunk = accelerator.unwrap_model(model).trunk
    group = dist.group.WORLD if accelerator.num_processes > 1 else None
    method = mtlfast.methods.UPGrad()
    order = torch.Generator().manual_seed(1)
    rank, world = accelerator.process_index, accelerator.num_processes
    for step in range(args.steps):
        batch = torch.randint(0, x.shape[0], (world * args.batch_size,), generator=order)
        mine = batch[rank * args.batch_size:(rank + 1) * args.batch_size].to(x.device)
        opt.zero_grad()
        with accelerator.no_sync(model):
            logits = model(x[mine])
            losses = {t: F.cross_entropy(logits[t], y[mine]) for t, y in targets.items()}
        info = mtlfast.backward(losses, trunk, method, process_group=group)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            shown = " ".join(f"{t}={v:.3f}" for t, v in zip(losses, info.losses.tolist(),
                                                            strict=True))
            accelerator.print(f"step {step:4d}  losses: {shown}")
    with torch.no_grad():
        logits = accelerator.unwrap_model(model)(x)
        acc = {t: (logits[t].argmax(-1) == y).float().mean().item() for t, y in targets.items()}
    accelerator.print("train accuracy: " + " ".join(f"{t}={a:.3f}" for t, a in acc.items()))
    return acc


if __name__ == "__main__":
    main()
