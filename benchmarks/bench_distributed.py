"""Bytes communicated per step and CPU/gloo step time of the distributed ways to train MTL.

Variants (2 processes, gloo, one thread each; a trunk of P shared parameters, T linear heads of
H parameters in all, float32):

- ``ls``: linear scalarization, ``sum(L).backward()`` under plain DDP (P + H floats);
- ``naive``: T re-armed DDP forward+backward passes, one per task, then the method on the
  all-reduced per-task gradients (what a manual-optimization loop does): T (P + H) floats;
- ``exact``: ``mtlfast.backward(..., process_group=)``, the Jacobian in ``--bucket-cap-mb``
  buckets all-reduced during the backward: T P + T + H floats (+ a 96-byte check);
- ``exact-1``: the same with ``bucket_cap_mb=None``: ONE all-reduce of the Jacobian after the
  backward (no overlap, no staging copy): the same bytes;
- ``exact-seq`` (diagnostic): ``exact``'s buckets, all started after the backward (bucketing
  without the overlap);
- ``local``: ``distributed_mode="local"``: P + H (+ T + check) floats;
- ``fsdp2``: ``FSDPBackward`` on a ``fully_shard``-ed model: reduce-scatter of T P, the T x T
  Gram and T losses; FSDP2's own parameter all-gathers counted separately.

Bytes are the full-size payloads of the collectives per rank per step (all-reduce and
reduce-scatter: the input; all-gather: the gathered output), counted by wrapping the
``torch.distributed`` functions the code calls; DDP's reducer calls C++ collectives directly,
so its buckets go through the stock ``allreduce_hook`` comm hook (which calls
``dist.all_reduce``). A ring moves about ``2 (W-1)/W`` (all-reduce) or ``(W-1)/W``
(reduce-scatter, all-gather) times these bytes per rank.
The variants' steps are timed interleaved (round k runs every variant once, timed by the bench
timer ``mtlfast.bench.harness.measure``), so a load change on a shared machine hits them alike;
the table gives each variant's median.
Run: ``python benchmarks/bench_distributed.py [--steps 10] [--bucket-cap-mb 0.25]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

import mtlfast
from mtlfast.bench.harness import Config, measure
from mtlfast.distributed import FSDPBackward, no_sync
from mtlfast.distributed.buckets import bucket_ranges

COUNTED = ("all_reduce", "reduce_scatter_tensor", "all_gather_single", "broadcast")
COUNTS: dict[str, int] = defaultdict(int)


def _count(name: str, fn):
    def wrapped(*args, **kwargs):
        t = args[0] if name not in ("reduce_scatter_tensor",) else args[1]
        if isinstance(t, list):
            t = t[0]
        COUNTS[name] += t.numel() * t.element_size()
        return fn(*args, **kwargs)
    return wrapped


class Net(nn.Module):
    def __init__(self, T: int, width: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width),
                                   nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(T))

    def forward(self, x):
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads]


def _losses(model, x, y):
    return torch.stack([((o - y[:, t]) ** 2).mean() for t, o in enumerate(model(x))])


def _variant(name, rank, T, width, batch, bucket_cap_mb):
    """The variant's training step (a function), after one warm-up step."""
    torch.manual_seed(0)
    net = Net(T, width)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(batch, 64, generator=g), torch.randn(batch, T, generator=g)
    method = mtlfast.methods.UPGrad()
    if name == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for layer in (net.trunk[0], net.trunk[2]):
            fully_shard(layer)
        fully_shard(net)
        model, engine = net, FSDPBackward(net, net.trunk, method)
    else:
        model = DistributedDataParallel(net)
        model.register_comm_hook(None, allreduce_hook)  # DDP's reduction via dist.all_reduce
        if name in ("exact", "exact-1", "exact-seq", "local"):
            engine = mtlfast.MTLBackward(
                net.trunk.parameters(), method, process_group=dist.group.WORLD,
                distributed_mode="local" if name == "local" else "exact",
                bucket_cap_mb=None if name == "exact-1" else bucket_cap_mb)
        if name == "exact-seq":
            sink_of = engine._dist.jacobian_sink
            engine._dist.jacobian_sink = lambda shared, J, overlap: sink_of(shared, J,
                                                                            overlap=False)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    shared = list(net.trunk.parameters())

    def step():
        opt.zero_grad()
        if name == "ls":
            _losses(model, x, y).sum().backward()
        elif name == "naive":
            rows = []
            for t in range(T):  # a fresh DDP forward per task re-arms the reducer
                opt.zero_grad()
                _losses(model, x, y)[t].backward()
                rows.append(torch.cat([p.grad.reshape(-1) for p in shared]))
            G = torch.stack(rows)
            update = method(G)
            offset = 0
            for p in shared:
                p.grad.copy_(update[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        else:
            with no_sync(model):
                L = _losses(model, x, y)
            engine.backward(L)
        opt.step()

    step()  # warm-up (DDP's first-iteration setup, lazy buffers, batched backward verified)
    return step


VARIANTS = ("ls", "naive", "exact", "exact-1", "exact-seq", "local", "fsdp2")


def _worker(rank, world, folder, T, width, batch, steps, bucket_cap_mb):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rdzv", rank=rank,
                            world_size=world)
    for name in COUNTED:
        setattr(dist, name, _count(name, getattr(dist, name)))
    steps_of = {v: _variant(v, rank, T, width, batch, bucket_cap_mb) for v in VARIANTS}
    counts = {v: defaultdict(int) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    one_call = Config(torch.device("cpu"), "quick", warmup=0, min_reps=1, max_reps=1,
                      budget_s=0.0)  # the same single call on every rank: collectives match
    for _ in range(steps):
        for v, step in steps_of.items():
            dist.barrier()
            COUNTS.clear()
            times[v] += measure(step, one_call)
            for k, n in COUNTS.items():
                counts[v][k] += n
    out = {v: ({k: n / steps for k, n in counts[v].items()}, statistics.median(times[v]))
           for v in VARIANTS}
    if rank == 0:
        torch.save(out, os.path.join(folder, "out.pt"))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=4, help="number of tasks T")
    ap.add_argument("--width", type=int, default=256, help="trunk width (P grows as width^2)")
    ap.add_argument("--batch", type=int, default=32, help="per rank")
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (every variant once)")
    ap.add_argument("--bucket-cap-mb", type=float, default=0.25,
                    help="exact: MiB per Jacobian all-reduce bucket")
    a = ap.parse_args()
    P = 64 * a.width + a.width + a.width * a.width + a.width
    H = a.tasks * (a.width + 1)
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_worker, args=(2, folder, a.tasks, a.width, a.batch, a.steps,
                                          a.bucket_cap_mb), nprocs=2, start_method="spawn")
        out = torch.load(os.path.join(folder, "out.pt"))
    T = a.tasks
    # (+ 96 bytes: the per-step configuration check; local: + 8 bytes of finiteness flags;
    # fsdp2: the heads' dim-0 shards are padded to W rows, here 2 H)
    formulas = {"ls": ("P + H", P + H), "naive": ("T (P + H)", T * (P + H)),
                "exact": ("T P + T + H", T * P + T + H),
                "exact-1": ("T P + T + H", T * P + T + H),
                "exact-seq": ("T P + T + H", T * P + T + H), "local": ("P + H", P + H),
                "fsdp2": ("T P + T^2 + T + 2 H", T * P + T * T + T + 2 * H)}
    buckets = len(bucket_ranges([64 * a.width, a.width, a.width * a.width, a.width], 4 * T,
                                int(a.bucket_cap_mb * 2**20)))
    print(f"T={T}, P={P}, H={H}, world=2, per-rank batch {a.batch}, float32, {a.steps} steps; "
          f"exact: {buckets} buckets of <= {a.bucket_cap_mb} MiB")
    print("| variant | gradient bytes/step/rank | formula | formula bytes | FSDP2 param "
          "all-gather bytes | median step ms |")
    print("|---|---|---|---|---|---|")
    for v, (counts, t) in out.items():
        gathers = counts.pop("all_gather_single", 0)
        grad_bytes = sum(counts.values())
        f, n = formulas[v]
        print(f"| {v} | {grad_bytes:,.0f} | {f} | {4 * n:,} | {gathers:,.0f} | {1e3 * t:.1f} |")
    print("(raw counts by collective:", {v: dict(c) for v, (c, _) in out.items()}, ")")


if __name__ == "__main__":
    main()
