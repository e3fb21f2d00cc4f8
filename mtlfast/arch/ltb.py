"""Learning to Branch (Guo et al., ICML 2020) as LibMTL defines it, T columns batched.

T columns of a stage-wise encoder (one node per task per layer). Stage 0 (the stem) reads the
input; the input of node ``t`` of stage ``k >= 1`` is ``sum_j a[k-1, t, j] * out_j`` over the
previous stage's nodes, where ``a`` are the branching probabilities (LibMTL's schedule, with
``epoch`` / ``epochs`` as LibMTL's Trainer sets ``model.epoch`` / ``model.epochs``):

* warm-up, ``epoch < epochs / 100``: ``a = 1`` everywhere (every node reads the sum);
* else a hard Gumbel-softmax sample over the parents, ``a = gumbel_softmax(alpha, tau, hard=True,
  dim=-1)`` with the temperature ``tau = epochs / 20 / sqrt(epoch + 1)`` (straight-through
  gradients into ``alpha``).

In ``eval()`` mode LibMTL still samples; here eval uses the noise-free choice
``one_hot(argmax(alpha))`` (a deterministic network) unless ``sample_in_eval=True``.

:class:`LTB` runs each stage's T nodes as one module on channel-stacked columns (see
``_columns.StackedColumns``; a stage that cannot be batched, or with >= 256-channel
convolutions, loops over T modules, as in :class:`mtlfast.arch.CrossStitch`) and each
branching as one einsum; :class:`LTBLoop` is the plain definition (LibMTL's
``_transform_resnet_ltb`` loops). Both draw the same Gumbel noise for the same RNG state
(:meth:`branch_weights`).

state_dict keys (both classes, interchangeable): ``columns.{k}.{t}.{path}`` (stage ``k`` of
task ``t``, stacked along dim 0 in :class:`LTB`) and ``alpha`` ``(S - 1, T, T)``. LibMTL
allocates ``alpha`` as ``(6, T, T)`` and uses ``[1:5]`` for its 5 ResNet stages: ``alpha =
libmtl_alpha[1:5]``.

Output: a list of T per-task representations ``(B, C, H, W)`` (``stacked=True``: one
``(B, T, C, H, W)`` tensor).

Shared parameters (``shared_parameters()``, the ``shared=`` of ``mtlfast.backward``): ``alpha``
and the nodes of every stage but the last (through the branching each may feed every task; in
LibMTL's ``get_share_params`` too). The last stage's nodes are reached by their own task only:
like heads they get their ordinary gradient (``task_parameters()``; mtlfast rejects a "shared"
parameter only one task reaches). During warm-up ``alpha`` is not used (no gradient).
``branch_parameters()`` returns ``[alpha]``.
``mode="features"`` (MGDA-UB) runs with ``features=`` the T outputs, but each task reads
only its own representation, so that Gram is diagonal: use ``"jacobian"`` / ``"gramian"``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._columns import (
    StackedColumns,
    check_images,
    check_tasks,
    from_libmtl_columns,
    make_columns,
    mix_columns,
    per_task,
    resnet,
)

__all__ = ["LTB", "LTBLoop"]


def _default_encoder():
    return resnet()


class _Base(nn.Module):
    def _setup(self, tasks, encoder, sample_in_eval, cols=None):
        self.tasks = check_tasks(tasks)
        T = len(self.tasks)
        if cols is None:
            cols = make_columns(_default_encoder if encoder is None else encoder, T)
        if len(cols[0]) < 2:
            raise ValueError("encoder must have at least two stages to branch between")
        self.alpha = nn.Parameter(torch.ones(len(cols[0]) - 1, T, T))
        self.sample_in_eval = bool(sample_in_eval)
        self.epoch: int | None = None
        self.epochs: int | None = None
        return cols

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """The schedule's position (LibMTL's Trainer sets ``model.epoch`` / ``model.epochs``)."""
        for name, v in (("epoch", epoch), ("epochs", epochs)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.epoch, self.epochs = epoch, epochs

    def branch_weights(self, epoch: int | None = None, epochs: int | None = None):
        """The ``(S - 1, T, T)`` branching weights this forward uses (see the module doc)."""
        epoch = self.epoch if epoch is None else epoch
        epochs = self.epochs if epochs is None else epochs
        if epoch is None or epochs is None:
            raise ValueError("LTB needs the training schedule: call set_epoch(epoch, epochs) "
                             "or pass forward(x, epoch=..., epochs=...)")
        if epoch < epochs / 100:  # warm-up
            return torch.ones_like(self.alpha)
        if not self.training and not self.sample_in_eval:
            return F.one_hot(self.alpha.argmax(-1), self.num_tasks).to(self.alpha.dtype)
        tau = epochs / 20 / math.sqrt(epoch + 1)
        return F.gumbel_softmax(self.alpha, tau=tau, hard=True, dim=-1)

    def shared_parameters(self) -> list[nn.Parameter]:
        """``alpha`` and the nodes of every stage but the last (see the module doc)."""
        return [self.alpha] + [p for c in self.columns[:-1] for p in c.parameters()]

    def task_parameters(self) -> list[nn.Parameter]:
        """The last stage's nodes: each reached by its own task only."""
        return list(self.columns[-1].parameters())

    def branch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

    def load_libmtl_state_dict(self, state_dict, strict: bool = True):
        """Load a LibMTL ``LTB`` checkpoint (its encoder's keys, or a whole model's: ``encoder.``
        is dropped, decoders ignored): ``resnet_conv.{task}`` -> ``columns.0.{t}``,
        ``resnet_layer.{i}.{t}`` -> ``columns.{i+1}.{t}``, ``alpha[1:5]`` -> ``alpha``."""
        sd = from_libmtl_columns(state_dict, self.tasks, "alpha", "alpha", slice(1, 5),
                                 len(self.columns))
        return self.load_state_dict(sd, strict=strict)


