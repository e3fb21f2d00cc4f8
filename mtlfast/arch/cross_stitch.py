"""Cross-stitch networks (Misra et al., CVPR 2016) as LibMTL defines them, T columns batched.

T copies of a stage-wise encoder (one column per task); after stage ``k`` of every column, for
each ``k`` in ``stitch_after`` (default: every stage but the stem and the last, LibMTL's rule
for ResNets), column ``t`` reads ``sum_j stitch[u, t, j] * out_j`` (a learned T x T matrix per
unit, initialised to ones as LibMTL does: after the first unit every column then reads the
same input, where the paper starts near independent columns with a convex 0.9 / 0.1 mix;
set ``stitch`` to that to follow the paper).

:class:`CrossStitch` runs each stage's T columns as one module on channel-stacked columns
(``_columns.StackedColumns``: grouped convolutions, ``BatchNorm2d(T*C)``, the stem's first
convolution as one ``Conv2d(C_in, T*C_out)`` on the shared input) and each stitch as one
einsum; a stage holding a module outside the batchable set, or (by default) with convolutions
of >= 256 input channels per task (ResNet-18 ``layer3``/``layer4``: T separate convolutions are
faster there on a CPU), runs as a loop over T modules (see ``CrossStitch.batched_stages``).
:class:`CrossStitchLoop` is the plain definition (nested ``nn.ModuleList``, Python
loops, as LibMTL's ``_transform_resnet_cross``).

state_dict keys (both classes; a checkpoint of either loads into the other):

=========================  ===================================================================
key                        value
=========================  ===================================================================
``columns.{k}.{t}.{path}``  stage ``k`` of task ``t``'s column (``path`` inside the stage; the
                           ResNet stem is ``Sequential(conv1, bn1, relu, maxpool)``, so
                           ``columns.0.{t}.0.weight`` is task ``t``'s ``conv1.weight``). In
                           :class:`CrossStitch` it is block ``t`` (dim 0) of the stacked tensor.
``stitch``                 ``(U, T, T)``, ``U = len(stitch_after)``. LibMTL allocates
                           ``cross_unit`` as ``(4, T, T)`` and uses ``[:3]``; only used units
                           are kept here (``stitch = cross_unit[:3]`` for a LibMTL checkpoint).
=========================  ===================================================================

Output: ``forward(x)`` returns a list of T per-task representations ``(B, C, H, W)`` (views of
one ``(B, T*C, H, W)`` buffer in :class:`CrossStitch`); ``stacked=True`` returns that buffer as
``(B, T, C, H, W)``.

Shared parameters (``shared_parameters()``, what to pass as ``shared=`` to
``mtlfast.backward``): the stitch units and every column's stages up to the last unit. The
columns are per-task modules, but through the units every one of those stages feeds every task,
so each has a per-task gradient for an MTL method to weigh. The stages after the last unit
(ResNet: ``layer4``) are reached by their own task only: like heads they get their ordinary
gradient (``task_parameters()``; mtlfast rejects a "shared" parameter only one task reaches).
LibMTL's ``get_share_params`` returns the whole encoder, tails included: their per-task
gradients are zero outside their own task, so they are task-specific all the same.
``mode="features"`` (MGDA-UB) runs with ``features=`` the T outputs, but each task reads
only its own representation, so that Gram is diagonal: use ``"jacobian"`` / ``"gramian"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
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

__all__ = ["CrossStitch", "CrossStitchLoop"]


def _stitch_after(stitch_after, num_stages: int) -> tuple[int, ...]:
    if stitch_after is None:
        return tuple(range(1, num_stages - 1))
    if isinstance(stitch_after, (str, bytes)) or not isinstance(stitch_after, Sequence):
        raise TypeError(f"stitch_after must be a sequence of stage indices, got "
                        f"{type(stitch_after).__name__}")
    out = tuple(stitch_after)
    for k in out:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_stages - 1:
            raise ValueError(f"stitch_after: stage indices must be ints in [0, "
                             f"{num_stages - 2}] (no unit after the last stage), got {k!r}")
    if list(out) != sorted(set(out)):
        raise ValueError(f"stitch_after must be strictly increasing, got {list(out)}")
    return out


def _default_encoder():
    return resnet()


class _Base(nn.Module):
    def _setup(self, tasks, encoder, stitch_after):
        self.tasks = check_tasks(tasks)
        T = len(self.tasks)
        cols = make_columns(_default_encoder if encoder is None else encoder, T)
        self.stitch_after = _stitch_after(stitch_after, len(cols[0]))
        self.stitch = nn.Parameter(torch.ones(len(self.stitch_after), T, T))
        return cols

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def _shared_stages(self) -> int:
        return self.stitch_after[-1] + 1 if self.stitch_after else 0

    def shared_parameters(self) -> list[nn.Parameter]:
        """The stitch units and the columns' stages up to the last unit (see the module doc)."""
        k = self._shared_stages()
        return [self.stitch] + [p for c in self.columns[:k] for p in c.parameters()]

    def task_parameters(self) -> list[nn.Parameter]:
        """The columns' stages after the last unit: each reached by its own task only."""
        return [p for c in self.columns[self._shared_stages():] for p in c.parameters()]

    def stitch_parameters(self) -> list[nn.Parameter]:
        return [self.stitch]

    def load_libmtl_state_dict(self, state_dict, strict: bool = True):
        """Load a LibMTL ``Cross_stitch`` checkpoint (its encoder's keys, or a whole model's:
        ``encoder.`` is dropped, decoders ignored): ``resnet_conv.{task}`` -> ``columns.0.{t}``,
        ``resnet_layer.{i}.{t}`` -> ``columns.{i+1}.{t}``, ``cross_unit[:3]`` -> ``stitch``.
        Needs LibMTL's layout: 5 stages, ``stitch_after=(1, 2, 3)``."""
        if self.stitch_after != (1, 2, 3):
            raise ValueError("load_libmtl_state_dict needs stitch_after=(1, 2, 3) (LibMTL's "
                             f"units), got {self.stitch_after}")
        sd = from_libmtl_columns(state_dict, self.tasks, "cross_unit", "stitch", slice(0, 3),
                                 len(self.columns))
        return self.load_state_dict(sd, strict=strict)


