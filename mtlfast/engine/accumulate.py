"""Exact gradient accumulation: the per-task gradients of k micro-batches, one solve.

Each micro-batch's per-task Jacobian ``G_i`` is summed into a ``(T, P)`` buffer (beside the
losses and the heads' gradients) instead of being weighed on its own; the k-th call weighs
``G = (1/k) sum_i G_i``, the per-task gradients of the mean loss over the k micro-batches,
which is one batch of k x B when the micro-batches have equal sizes. Per-micro-batch weights
(what two ``backward`` calls without accumulation give) are a different update: the weights
of a nonlinear method do not average.

The sum only changes once a call has succeeded (the engine commits it), and the final call
forms the mean in the scratch Jacobian, leaving the sum as it was until that step is written:
a call that raises changes nothing. Memory: a second ``(T, P)`` buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Accumulator"]


class Accumulator:
    """Running sums of k micro-batches' per-task Jacobians, losses and heads' gradients."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.count = 0
        self._J: torch.Tensor | None = None
        self._losses: torch.Tensor | None = None
        self._heads: list[torch.Tensor | None] = []

    def final(self, step: bool | None) -> bool:
        """Whether this call (the ``count + 1``-th) weighs and writes the update."""
        return self.count + 1 >= self.steps if step is None else step

    def add(self, J: torch.Tensor, losses: torch.Tensor,
            heads: Sequence[torch.Tensor | None]) -> None:
        """Commit one micro-batch."""
        if self.count == 0:
            self._J = J.clone()
            self._losses = losses.clone()
            self._heads = [None if g is None else g.clone() for g in heads]
        else:
            self._J.add_(J)
            self._losses.add_(losses)
            self._heads = [a if g is None else g.clone() if a is None else a.add_(g)
                           for a, g in zip(self._heads, heads, strict=True)]
        self.count += 1

    def mean_with(self, J: torch.Tensor, losses: torch.Tensor,
                  heads: Sequence[torch.Tensor | None]
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """The means over the committed micro-batches and this one; J is overwritten with G,
        the sums are left as they were."""
        n = self.count + 1
        if self.count == 0:
            return J, losses, list(heads)
        J.add_(self._J).div_(n)
        mean_losses = (self._losses + losses) / n
        mean_heads = [a if g is None else g if a is None else a + g
                      for a, g in zip(self._heads, heads, strict=True)]
        return J, mean_losses, [None if g is None else g / n for g in mean_heads]

    def reset(self) -> None:
        """After the step was written: start the next group."""
        self.count = 0
        self._J = self._losses = None
        self._heads = []
