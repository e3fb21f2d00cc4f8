"""Multi-task training with PyTorch Lightning (manual optimization) and mtlfast.

    python examples/lightning_mtl.py                 # one process
    python examples/lightning_mtl.py --devices 2     # Lightning's "ddp" strategy: the exact step

The drop-in: ``automatic_optimization = False``, and in ``training_step`` the call
``mtlfast.backward(losses, trunk, method, process_group=...)`` takes the place of
``self.manual_backward(loss)``; ``opt.zero_grad()`` / ``opt.step()`` stay as they are. Same three
digits tasks and model (FusedHeads, UPGrad) as examples/ddp_train.py.

Why this is right under DDP, with no ``no_sync()`` and no custom strategy: Lightning runs
``training_step`` inside the ``DistributedDataParallel`` forward, and with manual optimization
its ``DDPStrategy`` switches ``require_backward_grad_sync`` off for that forward, so the forward
does not arm DDP's reducer; the reducer is armed only by ``manual_backward`` (its
``pre_backward`` calls ``prepare_for_backward``). ``mtlfast.backward`` never goes through
``manual_backward``: it differentiates with ``torch.autograd.grad`` (which never fires the
reducer's hooks) and does the communication itself, the ``(T, P)`` per-task Jacobian
all-reduced in buckets during the backward, then UPGrad on the global Gram, identically on
every rank (``info.losses`` are the global batch's losses). So the reducer stays idle and the
step equals one process on the concatenated global batch (tests/distributed/
test_lightning_example.py checks it against a one-process run). What NOT to do: one
``manual_backward(L_t, retain_graph=True)`` per task, which re-arms the reducer T times (T
all-reduces of every parameter per step, the "naive" row of benchmarks/RESULTS.md), or
automatic optimization, where Lightning calls ``loss.backward()`` itself. Checked with
Lightning 2.6 (the strategy behaviour above is Lightning's, see
``lightning.pytorch.strategies.ddp._DDPForwardRedirection``); the GPU/nccl path is untested.

Data: ``train_dataloader`` uses a seeded ``DistributedSampler`` over the trainer's ranks (one
rank included), with ``use_distributed_sampler=False`` (Lightning would otherwise put its own,
differently shuffled, sampler in), so each epoch's global permutation is the same whatever the
number of processes: the batches of a 2-process run are exactly those of a 1-process run with
twice the batch size.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import mtlfast

try:
    from ddp_train import Model, load_tasks  # run as a script from examples/
except ImportError:  # imported as examples.lightning_mtl
    from examples.ddp_train import Model, load_tasks

TASKS = ("digit", "parity", "large")


class MultiTaskModule(L.LightningModule):
    """The LightningModule: shared trunk + FusedHeads, one mtlfast.backward per step."""

    def __init__(self, dataset: TensorDataset, batch_size: int, lr: float) -> None:
        super().__init__()
        self.automatic_optimization = False  # mtlfast.backward writes .grad, we step
        self.model = Model()
        self.method = mtlfast.methods.UPGrad()
        self.dataset, self.batch_size, self.lr = dataset, batch_size, lr
        self.max_spread: float | None = None

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(self.dataset, num_replicas=self.trainer.world_size,
                                     rank=self.trainer.global_rank, shuffle=True, seed=1)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, *targets = batch
        logits = self.model(x)
        losses = {t: F.cross_entropy(logits[t], y) for t, y in zip(TASKS, targets, strict=True)}
        opt = self.optimizers()
        opt.zero_grad()
        group = dist.group.WORLD if self.trainer.world_size > 1 else None
        info = mtlfast.backward(losses, self.model.trunk, self.method, process_group=group)
        opt.step()
        # info.losses: the global batch's losses (already averaged over ranks)
        self.log_dict({f"loss/{t}": v for t, v in zip(TASKS, info.losses, strict=True)},
                      prog_bar=True)

    def on_train_end(self) -> None:
        # every rank must hold the same parameters: the max difference across ranks
        flat = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        if self.trainer.world_size > 1:
            spread = torch.stack([flat, -flat])
            dist.all_reduce(spread, op=dist.ReduceOp.MAX)
            self.max_spread = (spread[0] + spread[1]).max().item()
        else:
            self.max_spread = 0.0


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--devices", type=int, default=1, help="processes (DDP when > 1)")
    parser.add_argument("--accelerator", default="cpu", help="cpu (gloo) or gpu (nccl)")
    parser.add_argument("--out", help="save rank 0's final parameters and results here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x, targets = load_tasks(torch.device("cpu"))
    module = MultiTaskModule(TensorDataset(x, *(targets[t] for t in TASKS)), args.batch_size,
                             args.lr)
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto", max_steps=args.steps,
                        use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    with torch.no_grad():
        module.model.eval()
        logits = module.model(x.to(module.device))
        acc = {t: (logits[t].argmax(-1).cpu() == y).float().mean().item()
               for t, y in targets.items()}
    result = {"accuracy": acc, "max_spread": module.max_spread, "world": trainer.world_size,
              "params": torch.cat([p.detach().reshape(-1).cpu()
                                   for p in module.model.parameters()])}
    if trainer.is_global_zero:
        print(f"max parameter difference across ranks: {module.max_spread:.3g}")
        print("train accuracy: " + " ".join(f"{t}={a:.3f}" for t, a in acc.items()), flush=True)
        if args.out:
            torch.save(result, args.out)
    return result


if __name__ == "__main__":
    main()
