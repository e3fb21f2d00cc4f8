"""CGC (Customized Gate Control, Tang et al. RecSys 2020; LibMTL's definition), fused; and the
level both CGC and PLE are built of.

Task t mixes the S shared experts and its own k_t experts with a softmax gate over those
S + k_t experts (LibMTL's column order: shared first). Fused: every expert of the level (all
shared and task-specific ones) is in one ``ExpertBank`` (one GEMM per layer), every gate in
one ``GateBank`` (one GEMM; the gates are scattered into a (T, B, E) tensor with zeros for the
experts a task does not mix) and the mixture is one ``mtlfast.ops.mixture`` call.

Bank order of the experts: the S shared ones, then task 0's k_0, task 1's k_1, ...

Parameters and the keys of the loop definition ``CGCLoop`` (LibMTL's names), ``i = 2 l``
(or ``l`` with ``activation=None``), expert j of its group:

========================  ===============================================================
fused parameter           loop key
========================  ===============================================================
``experts.weight{l}``     ``experts_shared.{j}.{i}.weight`` (shared experts), then
                          ``experts_specific.{t}.{j}.{i}.weight`` (task t's experts)
``experts.bias{l}``       the same keys ending in ``.bias``
``gates.weight``          ``gate_specific.{t}.0.weight``   ((S + k_t, K) block of task t)
``gates.bias``            ``gate_specific.{t}.0.bias``
========================  ===============================================================
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.mixture import mixture
from ._common import bank_blocks, flatten_input, gate_blocks, resolve_tasks, specific_counts
from ._interop import Interop
from .experts import ExpertBank, expert_widths
from .gates import GateBank

__all__ = ["CGC"]


class _Level(nn.Module):
    """One CGC level: an expert bank and a gate bank; inner PLE levels add the shared gate
    (over every expert, in bank order) as gate 0 and return [shared, task 0, ...]."""

    def __init__(self, in_features, num_shared, counts, widths, activation, gate_bias,
                 shared_gate: bool, grouped: bool, f) -> None:
        super().__init__()
        E = num_shared + sum(counts)
        if E < 1:
            raise ValueError("a CGC level needs at least one expert")
        self.num_shared, self.counts, self.shared_gate = num_shared, tuple(counts), shared_gate
        self.grouped = grouped
        self.experts = ExpertBank(in_features, widths, (num_shared, *counts) if grouped else None,
                                  activation, **f)
        select, start = [], num_shared
        for k in counts:
            select.append(list(range(num_shared)) + list(range(start, start + k)))
            start += k
        if shared_gate:
            select.insert(0, list(range(E)))
        if any(not s for s in select):
            raise ValueError("a task with no specific experts needs num_shared >= 1")
        self.gates = GateBank(in_features, select, E, grouped=grouped, bias=gate_bias, **f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(M, K)`` (first level) or ``(T + 1, M, K)`` = [shared, task 0, ...]."""
        h = self.experts(x)
        gate_in = x if not self.grouped or self.shared_gate else x[1:]
        return mixture(self.gates(gate_in), h), h

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
        self.in_features = int(in_features)
        counts = specific_counts(num_specific, len(self.tasks))
        self._config = dict(in_features=in_features, num_shared=num_shared,
                            num_specific=counts, expert_hidden=expert_hidden, tasks=self.tasks,
                            activation=activation, gate_bias=gate_bias)
        widths = expert_widths(expert_hidden, num_shared + sum(counts))
        self.level = _Level(in_features, num_shared, counts, widths, activation, gate_bias,
                            False, False, {"device": device, "dtype": dtype})
        self.out_features = self.level.experts.out_features
        self._register_interop()

    def forward(self, x: torch.Tensor, return_experts: bool = False):
        """``(T, *batch, D)``; with ``return_experts`` also the experts' ``(E, M, D)``."""
        x2, batch = flatten_input("CGC", x, self.in_features, self.level.experts.weight0)
        z, h = self.level(x2)
        z = z.reshape(len(self.tasks), *batch, self.out_features)
        return (z, h) if return_experts else z

    def _param_blocks(self):
        return self.level.blocks(self.tasks, "level.", "")

    def unfuse(self) -> nn.Module:
        """The equivalent ``CGCLoop`` with copies of these parameters."""
        from .loops import CGCLoop

        p = self.level.experts.weight0
        loop = CGCLoop(**self._config, device=p.device, dtype=p.dtype)
        loop.load_state_dict(self.state_dict())
        return loop
