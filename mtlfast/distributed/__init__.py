"""Distributed training for ``mtlfast.backward``: DDP (exact or local) and FSDP2.

Use it through ``mtlfast.backward(..., process_group=group)`` or
``MTLBackward(..., process_group=group)`` (DDP), or :class:`FSDPBackward` for a
``fully_shard``-ed model (FSDP2); run the model's forward under :func:`no_sync`. Each is a
reducer of the engine's one pipeline (``mtlfast.engine.reduce``): :class:`DataParallel` (DDP
exact or local) and :class:`FSDP2`.
"""

from .data_parallel import Collectives, DataParallel, DistributedMode
from .fsdp import FSDP2, FSDPBackward
from .sync import no_sync, reject_sharded

__all__ = ["FSDP2", "Collectives", "DataParallel", "DistributedMode", "FSDPBackward", "no_sync",
           "reject_sharded"]
