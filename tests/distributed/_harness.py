"""Run a function on 2 CPU processes (gloo) with a hard time limit; collect what each returns."""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _entry(rank: int, fn: Callable, world: int, folder: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(folder, f"result{rank}.pt"))
        # DDP/FSDP2 modules live in reference cycles that keep the process group and its
        # finished work alive; gloo aborts the process ("terminate called without an active
        # exception") when those are destroyed during interpreter shutdown. Free them now,
        # leave the group together, and exit without a shutdown to run.
        del result
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable, *args: object, world: int = WORLD, timeout: float = 90.0) -> list:
    """``fn(rank, world, *args)`` on ``world`` spawned processes; their return values by rank.

    A worker's exception is re-raised here; a run past ``timeout`` seconds is killed and fails.
    """
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.start_processes(_entry, args=(fn, world, folder, args), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{fn.__name__} did not finish within {timeout} s")
        return [torch.load(os.path.join(folder, f"result{r}.pt"), weights_only=False)
                for r in range(world)]
