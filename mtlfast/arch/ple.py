"""PLE (Progressive Layered Extraction, Tang et al. RecSys 2020), multi-level, fused.

L stacked CGC levels (the paper's and DeepCTR's form). Every level has S shared experts, k_t
experts per task and one gate per task over [shared, own]; the inner levels (all but the last)
also have a shared gate over every expert of the level, whose mixture is the input of the
next level's shared experts and shared gate, while task t's experts and gate of level l > 0
read task t's mixture of level l - 1. The last level returns the T task mixtures.

(LibMTL's ``PLE`` is ResNet-specific: it has no shared gate and applies the shared experts to
each task's own representation; its ``CGC`` is this class with L = 1.)

Fused per level: one ``ExpertBank`` (layer 1 of level 0 one dense GEMM; of levels l > 0 one
per-owner grouped GEMM over the stacked [shared, task 0, ...] inputs; later layers one
block-diagonal GEMM), one ``GateBank`` GEMM (per-owner at l > 0), one mixture op.

Parameters and keys of the loop definition ``PLELoop``: level ``l``'s parameters map as in
``CGC`` with ``levels.{l}.`` for ``level.`` on both sides:

- ``levels.{l}.experts.shared_weight{i}`` / ``shared_bias{i}`` (the S shared experts) ->
  ``levels.{l}.experts_shared.{j}.*``;
- ``levels.{l}.experts.weight{i}`` / ``bias{i}`` (the task experts, tasks in order) ->
  ``levels.{l}.experts_specific.{t}.{j}.*``;
- the gates every task reaches (``level_reach``: an inner level's shared gate, over all
  experts in bank order, -> ``levels.{l}.gate_shared.0.*``, and the task gates of levels
  ``l < L - 2`` whose task has experts further down, -> ``levels.{l}.gate_specific.{t}.0.*``)
  are ``levels.{l}.gates.shared_weight`` / ``shared_bias`` (gate order: shared gate, then
  tasks); the other task gates ``levels.{l}.gates.weight`` / ``bias``.

Shared parameters (``shared_parameters()``): everything every task reaches, which for PLE is
more than the shared experts: every level's shared experts, the inner levels' shared gates
and task experts (the shared gate mixes them into the next level's shared input), and the
task gates of levels l < L - 2 (their mixture feeds task experts of an inner level).
"""

from __future__ import annotations

import torch
from torch import nn

from .._interop import Interop
from ._common import flatten_input, level_reach, resolve_tasks, specific_counts
from .cgc import _Level
from .experts import expert_widths, positive_int

__all__ = ["PLE"]


class PLE(Interop, nn.Module):
    """``PLE(in_features, num_levels, num_shared, num_specific, expert_hidden, tasks,
    activation="relu", gate_bias=True)``; ``forward(x (..., K)) -> (T, ..., D)``.

    Arguments as in ``CGC``; every level has the same experts (levels l > 0 read D-wide
    inputs, D = the experts' last width).
    """

    def __init__(self, in_features: int, num_levels: int, num_shared: int, num_specific,
                 expert_hidden, tasks, activation: str | None = "relu", gate_bias: bool = True,
                 device=None, dtype=None) -> None:
        nn.Module.__init__(self)
        self.tasks = resolve_tasks(tasks)
        self.in_features = positive_int("in_features", in_features)
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
            raise ValueError(f"num_levels must be an int >= 1, got {num_levels!r}")
        counts = specific_counts(num_shared, num_specific, len(self.tasks))
        self._config = dict(in_features=in_features, num_levels=num_levels,
                            num_shared=num_shared, num_specific=counts,
                            expert_hidden=expert_hidden, tasks=self.tasks,
                            activation=activation, gate_bias=gate_bias)
        widths = expert_widths(expert_hidden, num_shared + sum(counts))
        D = widths[0][-1]
        f = {"device": device, "dtype": dtype}
        reach = level_reach(num_levels, num_shared, counts)
        self.levels = nn.ModuleList([
            _Level(in_features if lvl == 0 else D, num_shared, counts, widths, activation,
                   gate_bias, lvl < num_levels - 1, lvl > 0, f, reach[lvl])
            for lvl in range(num_levels)])
        self.out_features = D
        self._register_interop()

    def forward(self, x: torch.Tensor, return_experts: bool = False):
        """``(T, *batch, D)``; with ``return_experts`` also the last level's ``(E, M, D)``."""
        x2, batch = flatten_input("PLE", x, self.in_features, self.levels[0].experts.ref)
        z = x2
        for level in self.levels:
            z, h = level(z)
        z = z.reshape(len(self.tasks), *batch, self.out_features)
        return (z, h) if return_experts else z

    def shared_parameters(self) -> list[nn.Parameter]:
        """Everything every task reaches (LibMTL's ``get_share_params`` for a multi-level
        block: the shared experts, the inner levels' shared gates and task experts, the task
        gates of levels l < L - 2; see ``level_reach``): pass it as ``shared`` to
        ``mtlfast.backward``; the rest gets its ordinary gradients."""
        return [p for level in self.levels for p in level.shared_parameters()]

    def _param_blocks(self):
        out = {}
        for lvl, level in enumerate(self.levels):
            out.update(level.blocks(self.tasks, f"levels.{lvl}.", f"levels.{lvl}."))
        return out

    def unfuse(self) -> nn.Module:
        """The equivalent ``PLELoop`` with copies of these parameters."""
        from .loops import PLELoop

        p = self.levels[0].experts.ref
        loop = PLELoop(**self._config, device=p.device, dtype=p.dtype)
        loop.load_state_dict(self.state_dict())
        return loop
