"""Multi-task gradient methods, one class per method (see base.py for the protocol).

Gram-based (``needs == "gram"``), whole-matrix (``"jacobian"``) and loss-based (``"losses"``).
"""

from .base import GramMethod, JacobianMethod, LossMethod, Method
from .basic import Mean, Sum
from .dbmtl import DBMTL
from .dualproj import DualProj
from .famo import FAMO
from .graddrop import GradDrop
from .loss_weighting import DWA, GLS, RLW, UW
from .mgda import MGDA
from .moco import MoCo
from .pcgrad import PCGrad
from .stch import STCH
from .upgrad import UPGrad

# Every Method subclass imported above is public (one import line per module, so branches
# adding methods merge without conflicts).
__all__ = sorted(
    name for name, obj in dict(globals()).items()
    if isinstance(obj, type) and issubclass(obj, Method)
)
