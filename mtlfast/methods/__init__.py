"""Multi-task gradient methods, one class per method (see base.py for the protocol).

Gram-based (``needs == "gram"``), whole-matrix (``"jacobian"``) and loss-based (``"losses"``);
``get(name, **kwargs)`` builds one by name, ``available()`` lists the names.
"""

from .aligned_mtl import AlignedMTL
from .base import GramMethod, JacobianMethod, LossMethod, Method
from .basic import Mean, Sum
from .cagrad import CAGrad
from .config import ConFIG
from .dbmtl import DBMTL
from .dualproj import DualProj
from .excess_mtl import ExcessMTL
from .fairgrad import FairGrad
from .famo import FAMO
from .graddrop import GradDrop
from .gradnorm import GradNorm
from .gradvac import GradVac
from .imtl import IMTLG
from .loss_weighting import DWA, GLS, RLW, UW
from .mgda import MGDA
from .moco import MoCo
from .modo import MoDo
from .nash_mtl import NashMTL
from .pcgrad import PCGrad
from .registry import available, get
from .rgw import RGW
from .sdmgrad import SDMGrad
from .stch import STCH
from .upgrad import UPGrad

__all__ = [
    "AlignedMTL",
    "CAGrad",
    "ConFIG",
    "DBMTL",
    "DWA",
    "DualProj",
    "ExcessMTL",
    "FAMO",
    "FairGrad",
    "GLS",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GramMethod",
    "IMTLG",
    "JacobianMethod",
    "LossMethod",
    "MGDA",
    "Mean",
    "Method",
    "MoCo",
    "MoDo",
    "NashMTL",
    "PCGrad",
    "RGW",
    "RLW",
    "SDMGrad",
    "STCH",
    "Sum",
    "UPGrad",
    "UW",
    "available",
    "get",
]
