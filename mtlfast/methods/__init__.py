"""Multi-task gradient methods, one class per method (see base.py for the protocol)."""

from .base import GramMethod, JacobianMethod, LossMethod, Method
from .basic import Mean, Sum
from .cagrad import CAGrad
from .dualproj import DualProj
from .imtl import IMTLG
from .mgda import MGDA
from .pcgrad import PCGrad
from .upgrad import UPGrad

__all__ = [
    "CAGrad",
    "DualProj",
    "GramMethod",
    "IMTLG",
    "JacobianMethod",
    "LossMethod",
    "MGDA",
    "Mean",
    "Method",
    "PCGrad",
    "Sum",
    "UPGrad",
]
