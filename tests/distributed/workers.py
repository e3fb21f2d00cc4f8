"""Worker functions for the 2-process tests (importable by spawned processes)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mtlfast import MTLBackward, methods
from mtlfast.distributed import no_sync

DIM_IN, HIDDEN, DIM_Z, LOCAL_BATCH = 6, 8, 5, 4


class Net(nn.Module):
    def __init__(self, num_tasks: int, side: bool = False) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(DIM_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, DIM_Z))
        self.heads = nn.ModuleList(nn.Linear(DIM_Z, 1) for _ in range(num_tasks))
        #: with ``side``: a shared parameter the forward uses only when ``use_side`` (else no task
        #: reaches it)
        self.side = nn.Linear(DIM_IN, DIM_Z, bias=False) if side else None
        self.use_side = False

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        if self.use_side:
            z = z + self.side(x)
        return [h(z).squeeze(-1) for h in self.heads]

    def shared_with_side(self) -> list[nn.Parameter]:
        """Trunk parameters with ``side.weight`` in the middle (its bucket is neither end)."""
        first, second = self.trunk[0], self.trunk[2]
        return [first.weight, first.bias, self.side.weight, second.weight, second.bias]


#: Bucket cap for a T=3 float64 Jacobian of Net.shared_with_side(): three buckets, the last
#: parameters first: [second.weight, second.bias] (1,080 B), [first.bias, side.weight] (912 B),
#: [first.weight] (1,152 B): parameters grouped, one alone, the unused one sharing a bucket.
SMALL_BUCKET_MB = 1200 / 2**20


def losses_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    return [((out - y[:, t]) ** 2).mean() for t, out in enumerate(model(x))]


def global_batch(step: int, world: int, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(world * LOCAL_BATCH, DIM_IN, generator=g, dtype=torch.float64)
    y = torch.randn(world * LOCAL_BATCH, num_tasks, generator=g, dtype=torch.float64)
    return x, y


def local_part(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]


def make_method(name: str) -> methods.Method:
    return {"Mean": methods.Mean, "PCGrad": methods.PCGrad, "UPGrad": methods.UPGrad,
            "MGDA": methods.MGDA, "NashMTL": methods.NashMTL, "RLW": methods.RLW,
            "DWA": methods.DWA}[name]()


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return out


def exact_vs_single(rank: int, world: int, names: list[str], steps: int = 3,
                    micro_batches: int = 1, bucket_cap_mb: float | None = 25.0) -> dict:
    """DDP exact vs one process on the global batch: max |param diff| per method and step,
    max spread of parameters and weights across ranks. The shared parameters include
    ``side.weight``, which no task reaches (its Jacobian columns are zeros on every rank)."""
    T = 3
    out: dict = {}
    for name in names:
        torch.manual_seed(0)
        net = Net(T, side=True).double()
        ref_net = copy.deepcopy(net)
        torch.manual_seed(100 + rank)  # a differently seeded method on each rank
        method = make_method(name)
        ref_method = copy.deepcopy(method)  # rank 0's copy is the reference: rank 0 broadcasts
        ddp = DistributedDataParallel(net)
        engine = MTLBackward(net.shared_with_side(), method, process_group=dist.group.WORLD,
                             bucket_cap_mb=bucket_cap_mb)
        ref = MTLBackward(ref_net.shared_with_side(), ref_method)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        ref_opt = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9)
        diffs, spread, weights_spread = [], [], []
        for step in range(steps):
            opt.zero_grad()
            ref_opt.zero_grad()
            for k in range(micro_batches):
                x, y = global_batch(step * micro_batches + k, world, T)
                with no_sync(ddp):
                    L = losses_of(ddp, local_part(x, rank), local_part(y, rank))
                info = engine.backward(L)
                if rank == 0:
                    ref.backward(losses_of(ref_net, x, y))
                if info.weights is not None:
                    weights_spread.append(max((w - info.weights).abs().max().item()
                                              for w in gather(info.weights, world)))
            opt.step()
            if rank == 0:
                ref_opt.step()
                diffs.append((flat(net.parameters()) - flat(ref_net.parameters())).abs().max()
                             .item())
            p = flat(net.parameters())
            spread.append(max((q - p).abs().max().item() for q in gather(p, world)))
        out[name] = {"diffs": diffs, "spread": spread, "weights_spread": weights_spread,
                     "moved": (flat(net.parameters()) - flat(ref_net.parameters())).abs().max()
                     .item() if rank == 0 else None}
    return out


def bucketed_vs_one_allreduce(rank: int, world: int) -> dict:
    """Bucketed all-reduce (several buckets, overlapped) vs ONE all-reduce after the backward,
    with a rank-dependent graph: ``side.weight`` is used on rank 0 only, so its bucket is
    complete mid-backward on rank 0 and only at the end on rank 1 (the launch order must still
    match). Bitwise comparison of the reduced Jacobian, the Gram and the written gradients,
    per step; also how many buckets started before the backward had finished."""
    from mtlfast.distributed.buckets import BucketedJacobian

    early: list[tuple[int, int]] = []  # (buckets launched when finish() began, buckets)
    finish = BucketedJacobian.finish

    def recording_finish(self):
        early.append((len(self.launched), len(self.blocks)))
        finish(self)

    BucketedJacobian.finish = recording_finish
    T = 3
    out: dict = {"G": [], "K": [], "grad": []}
    try:
        for chunk_size, vjp in ((None, "batched"), (2, "batched"), (None, "loop")):
            torch.manual_seed(0)
            net = Net(T, side=True).double()
            net.use_side = rank == 0
            nets = [copy.deepcopy(net), net]
            engines = [MTLBackward(m.shared_with_side(), methods.UPGrad(), chunk_size=chunk_size,
                                   process_group=dist.group.WORLD, bucket_cap_mb=cap, vjp=vjp)
                       for m, cap in zip(nets, (None, SMALL_BUCKET_MB), strict=True)]
            for step in range(3):
                x, y = global_batch(step, world, T)
                infos = []
                for m, e in zip(nets, engines, strict=True):
                    m.zero_grad()
                    infos.append(e.backward(losses_of(m, local_part(x, rank),
                                                      local_part(y, rank))))
                Gs = [e._shared._jacobian for e in engines]
                out["G"].append(bool(torch.equal(Gs[0], Gs[1])) and Gs[0].abs().sum().item() > 0)
                out["K"].append(bool(torch.equal(infos[0].gram, infos[1].gram)))
                out["grad"].append(bool(torch.equal(flat(p.grad for p in nets[0].parameters()),
                                                    flat(p.grad for p in nets[1].parameters()))))
    finally:
        BucketedJacobian.finish = finish
    out["early"] = early
    return out


def local_vs_by_hand(rank: int, world: int) -> dict:
    """DDP local: .grad == mean over ranks of the single-process step on each rank's batch."""
    T = 3
    torch.manual_seed(0)
    net = Net(T).double()
    by_hand = copy.deepcopy(net)
    ddp = DistributedDataParallel(net)
    engine = MTLBackward(net.trunk.parameters(), methods.UPGrad(),
                         process_group=dist.group.WORLD, distributed_mode="local")
    x, y = global_batch(0, world, T)
    with no_sync(ddp):
        L = losses_of(ddp, local_part(x, rank), local_part(y, rank))
    info = engine.backward(L)
    MTLBackward(by_hand.trunk.parameters(), methods.UPGrad()).backward(
        losses_of(by_hand, local_part(x, rank), local_part(y, rank)))
    mine = flat(p.grad for p in by_hand.parameters())
    mean = torch.stack(gather(mine, world)).mean(0)
    got = flat(p.grad for p in net.parameters())
    # the exact step differs: local is an approximation, and the test must be able to tell
    exact_net = copy.deepcopy(by_hand)
    for p in exact_net.parameters():
        p.grad = None
    xs, ys = x, y
    MTLBackward(exact_net.trunk.parameters(), methods.UPGrad()).backward(
        losses_of(exact_net, xs, ys))
    exact = flat(p.grad for p in exact_net.parameters())
    weights = gather(info.weights, world)
    return {"err": (got - mean).abs().max().item(), "vs_exact": (got - exact).abs().max().item(),
            "weights_differ": (weights[0] - weights[1]).abs().max().item()}


