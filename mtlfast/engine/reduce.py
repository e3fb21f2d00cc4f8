"""Reducers: how a step's tensors are combined across processes, behind one protocol.

The pipeline calls the same hooks whatever the distribution; :class:`Reducer` is the single
process (every hook the identity). ``mtlfast.distributed`` implements DDP exact (the Jacobian
all-reduced in buckets during the backward: the global batch's step), DDP local (per-rank
steps, averaged updates) and FSDP2 (per-task gradients reduce-scattered, the Gram all-reduced).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .flat import SharedParams, add_to_grads
from .jacobian import JacobianSink

__all__ = ["Reducer"]

Waiter = Callable[[], tuple[torch.Tensor, list[torch.Tensor | None]]]


class Reducer:
    """The single process: nothing to reduce. Subclasses override what their layout needs."""

    #: True when the method sees the global batch's losses and Gram (the step equals one
    #: process on the global batch); False when each rank weighs its own and the updates are
    #: averaged (DDP local).
    exact: bool = True
    #: True when mode="auto" must pick jacobian mode (the global Gram needs G itself).
    needs_jacobian: bool = False
    #: How the batched backward may run: ``"auto"`` times both ways on a CPU; several ranks
    #: timing apart could pick different collective orders, so distributed reducers fix it.
    vjp_auto: bool = True

    def __init__(self, shared: Sequence[torch.Tensor]) -> None:
        self._layout = SharedParams(shared)

    def layout(self) -> SharedParams:
        """The shared parameters' flat layout for this step."""
        return self._layout

    def check_mode(self, mode: str, method: object) -> None:
        """ValueError for a mode or method this reducer cannot run."""

    def begin(self, *, num_tasks: int, layout: SharedParams, heads: int, method: object,
              mode: str) -> None:
        """Before anything is computed (distributed: agree on the step's shape, sync state)."""

    def mean_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """The losses of the global batch (their mean over ranks)."""
        return losses

    def start_inputs(self, losses: torch.Tensor, others: Sequence[torch.Tensor],
                     head_grads: Sequence[torch.Tensor | None]) -> Waiter:
        """Start reducing the losses and the heads' gradients; the returned call waits."""
        result = (losses, list(head_grads))
        return lambda: result

    def sink(self, layout: SharedParams, J: torch.Tensor, *, overlap: bool) -> JacobianSink:
        """Where the per-task blocks of the shared parameters go during the backward."""
        return JacobianSink(layout, J)

    def finish_jacobian(self, sink: JacobianSink) -> torch.Tensor:
        """Wait for the sink's reductions; the (T, P) Jacobian the method weighs."""
        return sink.J

    def gram(self, K: torch.Tensor) -> torch.Tensor:
        """The Gram of the global per-task gradients from this rank's part."""
        return K

    def agree(self, ok: torch.Tensor, *, per_rank: bool = False) -> torch.Tensor:
        """The step's finiteness flag, the same on every rank (``per_rank``: computed from this
        rank's values alone, which an exact reducer otherwise has reduced already)."""
        return ok

    def explain(self, local: str | None, *, per_rank: bool = False) -> str:
        """What was non-finite, on every rank that saw it."""
        return local or "the gradients"

    def reduce_jacobian(self, G: torch.Tensor) -> torch.Tensor:
        """An accumulated (T, P) Jacobian of this rank made the global one (in place)."""
        return G

    def shared_grads(self, layout: SharedParams, outputs: Sequence[torch.Tensor],
                     cotangents: Sequence[torch.Tensor], others: Sequence[torch.Tensor],
                     *, retain_graph: bool) -> tuple[list, list]:
        """One ordinary backward of ``outputs`` with ``cotangents``: gradients of the shared
        parameters and of ``others`` (this rank's; see :meth:`average`)."""
        leaves = [*layout.params, *others]
        grads = torch.autograd.grad(outputs, leaves, grad_outputs=list(cotangents),
                                    retain_graph=retain_graph, allow_unused=True)
        n = len(layout.params)
        return list(grads[:n]), list(grads[n:])

    def average(self, layout: SharedParams, grads: list, others: Sequence[torch.Tensor],
                head_grads: list) -> tuple[list, list]:
        """Per-rank gradients made the same on every rank (their mean); single process: as is."""
        return grads, head_grads

    def write_heads(self, others: Sequence[torch.Tensor],
                    grads: Sequence[torch.Tensor | None]) -> None:
        """``.grad +=`` the heads' gradients (already reduced)."""
        add_to_grads(others, grads)
