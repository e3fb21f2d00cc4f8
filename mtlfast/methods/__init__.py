"""Multi-task gradient methods, one class per method (see base.py for the protocol)."""

from .base import GramMethod, JacobianMethod, LossMethod, Method
from .basic import Mean, Sum

__all__ = ["GramMethod", "JacobianMethod", "LossMethod", "Method", "Mean", "Sum"]
