"""Reference implementations of the patterns mtlfast replaces, for side-by-side benchmarks.

They are written from the papers' algorithms the way public code commonly runs them: what a
user of a LibMTL-style trainer or of a popular reference implementation runs today.
``python -m mtlfast bench`` times mtlfast against them on the same inputs after checking
that they compute the same update.
"""

from .heads import ConcatBmmHeads, heads_loop
from .pcgrad import pcgrad_pairwise
from .per_task_loop import per_task_loop_backward

__all__ = ["ConcatBmmHeads", "heads_loop", "pcgrad_pairwise", "per_task_loop_backward"]
