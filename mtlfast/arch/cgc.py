"""CGC (Customized Gate Control, Tang et al. RecSys 2020; LibMTL's definition), fused; and the
level both CGC and PLE are built of.

Task t mixes the S shared experts and its own k_t experts with a softmax gate over those
S + k_t experts (LibMTL's column order: shared first). Fused: every expert of the level (all
shared and task-specific ones) runs in one ``ExpertBank`` (one GEMM per layer), every gate in
one ``GateBank`` (one GEMM; the gates are scattered into a (T, B, E) tensor with zeros for the
experts a task does not mix) and the mixture is one ``mtlfast.ops.mixture`` call.

Bank order of the experts: the S shared ones, then task 0's k_0, task 1's k_1, ... The shared
experts are stored apart from the task-specific ones (``shared_weight{l}`` vs ``weight{l}``),
so that ``shared_parameters()`` (LibMTL's ``get_share_params``: the shared experts) names them
alone and the task experts and gates get their ordinary gradients.

Parameters and the keys of the loop definition ``CGCLoop`` (LibMTL's names), ``i = 2 l``
(or ``l`` with ``activation=None``), expert j of its group:

====================================  ==========================================================
fused parameter                       loop key
====================================  ==========================================================
``level.experts.shared_weight{l}``    ``experts_shared.{j}.{i}.weight`` (the S shared experts)
``level.experts.shared_bias{l}``      ``experts_shared.{j}.{i}.bias``
``level.experts.weight{l}``           ``experts_specific.{t}.{j}.{i}.weight`` (task t's
                                      experts, tasks in order)
``level.experts.bias{l}``             ``experts_specific.{t}.{j}.{i}.bias``
``level.gates.weight``                ``gate_specific.{t}.0.weight`` ((S + k_t, K) block)
``level.gates.bias``                  ``gate_specific.{t}.0.bias``
====================================  ==========================================================

(``shared_*`` is absent when S = 0, ``weight{l}`` when every k_t = 0; with one task its gate
reaches every task and is stored as ``level.gates.shared_weight`` / ``shared_bias``.)
"""

from __future__ import annotations

import torch
from torch import nn

from .._interop import Interop
from ._common import (
    bank_blocks,
    flatten_input,
    gate_blocks,
    level_reach,
    resolve_tasks,
    specific_counts,
)
from .experts import ExpertBank, expert_widths, positive_int
from .gates import GateBank

__all__ = ["CGC"]


class _Level(nn.Module):
    """One CGC level: an expert bank (the shared experts stored apart) and a gate bank; inner
    PLE levels add the shared gate (over every expert, in bank order) as gate 0 and return
    [shared, task 0, ...]. ``reach``: this level's entry of ``level_reach`` (what each part
    reaches), which decides the stored parts and ``shared_parameters()``."""

    def __init__(self, in_features, num_shared, counts, widths, activation, gate_bias,
                 shared_gate: bool, grouped: bool, f, reach: dict) -> None:
        super().__init__()
        E = num_shared + sum(counts)
        if E < 1:
            raise ValueError("a CGC level needs at least one expert")
        self.num_shared, self.counts, self.shared_gate = num_shared, tuple(counts), shared_gate
        self.grouped = grouped
        everyone = frozenset(range(len(counts)))
        self.experts = ExpertBank(in_features, widths, (num_shared, *counts) if grouped else None,
                                  activation, **f, split=num_shared)
        task_experts = {reach["task_experts"][t] == everyone
                        for t, k in enumerate(counts) if k > 0}
        if len(task_experts) > 1:  # pragma: no cover - level_reach makes them alike
            raise AssertionError("task experts of one level reach different task sets")
        # what every task reaches: the shared experts always; the task experts at inner
        # levels (through the shared gate); gates when their mixture reaches every task
        self._shared_experts = num_shared > 0 and reach["shared_experts"] == everyone
        self._task_experts = task_experts == {True}
        gate_reach = ([reach["shared_gate"]] if shared_gate else []) + list(reach["task_gates"])
        select, start = [], num_shared
        for k in counts:
            select.append(list(range(num_shared)) + list(range(start, start + k)))
            start += k
        if shared_gate:
            select.insert(0, list(range(E)))
        if any(not s for s in select):
            raise ValueError("a task with no specific experts needs num_shared >= 1")
        self.gates = GateBank(in_features, select, E, grouped=grouped, bias=gate_bias, **f,
                              shared=[g for g, r in enumerate(gate_reach) if r == everyone],
                              skip_inputs=int(grouped and not shared_gate))

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters of this level every task reaches (see ``level_reach``)."""
        out = self.experts.shared_part() if self._shared_experts else []
        if self._task_experts:
            out += self.experts.rest_part()
        return out + self.gates.shared_part()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(M, K)`` (first level) or ``(T + 1, M, K)`` = [shared, task 0, ...]."""
        h = self.experts(x)
        # an inner level's mixture row-major (the next level's gates read it as one matrix)
        return self.gates.mix(x, h, gate_major=not self.shared_gate), h

    def blocks(self, tasks, prefix: str, loop_prefix: str):
        names = [f"{loop_prefix}experts_shared.{j}." for j in range(self.num_shared)]
        for t, k in zip(tasks, self.counts, strict=True):
            names += [f"{loop_prefix}experts_specific.{t}.{j}." for j in range(k)]
        out = bank_blocks(f"{prefix}experts.", self.experts, names)
        gates = [f"{loop_prefix}gate_specific.{t}." for t in tasks]
        if self.shared_gate:
            gates.insert(0, f"{loop_prefix}gate_shared.")
        out.update(gate_blocks(f"{prefix}gates.", self.gates, gates))
        return out


