"""Contenders written from the papers' algorithms the way public code commonly runs them.

They are what a user of a LibMTL-style trainer or of a popular reference implementation
runs today; ``python -m mtlfast bench`` times mtlfast against them on the same inputs after
checking that they compute the same update.
"""

from .heads import ConcatBmmHeads, heads_loop
from .pcgrad import pcgrad_pairwise

__all__ = ["ConcatBmmHeads", "heads_loop", "pcgrad_pairwise"]
