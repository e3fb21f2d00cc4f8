"""Distributed training for ``mtlfast.backward``: DDP (exact or local) and FSDP2.

Use it through ``mtlfast.backward(..., process_group=group)`` or
``MTLBackward(..., process_group=group)`` (DDP), or :class:`FSDPBackward` for a
``fully_shard``-ed model (FSDP2); run the model's forward under :func:`no_sync`.
"""

from .data_parallel import DataParallel, DistributedMode
from .fsdp import FSDPBackward
from .sync import no_sync, reject_sharded

__all__ = ["DataParallel", "DistributedMode", "FSDPBackward", "no_sync", "reject_sharded"]
