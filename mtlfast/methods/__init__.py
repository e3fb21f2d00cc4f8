"""Multi-task gradient methods, one class per method (see base.py for the protocol)."""

from .base import GramMethod, JacobianMethod, LossMethod, Method
from .basic import Mean, Sum
from .dbmtl import DBMTL
from .famo import FAMO
from .graddrop import GradDrop
from .loss_weighting import DWA, GLS, RLW, UW
from .moco import MoCo
from .stch import STCH

__all__ = [
    "GramMethod", "JacobianMethod", "LossMethod", "Method", "Mean", "Sum",
    "DBMTL", "DWA", "FAMO", "GLS", "GradDrop", "MoCo", "RLW", "STCH", "UW",
]
