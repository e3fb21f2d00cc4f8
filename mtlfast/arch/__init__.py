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
from .ltb import LTB, LTBReference
from .mtan import MTAN, MTANReference

__all__ = ["LTB", "MTAN", "BasicBlock", "Bottleneck", "CrossStitch", "CrossStitchReference",
           "LTBReference", "MTANReference", "StackedColumns", "register_batchable", "resnet",
           "split_stages"]
