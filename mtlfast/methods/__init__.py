"""Multi-task gradient methods, one class per method (see base.py for the protocol)."""

from .base import GramMethod, JacobianMethod, LossMethod, Method
from .basic import Mean, Sum
from .dualproj import DualProj
from .mgda import MGDA
from .pcgrad import PCGrad
from .upgrad import UPGrad

__all__ = [
    "DualProj",
    "GramMethod",
    "JacobianMethod",
    "LossMethod",
    "MGDA",
    "Mean",
    "Method",
    "PCGrad",
    "Sum",
    "UPGrad",
]
