"""mtlfast: fast, exact multi-task learning for PyTorch."""

__version__ = "0.1.0"

from . import methods, ops  # noqa: E402
from ._ext import info  # noqa: E402
from .api import MTLBackward, StepInfo, backward  # noqa: E402
from .heads import FusedHeads, HeadSpec, fuse_heads  # noqa: E402

__all__ = [
    "FusedHeads",
    "HeadSpec",
    "MTLBackward",
    "StepInfo",
    "__version__",
    "backward",
    "fuse_heads",
    "info",
    "methods",
    "ops",
]
