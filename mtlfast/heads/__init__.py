"""Fused multi-task heads: T Linear or MLP heads computed as one op, forward and backward."""

from .fuse import fuse_heads, unfuse
from .module import FusedHeads
from .spec import HeadSpec

__all__ = ["FusedHeads", "HeadSpec", "fuse_heads", "unfuse"]
