"""Triton kernels. Each launcher here is called from one dispatch point in ``mtlfast.ops``."""

from .grouped_mm import (
    grouped_input_grad_triton,
    grouped_linear_triton,
    grouped_weight_grad_triton,
)

__all__ = ["grouped_input_grad_triton", "grouped_linear_triton", "grouped_weight_grad_triton"]
