"""Multi-task gradient methods, one class per method (see base.py for the protocol)."""

from .aligned_mtl import AlignedMTL
from .base import GramMethod, JacobianMethod, LossMethod, Method
from .basic import Mean, Sum
from .config import ConFIG
from .fairgrad import FairGrad
from .gradnorm import GradNorm
from .gradvac import GradVac
from .nash_mtl import NashMTL

__all__ = [
    "AlignedMTL",
    "ConFIG",
    "FairGrad",
    "GradNorm",
    "GradVac",
    "GramMethod",
    "JacobianMethod",
    "LossMethod",
    "Method",
    "Mean",
    "NashMTL",
    "Sum",
]
