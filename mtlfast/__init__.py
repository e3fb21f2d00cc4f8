"""mtlfast: fast, exact multi-task learning for PyTorch."""

__version__ = "0.1.0"

from . import methods, ops  # noqa: E402
from ._ext import info  # noqa: E402

__all__ = ["__version__", "info", "methods", "ops"]
