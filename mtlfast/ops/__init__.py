"""Operations with one dispatch point each: CUDA kernel, C++ CPU kernel, Triton, or the torch
reference (the spec every kernel is tested against)."""

from .combine import combine, combine_reference
from .gram import gram, gram_reference

__all__ = ["combine", "combine_reference", "gram", "gram_reference"]
