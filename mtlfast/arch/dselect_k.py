"""DSelect-k (Hazimeh et al. NeurIPS 2021; LibMTL's definition), fused.

Task t has k selectors over E shared experts. Selector j of task t puts the weight
``prod_b (c_{e,b} ? s_b : 1 - s_b)`` on expert e, where ``c_e`` is e's binary code (most
significant bit first, ceil(log2 E) bits; see ``loops.binary_codes``) and
``s = smooth_step(z_logits)`` with gamma = 1, the value LibMTL's forward uses: ``kgamma``
only scales the initialisation, as in LibMTL (the paper's and the official implementation's
smooth step has width gamma; the two agree at the default ``kgamma = 1``). The selectors are
mixed by ``softmax(w_logits)``. Both logits are linear in the input.

LibMTL also adds a regulariser to the selector outputs in training mode by calling
``backward`` inside ``forward`` (for the last task only): the selectors' entropy (x 1e-6)
and, when E is not a power of 2, ``sum 1 / (selector mass)``, which pushes the mass of the
codes >= E (no expert) back onto the experts. This block, like its loop definition
``DSelectKLoop``, leaves both out: the forward is a pure function of the input. With E a power
of 2 each selector's weights sum to 1; otherwise they sum to less (0.6-0.8 at initialisation
for E = 3, 5) and nothing pushes them back: prefer E = 2^n, or add that penalty to the loss.

Fused: the experts are one ``ExpertBank`` (one GEMM per layer), the z- and w-logits of all
tasks one GEMM (``gate_weight``/``gate_bias``), the smooth-step selection a few batched
elementwise ops over ``(B, T, k, E)``, and the mixture one ``mtlfast.ops.mixture`` call.

Parameters and the keys of ``DSelectKLoop`` (LibMTL's names), ``i = 2 l`` (or ``l`` with
``activation=None``), ``nb`` = number of bits:

========================  ===============================================================
fused parameter           loop key
========================  ===============================================================
``experts.weight{l}``     ``experts_shared.{e}.{i}.weight``
``experts.bias{l}``       ``experts_shared.{e}.{i}.bias``
``gate_weight``           ``_z_logits.{t}.weight`` ((k nb, K) blocks, tasks in order), then
                          ``_w_logits.{t}.weight`` ((k, K) blocks)
``gate_bias``             ``_z_logits.{t}.bias``, then ``_w_logits.{t}.bias``
========================  ===============================================================
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._interop import Interop
from ..ops.grouped_linear import cast, grouped_linear
from ..ops.mixture import mixture
from ._common import bank_blocks, resolve_tasks
from .experts import ExpertBank, expert_widths, positive_int
from .loops import smooth_step
from .mmoe import MMoE

__all__ = ["DSelectK"]


class DSelectK(Interop, nn.Module):
    """``DSelectK(in_features, num_experts, num_nonzeros, expert_hidden, tasks, kgamma=1.0,
    activation="relu")``; ``forward(x (..., K)) -> (T, ..., D)``."""

    def __init__(self, in_features: int, num_experts: int, num_nonzeros: int, expert_hidden,
                 tasks, kgamma: float = 1.0, activation: str | None = "relu", device=None,
                 dtype=None) -> None:
        nn.Module.__init__(self)
        self.tasks = resolve_tasks(tasks)
        self.in_features = K = positive_int("in_features", in_features)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 2:
            raise ValueError(f"DSelect-k selects among num_experts >= 2 experts, got "
                             f"{num_experts!r}")
        if isinstance(num_nonzeros, bool) or not isinstance(num_nonzeros, int) \
                or num_nonzeros < 1:
            raise ValueError(f"num_nonzeros must be an int >= 1, got {num_nonzeros!r}")
        if isinstance(kgamma, bool) or not isinstance(kgamma, (int, float)) \
                or not math.isfinite(kgamma) or kgamma <= 0:
            raise ValueError(f"kgamma must be a finite number > 0, got {kgamma!r}")
        self._config = dict(in_features=in_features, num_experts=num_experts,
                            num_nonzeros=num_nonzeros, expert_hidden=expert_hidden,
                            tasks=self.tasks, kgamma=kgamma, activation=activation)
        f = {"device": device, "dtype": dtype}
        self.experts = ExpertBank(K, expert_widths(expert_hidden, num_experts), None,
                                  activation, **f)
        self.num_nonzeros = num_nonzeros
        self.num_binary = math.ceil(math.log2(num_experts))
        T, k, nb = len(self.tasks), num_nonzeros, self.num_binary
        self._gate_widths = [k * nb] * T + [k] * T
        self.gate_weight = nn.Parameter(torch.empty(sum(self._gate_widths) * K, **f))
        self.gate_bias = nn.Parameter(torch.empty(sum(self._gate_widths), **f))
        with torch.no_grad():  # LibMTL's initialisation
            nz = T * k * nb
            self.gate_weight[:nz * K].uniform_(-kgamma / 100, kgamma / 100)
            self.gate_bias[:nz].uniform_(-kgamma / 100, kgamma / 100)
            self.gate_weight[nz * K:].uniform_(-0.05, 0.05)
            self.gate_bias[nz:].uniform_(-0.05, 0.05)
        self.out_features = self.experts.out_features
        self._register_interop()

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """The expert weights ``(T, M, E)`` of every task (x: ``(M, K)``)."""
        T, k, nb = len(self.tasks), self.num_nonzeros, self.num_binary
        logits = grouped_linear(x, cast(self.gate_weight, x.dtype), cast(self.gate_bias, x.dtype),
                                [self.in_features], [sum(self._gate_widths)])
        M = logits.shape[0]
        s = smooth_step(logits[:, :T * k * nb].reshape(M, T, k, nb))
        # prod_b (c_{e,b} ? s_b : 1 - s_b) for every code e at once, bit by bit (most
        # significant first) as outer products: 2E numbers per selector where the broadcast
        # where/prod of the definition builds E x nb and its backward runs cumprods (3.3x
        # faster forward + backward at E = 8, same products in the same order)
        selector = torch.ones_like(s[..., :1])
        for b in range(nb):
            bit = s[..., b:b + 1]
            selector = torch.stack([selector * (1 - bit), selector * bit], -1).flatten(-2)
        selector = selector[..., :self.experts.num_experts]  # (M, T, k, E)
        w = torch.softmax(logits[:, T * k * nb:].reshape(M, T, k), dim=-1)
        return cast(torch.einsum("mtk,mtke->tme", w, selector), x.dtype)

    def _mix(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return mixture(self.gates(x), h)

    # The same block around other gates: experts, gates(x), one mixture; experts shared.
    forward = MMoE.forward
    shared_parameters = MMoE.shared_parameters

    def _param_blocks(self):
        E, K = self.experts.num_experts, self.in_features
        out = bank_blocks("experts.", self.experts, [f"experts_shared.{e}." for e in range(E)])
        names = [f"_z_logits.{t}." for t in self.tasks] + [f"_w_logits.{t}." for t in self.tasks]
        w = self.gate_weight.split([n * K for n in self._gate_widths])
        b = self.gate_bias.split(self._gate_widths)
        out["gate_weight"] = [(f"{p}weight", v.view(n, K))
                              for p, v, n in zip(names, w, self._gate_widths, strict=True)]
        out["gate_bias"] = [(f"{p}bias", v) for p, v in zip(names, b, strict=True)]
        return out

    def unfuse(self) -> nn.Module:
        """The equivalent ``DSelectKLoop`` with copies of these parameters."""
        from .loops import DSelectKLoop

        p = self.experts.weight0
        loop = DSelectKLoop(**self._config, device=p.device, dtype=p.dtype)
        loop.load_state_dict(self.state_dict())
        return loop