class CGC(Interop, nn.Module):
    """``CGC(in_features, num_shared, num_specific, expert_hidden, tasks, activation="relu",
    gate_bias=True)``; ``forward(x (..., K)) -> (T, ..., D)``.

    ``num_specific``: task-specific experts, an int for every task or one per task (0 allowed
    when ``num_shared >= 1``). ``expert_hidden``: as in ``MMoE`` (per-expert lists in bank
    order for ragged hidden widths).
    """

    def __init__(self, in_features: int, num_shared: int, num_specific, expert_hidden, tasks,
                 activation: str | None = "relu", gate_bias: bool = True, device=None,
                 dtype=None) -> None:
        nn.Module.__init__(self)
        self.tasks = resolve_tasks(tasks)
        self.in_features = positive_int("in_features", in_features)
        counts = specific_counts(num_shared, num_specific, len(self.tasks))
        self._config = dict(in_features=in_features, num_shared=num_shared,
                            num_specific=counts, expert_hidden=expert_hidden, tasks=self.tasks,
                            activation=activation, gate_bias=gate_bias)
        widths = expert_widths(expert_hidden, num_shared + sum(counts))
        self.level = _Level(in_features, num_shared, counts, widths, activation, gate_bias,
                            False, False, {"device": device, "dtype": dtype},
                            level_reach(1, num_shared, counts)[0])
        self.out_features = self.level.experts.out_features
        self._register_interop()

    def forward(self, x: torch.Tensor, return_experts: bool = False):
        """``(T, *batch, D)``; with ``return_experts`` also the experts' ``(E, M, D)``."""
        x2, batch = flatten_input("CGC", x, self.in_features, self.level.experts.ref)
        z, h = self.level(x2)
        z = z.reshape(len(self.tasks), *batch, self.out_features)
        return (z, h) if return_experts else z

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared experts (LibMTL's ``get_share_params``: what every task reaches; with one
        task, everything): pass them as ``shared`` to ``mtlfast.backward``; the task experts
        and gates get their ordinary gradients."""
        return self.level.shared_parameters()

    def _param_blocks(self):
        return self.level.blocks(self.tasks, "level.", "")

    def unfuse(self) -> nn.Module:
        """The equivalent ``CGCLoop`` with copies of these parameters."""
        from .loops import CGCLoop

        p = self.level.experts.ref
        loop = CGCLoop(**self._config, device=p.device, dtype=p.dtype)
        loop.load_state_dict(self.state_dict())
        return loop
