"""Multi-task architectures. Column architectures (issue #18): Cross-stitch, MTAN, LTB."""

from ._columns import (
           BasicBlock,
           Bottleneck,
           StackedColumns,
           register_batchable,
           resnet,
           split_stages,
)
from .cross_stitch import CrossStitch, CrossStitchReference

__all__ = ["BasicBlock", "Bottleneck", "CrossStitch", "CrossStitchReference", "StackedColumns",
           "register_batchable", "resnet", "split_stages"]
