"""MMoE (Multi-gate Mixture-of-Experts, Ma et al. KDD 2018; LibMTL's definition), fused.

``z[t] = sum_e softmax(x A_t^T + a_t)[e] * expert_e(x)``: E MLP experts on the input, one
softmax gate per task. Fused: all experts' layer ``l`` are one GEMM (``ExpertBank``), all
gates' logits one GEMM (``GateBank``), the T mixtures one op (``mtlfast.ops.mixture``).

Parameters (fused storage) and the keys of the loop definition ``MMoELoop`` (LibMTL's names)
they map to, expert ``e``, layer ``l`` (``i = 2 l``, or ``l`` with ``activation=None``), task
``t``; ``state_dict`` writes the loop keys, ``load_state_dict`` reads them:

========================  ===============================================================
fused parameter           loop key
========================  ===============================================================
``experts.weight{l}``     ``experts_shared.{e}.{i}.weight``   (expert e's (out, in) block)
``experts.bias{l}``       ``experts_shared.{e}.{i}.bias``
``gates.weight``          ``gate_specific.{t}.0.weight``      ((E, K) block of task t)
``gates.bias``            ``gate_specific.{t}.0.bias``
========================  ===============================================================
"""

from __future__ import annotations

import torch
from torch import nn

from .._interop import Interop
from ._common import bank_blocks, flatten_input, gate_blocks, resolve_tasks
from .experts import ExpertBank, expert_widths, positive_int
from .gates import GateBank

__all__ = ["MMoE"]


class MMoE(Interop, nn.Module):
    """``MMoE(in_features, num_experts, expert_hidden, tasks, activation="relu",
    gate_bias=True, top_k=None)``; ``forward(x (..., K)) -> (T, ..., D)`` per-task
    representations.

    Args:
        in_features: K, the input width.
        num_experts: E.
        expert_hidden: the experts' layer widths (``[256, 128]``; D is the last), or one
            list per expert (ragged hidden widths, same depth and last width).
        tasks: T, or the task names (the loop's ``gate_specific`` keys).
        activation: after every expert layer; ``gate_bias``: the gates' Linear bias.
        top_k: sparse gating (Shazeer et al. 2017, without the noise): each task mixes, per
            row, only the experts of its ``top_k`` largest gate logits, softmax over those
            (``GateBank``); None (LibMTL's MMoE): a dense softmax over all experts. With
            ``top_k=1`` the gates get no gradient (a softmax over one logit is constant).
    """

    def __init__(self, in_features: int, num_experts: int, expert_hidden, tasks,
                 activation: str | None = "relu", gate_bias: bool = True, device=None,
                 dtype=None, top_k: int | None = None) -> None:
        nn.Module.__init__(self)
        self.tasks = resolve_tasks(tasks)
        self.in_features = positive_int("in_features", in_features)
        self._config = dict(in_features=in_features, num_experts=num_experts,
                            expert_hidden=expert_hidden, tasks=self.tasks,
                            activation=activation, gate_bias=gate_bias, top_k=top_k)
        widths = expert_widths(expert_hidden, num_experts)
        if num_experts < 1:
            raise ValueError("MMoE needs at least one expert")
        f = {"device": device, "dtype": dtype}
        self.experts = ExpertBank(in_features, widths, None, activation, **f)
        self.gates = GateBank(in_features, [range(num_experts)] * len(self.tasks), num_experts,
                              bias=gate_bias, **f, top_k=top_k)
        self.out_features = self.experts.out_features
        self._register_interop()

    def forward(self, x: torch.Tensor, return_experts: bool = False):
        """``(T, *batch, D)``; with ``return_experts`` also the experts' ``(E, M, D)``."""
        x2, batch = flatten_input(type(self).__name__, x, self.in_features,
                                  self.experts.weight0)
        h = self.experts(x2)
        z = self._mix(x2, h).reshape(len(self.tasks), *batch, self.out_features)
        return (z, h) if return_experts else z

    def _mix(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.gates.mix(x, h)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The experts, which every task mixes (LibMTL's ``get_share_params``): pass them as
        ``shared`` to ``mtlfast.backward``; the gates get their ordinary gradients."""
        return list(self.experts.parameters())

    def _param_blocks(self):
        E = self.experts.num_experts
        out = bank_blocks("experts.", self.experts, [f"experts_shared.{e}." for e in range(E)])
        out.update(gate_blocks("gates.", self.gates, [f"gate_specific.{t}." for t in self.tasks]))
        return out

    def unfuse(self) -> nn.Module:
        """The equivalent ``MMoELoop`` with copies of these parameters."""
        from .loops import MMoELoop

        p = self.experts.weight0
        loop = MMoELoop(**self._config, device=p.device, dtype=p.dtype)
        loop.load_state_dict(self.state_dict())
        return loop