def mismatched_tasks(rank: int, world: int, bucket_cap_mb: float | None = 25.0) -> str:
    """Rank 0 trains 3 tasks, rank 1 trains 2 (or with another bucket cap): both must raise,
    neither may hang."""
    T = 3 if rank == 0 or bucket_cap_mb != 25.0 else 2
    torch.manual_seed(0)
    net = Net(T).double()
    engine = MTLBackward(net.trunk.parameters(), methods.UPGrad(), process_group=dist.group.WORLD,
                         bucket_cap_mb=bucket_cap_mb if rank == 1 else 25.0)
    x, y = global_batch(0, world, T)
    try:
        engine.backward(losses_of(net, local_part(x, rank), local_part(y, rank)))
    except ValueError as err:
        return str(err)
    return "no error"


def bad_bucket_cap() -> list[str]:
    errors = []
    for cap in (0, -1.0, "25", True):
        try:
            MTLBackward(Net(2).trunk.parameters(), process_group=dist.group.WORLD,
                        bucket_cap_mb=cap)
            errors.append("no error")
        except ValueError as err:
            errors.append(str(err))
    return errors


def fully_sharded_twin(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with its trunk's layers and the root ``fully_shard``-ed."""
    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(net)
    fully_shard(sharded.trunk[0])
    fully_shard(sharded.trunk[2])
    fully_shard(sharded)
    return sharded


def fsdp2_vs_ddp_exact(rank: int, world: int, names: list[str], steps: int = 3) -> dict:
    """FSDP2 (trunk layers and root fully_shard-ed, heads sharded too) vs DDP exact."""
    from mtlfast.distributed import FSDPBackward

    T = 3
    out: dict = {}
    for name in names:
        torch.manual_seed(0)
        net = Net(T).double()
        sharded = fully_sharded_twin(net)
        torch.manual_seed(7)
        method = make_method(name)
        ddp = DistributedDataParallel(net)
        engine = MTLBackward(net.trunk.parameters(), copy.deepcopy(method),
                             process_group=dist.group.WORLD)
        fsdp = FSDPBackward(sharded, sharded.trunk, method)
        try:
            MTLBackward(sharded.trunk.parameters(), method)
            out["dtensor_error"] = "no error"
        except TypeError as err:
            out["dtensor_error"] = str(err)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        opt_s = torch.optim.SGD(sharded.parameters(), lr=0.1, momentum=0.9)
        grad_err, param_err, bytes_rs = [], [], 0
        for step in range(steps):
            opt.zero_grad()
            opt_s.zero_grad()
            x, y = global_batch(step, world, T)
            xl, yl = local_part(x, rank), local_part(y, rank)
            with no_sync(ddp):
                L = losses_of(ddp, xl, yl)
            engine.backward(L)
            with no_sync(sharded):
                Ls = losses_of(sharded, xl, yl)
            fsdp.backward(Ls)
            full = flat(p.grad.full_tensor() for p in sharded.parameters())
            grad_err.append((full - flat(p.grad for p in net.parameters())).abs().max().item())
            opt.step()
            opt_s.step()
            full = flat(p.full_tensor() for p in sharded.parameters())
            param_err.append((full - flat(net.parameters())).abs().max().item())
        bytes_rs = fsdp.dp.bytes_reduced
        out[name] = {"grad_err": grad_err, "param_err": param_err, "bytes": bytes_rs}
    return out


def suite(rank: int, world: int) -> dict:
    """Every check in one pair of processes (spawning costs more than the checks here)."""
    return {
        "exact": exact_vs_single(rank, world, ["Mean", "PCGrad", "UPGrad", "MGDA", "NashMTL",
                                               "RLW"], bucket_cap_mb=SMALL_BUCKET_MB),
        "one_bucket": exact_vs_single(rank, world, ["UPGrad"], bucket_cap_mb=None),
        "accumulation": exact_vs_single(rank, world, ["UPGrad", "PCGrad"], 2, 2),
        "bucketed": bucketed_vs_one_allreduce(rank, world),
        "local": local_vs_by_hand(rank, world),
        "fsdp2": fsdp2_vs_ddp_exact(rank, world, ["UPGrad", "PCGrad", "RLW"]),
        "bad_cap": bad_bucket_cap(),
        # last: they leave nothing pending
        "mismatch": mismatched_tasks(rank, world),
        "mismatch_cap": mismatched_tasks(rank, world, bucket_cap_mb=1.0),
    }
