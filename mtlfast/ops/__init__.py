"""Operations with one dispatch point each: CUDA kernel, C++ CPU kernel, Triton, or the torch
reference (the spec every kernel is tested against)."""

from .combine import combine, combine_reference
from .graddrop import graddrop, graddrop_reference
from .gram import gram, gram_reference
from .grouped_linear import (
    grouped_linear,
    grouped_linear_input_grad,
    grouped_linear_reference,
    grouped_linear_weight_grad,
)

__all__ = [
    "combine",
    "combine_reference",
    "graddrop",
    "graddrop_reference",
    "gram",
    "gram_reference",
    "grouped_linear",
    "grouped_linear_input_grad",
    "grouped_linear_reference",
    "grouped_linear_weight_grad",
]