class CrossStitch(_Base):
    """Cross-stitch network over T columns of ``encoder``, each stage's columns batched.

    Args:
        tasks: the number of tasks T, or their names.
        encoder: a zero-argument callable returning an encoder (called T times: independent
            columns, as LibMTL's ``encoder_class``), a list of T encoders, or one encoder /
            sequence of stages (deep-copied T times). Split into stages by
            :func:`mtlfast.arch.split_stages`. Default: :func:`mtlfast.arch.resnet` (ResNet-18).
        stitch_after: the stages after which a stitch unit mixes the columns (default
            ``range(1, S - 1)``, LibMTL's placement for the 5 ResNet stages).
        batched: None (batch every stage that can be, loop over the others), True (raise if a
            stage cannot be batched) or False (loop everywhere).
    """

    def __init__(self, tasks, encoder=None, *, stitch_after: Sequence[int] | None = None,
                 batched: bool | None = None) -> None:
        super().__init__()
        cols = self._setup(tasks, encoder, stitch_after)
        T = self.num_tasks
        self.columns = nn.ModuleList([
            StackedColumns([cols[t][k] for t in range(T)], shared_input=(k == 0),
                           batched=batched) for k in range(len(cols[0]))])

    @property
    def batched_stages(self) -> tuple[bool, ...]:
        return tuple(c.batched for c in self.columns)

    def forward(self, x: torch.Tensor, stacked: bool = False):
        check_images(type(self).__name__, self, x)
        T = self.num_tasks
        units = dict(zip(self.stitch_after, self.stitch, strict=True))
        for k, stage in enumerate(self.columns):
            x = stage(x)
            if k in units:
                x = mix_columns(x, units[k], T)
        if stacked:
            return x.view(x.shape[0], T, x.shape[1] // T, *x.shape[2:])
        return per_task(x, T)

    def unfuse(self) -> CrossStitchLoop:
        """The equivalent :class:`CrossStitchLoop` (copies; same state_dict)."""
        cols = [c.unstack() for c in self.columns]
        ref = CrossStitchLoop(self.tasks, [[cols[k][t] for k in range(len(cols))]
                                                for t in range(self.num_tasks)],
                                   stitch_after=self.stitch_after)
        ref.load_state_dict(self.state_dict())
        return ref.train(self.training)


class CrossStitchLoop(_Base):
    """The plain definition (LibMTL's loops; ``columns[k][t]`` per-task stage modules). Same
    arguments and state_dict keys as :class:`CrossStitch`; ``encoder`` may also be a list of T
    lists of stages."""

    def __init__(self, tasks, encoder=None, *, stitch_after: Sequence[int] | None = None) -> None:
        super().__init__()
        if isinstance(encoder, list) and encoder and all(isinstance(c, list) for c in encoder):
            cols = encoder
            self.tasks = check_tasks(tasks)
            self.stitch_after = _stitch_after(stitch_after, len(cols[0]))
            T = self.num_tasks
            self.stitch = nn.Parameter(torch.ones(len(self.stitch_after), T, T))
        else:
            cols = self._setup(tasks, encoder, stitch_after)
        self.columns = nn.ModuleList([nn.ModuleList([c[k] for c in cols])
                                      for k in range(len(cols[0]))])

    def forward(self, x: torch.Tensor, stacked: bool = False):
        check_images(type(self).__name__, self, x)
        T = self.num_tasks
        reps = [x] * T
        unit = 0
        for k, stage in enumerate(self.columns):
            reps = [stage[t](reps[t]) for t in range(T)]
            if k in self.stitch_after:
                a = self.stitch[unit]
                reps = [sum(a[t, j] * reps[j] for j in range(T)) for t in range(T)]
                unit += 1
        return torch.stack(reps, dim=1) if stacked else reps
