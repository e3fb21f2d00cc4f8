"""``no_sync(model)``: the forward context every distributed ``mtlfast.backward`` step needs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

__all__ = ["no_sync", "reject_sharded"]


def reject_sharded(params: list[torch.Tensor]) -> None:
    """TypeError for sharded (DTensor) parameters: FSDP2 models go through FSDPBackward."""
    if any(isinstance(p, DTensor) for p in params):
        raise TypeError("shared: these parameters are sharded DTensors (fully_shard / FSDP2); "
                        "use mtlfast.distributed.FSDPBackward(model, shared, method) instead")


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Run the forward without arming DDP's reducer (or FSDP2's gradient reduce-scatter).

    ``mtlfast.backward`` does the communication itself (one all-reduce of the per-task
    Jacobian); DDP's own hooks never fire under ``torch.autograd.grad``, and a forward that
    armed them would make DDP's next forward raise. For a model that is neither DDP nor
    ``fully_shard``-ed this is a no-op.
    """
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
        return
    setter = getattr(model, "set_requires_gradient_sync", None)  # FSDP2 (fully_shard) modules
    if setter is None:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)