class LTB(_Base):
    """Learning-to-branch over T columns of ``encoder``, each stage's T nodes batched.

    Args:
        tasks: the number of tasks T, or their names.
        encoder: as :class:`mtlfast.arch.CrossStitch` (a factory called T times, a list of T
            encoders, or one encoder / sequence of stages deep-copied T times); default
            :func:`mtlfast.arch.resnet` (ResNet-18). At least two stages.
        batched: None (batch what can be), True (raise if a stage cannot), False (loop).
        sample_in_eval: sample the Gumbel branching in ``eval()`` mode too (as LibMTL).

    ``forward(x, epoch=None, epochs=None, stacked=False)``: the schedule defaults to the one
    :meth:`set_epoch` stored.
    """

    def __init__(self, tasks, encoder=None, *, batched: bool | None = None,
                 sample_in_eval: bool = False) -> None:
        super().__init__()
        cols = self._setup(tasks, encoder, sample_in_eval)
        T = self.num_tasks
        self.columns = nn.ModuleList([
            StackedColumns([cols[t][k] for t in range(T)], shared_input=(k == 0),
                           batched=batched) for k in range(len(cols[0]))])

    @property
    def batched_stages(self) -> tuple[bool, ...]:
        return tuple(c.batched for c in self.columns)

    def forward(self, x: torch.Tensor, epoch: int | None = None, epochs: int | None = None,
                stacked: bool = False):
        check_images(type(self).__name__, self, x)
        T = self.num_tasks
        a = self.branch_weights(epoch, epochs)
        for k, stage in enumerate(self.columns):
            if k > 0:
                x = mix_columns(x, a[k - 1], T)
            x = stage(x)
        if stacked:
            return x.view(x.shape[0], T, x.shape[1] // T, *x.shape[2:])
        return per_task(x, T)

    def unfuse(self) -> LTBLoop:
        """The equivalent :class:`LTBLoop` (copies; same state_dict and schedule)."""
        cols = [c.unstack() for c in self.columns]
        ref = LTBLoop(self.tasks, [[cols[k][t] for k in range(len(cols))]
                                        for t in range(self.num_tasks)],
                           sample_in_eval=self.sample_in_eval)
        ref.load_state_dict(self.state_dict())
        ref.epoch, ref.epochs = self.epoch, self.epochs
        return ref.train(self.training)


class LTBLoop(_Base):
    """The plain definition (LibMTL's loops over ``columns[k][t]``). Same arguments and
    state_dict keys as :class:`LTB`; ``encoder`` may also be a list of T lists of stages."""

    def __init__(self, tasks, encoder=None, *, sample_in_eval: bool = False) -> None:
        super().__init__()
        given = encoder if isinstance(encoder, list) and encoder and \
            all(isinstance(c, list) for c in encoder) else None
        cols = self._setup(tasks, encoder, sample_in_eval, cols=given)
        self.columns = nn.ModuleList([nn.ModuleList([c[k] for c in cols])
                                      for k in range(len(cols[0]))])

    def forward(self, x: torch.Tensor, epoch: int | None = None, epochs: int | None = None,
                stacked: bool = False):
        check_images(type(self).__name__, self, x)
        T = self.num_tasks
        a = self.branch_weights(epoch, epochs)
        reps = [x] * T
        for k, stage in enumerate(self.columns):
            if k > 0:
                reps = [sum(a[k - 1, t, j] * reps[j] for j in range(T)) for t in range(T)]
            reps = [stage[t](reps[t]) for t in range(T)]
        return torch.stack(reps, dim=1) if stacked else reps
