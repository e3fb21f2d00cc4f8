"""GateBank: the softmax gates of all tasks of a level, their logits as one GEMM.

Gate ``g`` is LibMTL's ``nn.Sequential(nn.Linear(K, n_g), nn.Softmax(-1))`` over the experts
it mixes (``select[g]``, in its column order). The logits of all gates are one op: one
dense GEMM when every gate reads the same input; when gate ``g`` reads its own ``x[g]``
(PLE's levels past the first), ``mtlfast.ops.gate_logits`` (on the CPU one pass over the rows,
no GEMMs of a few columns).

``forward`` returns the gate weights as one ``(G, M, E)`` tensor (a gate over a subset of the
experts, CGC's and PLE's, is scattered among ``-inf`` logits, so one softmax gives exact
zeros for the others); ``mix`` runs softmax and mixture as one ``mtlfast.ops.gated_mixture``
op, which on the CPU reads only the experts each gate names.

Storage: ``weight`` is the flat concatenation of the gates' ``(n_g, K)`` row-major blocks,
``bias`` of their ``(n_g,)`` biases. With ``shared=`` (PLE's inner levels: the gates every
task reaches) those gates are stored apart, in ``shared_weight`` / ``shared_bias`` (gate
order), the others in ``weight`` / ``bias``, so that ``shared=`` can name them alone; the
logits GEMM reads the blocks concatenated back in gate order (one ``torch.cat``; the gates are
small).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..ops.gate_logits import logits as gate_logits
from ..ops.gated_mixture import gate_positions, gate_weights, mix
from ..ops.grouped_linear import cast, grouped_linear
from ..ops.mixture import mixture
from .experts import compute_dtype, int_list, positive_int

__all__ = ["GateBank"]


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def check_top_k(top_k: object, num_experts: int) -> int | None:
    """``top_k`` of a gate over ``num_experts`` experts: None or an int in [1, E]."""
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be None or an int in [1, num_experts={num_experts}], got "
                         f"{top_k!r}")
    return top_k


class GateBank(nn.Module):
    """G linear gates on ``in_features``.

    Args:
        in_features: K.
        select: for each gate, the expert indices (``0..num_experts-1``) its columns weigh.
        num_experts: E, the width of the gate tensor ``forward`` returns.
        grouped: gate ``g`` reads ``x[skip_inputs + g]`` of a ``(skip_inputs + G, M, K)``
            input (else all read one ``(M, K)``).
        bias: as in ``nn.Linear``.
        shared: the gates stored in ``shared_weight`` / ``shared_bias`` (the rest in
            ``weight`` / ``bias``); none by default.
        top_k: keep each row's ``top_k`` largest logits of a gate and softmax over them (the
            other experts get exactly 0 and no gradient; ties at the k-th value are all kept);
            None: a dense softmax.
        skip_inputs: leading input groups no gate reads (PLE's last level: its task gates
            skip the shared input; reading past it saves the slice's backward).
    """

    def __init__(self, in_features: int, select: Sequence[Sequence[int]], num_experts: int,
                 grouped: bool = False, bias: bool = True, device=None, dtype=None,
                 shared: Sequence[int] = (), top_k: int | None = None,
                 skip_inputs: int = 0) -> None:
        super().__init__()
        if isinstance(skip_inputs, bool) or not isinstance(skip_inputs, int) or skip_inputs < 0 \
                or (skip_inputs and not grouped):
            raise ValueError(f"skip_inputs must be an int >= 0 (0 unless grouped), got "
                             f"{skip_inputs!r}")
        self.skip_inputs = skip_inputs
        self.top_k = check_top_k(top_k, num_experts)
        self.in_features = positive_int("in_features", in_features)
        if isinstance(select, (str, bytes)):
            raise ValueError(f"select must be one sequence of expert indices per gate, got "
                             f"{select!r}")
        self.select = tuple(int_list("select", s, low=0) for s in select)
        self.num_experts = int(num_experts)
        if not self.select or any(not s for s in self.select):
            raise ValueError("every gate must weigh at least one expert")
        for s in self.select:
            if len(set(s)) != len(s) or min(s) < 0 or max(s) >= self.num_experts:
                raise ValueError(f"gate experts {list(s)} must be distinct, in [0, "
                                 f"{self.num_experts})")
        self.sizes = tuple(len(s) for s in self.select)
        self.grouped = bool(grouped)
        factory = {"device": device, "dtype": dtype}
        G, K = len(self.sizes), self.in_features
        self.shared = tuple(sorted({int(g) for g in shared}))
        if any(not 0 <= g < G for g in self.shared):
            raise ValueError(f"shared gates {list(shared)} must be in [0, {G})")
        rest = tuple(g for g in range(G) if g not in self.shared)
        # (name prefix, gates) of each stored part, none empty
        self.parts = tuple((n, gs) for n, gs in (("shared_", self.shared), ("", rest)) if gs)
        self.has_bias = bool(bias)
        for name, gs in self.parts:
            n = sum(self.sizes[g] for g in gs)
            self.register_parameter(f"{name}weight", nn.Parameter(torch.empty(n * K, **factory)))
            self.register_parameter(f"{name}bias", nn.Parameter(torch.empty(n, **factory))
                                    if bias else None)
        # the stored parts concatenate in gate order when the shared gates come first
        self._prefix = self.shared == tuple(range(len(self.shared)))
        # the expert each logit column weighs, and its flat (gate, expert) position (None
        # when every gate is dense)
        experts = torch.tensor([e for s in self.select for e in s])
        self.register_buffer("_experts", experts.to(device), persistent=False)
        self.register_buffer("_positions", _to(gate_positions(experts, self.sizes,
                                                              self.num_experts), device),
                             persistent=False)
        self.reset_parameters()

    @property
    def ref(self) -> torch.Tensor:
        """A parameter of the bank (its dtype and device)."""
        return getattr(self, f"{self.parts[0][0]}weight")

    def blocks(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Views of each gate's ``(n_g, K)`` weight and ``(n_g,)`` bias (of the parameter that
        stores it), in gate order."""
        K, G = self.in_features, len(self.sizes)
        w: list = [None] * G
        b: list = [None] * G
        for name, gs in self.parts:
            sizes = [self.sizes[g] for g in gs]
            for g, v, n in zip(gs, getattr(self, f"{name}weight").split([n * K for n in sizes]),
                               sizes, strict=True):
                w[g] = v.view(n, K)
            if self.has_bias:
                for g, v in zip(gs, getattr(self, f"{name}bias").split(sizes), strict=True):
                    b[g] = v
        return w, (b if self.has_bias else None)

    def shared_part(self) -> list[nn.Parameter]:
        """``shared_weight`` and ``shared_bias`` (the gates named by ``shared``)."""
        if not self.shared:
            return []
        return [p for p in (self.shared_weight, self.shared_bias) if p is not None]

    def _flat(self, kind: str, dtype: torch.dtype) -> torch.Tensor | None:
        """The flat weight or bias of every gate in gate order (a cat when stored apart), in
        ``dtype``."""
        if kind == "bias" and not self.has_bias:
            return None
        if len(self.parts) == 1:
            t = getattr(self, f"{self.parts[0][0]}{kind}")
        elif self._prefix:
            t = torch.cat([getattr(self, f"shared_{kind}"), getattr(self, kind)])
        else:
            w, b = self.blocks()
            t = torch.cat([v.reshape(-1) for v in (w if kind == "weight" else b)])
        return cast(t, dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        if len(self.parts) == 1:
            getattr(self, f"{self.parts[0][0]}weight").uniform_(-bound, bound)
            if self.has_bias:
                getattr(self, f"{self.parts[0][0]}bias").uniform_(-bound, bound)
            return
        # drawn in gate order, as one unsplit bank, then spread over the stored parts
        w, b = self.blocks()
        for views, n in ((w, sum(self.sizes) * self.in_features),
                         (b if self.has_bias else None, sum(self.sizes))):
            if views is not None:
                flat = views[0].new_empty(n).uniform_(-bound, bound)
                for v, part in zip(views, flat.split([v.numel() for v in views]), strict=True):
                    v.copy_(part.view_as(v))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, sum n_g)``: every gate's logits, one op (a shared input on the CPU: a plain
        ``addmm`` under torch's autograd, no custom-op or ``autograd.Function`` cost, which
        shows at small batches; grouped inputs: ``gate_logits``)."""
        K, G = self.in_features, len(self.sizes)
        w_flat, b_flat = self._flat("weight", x.dtype), self._flat("bias", x.dtype)
        if self.grouped:
            S = self.skip_inputs
            if x.dim() != 3 or x.shape[0] != S + G or x.shape[2] != K:
                raise ValueError(f"GateBank: x must be (G={S + G}, M, {K}), got "
                                 f"{tuple(x.shape)}")
            return gate_logits(x, w_flat, b_flat, list(self.sizes), S)
        if x.dim() != 2 or x.shape[1] != K:
            raise ValueError(f"GateBank: x must be (M, {K}), got {tuple(x.shape)}")
        if x.device.type == "cpu":
            w = w_flat.view(sum(self.sizes), K).t()
            return torch.addmm(b_flat, x, w) if b_flat is not None else x @ w
        return grouped_linear(x, w_flat, b_flat, [K], [sum(self.sizes)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate weights ``(G, M, E)`` (a transposed view of one ``(M, G, E)`` buffer), in the
        compute dtype (``compute_dtype``)."""
        z = self.logits(cast(x, compute_dtype("GateBank", x, self.ref)))
        return gate_weights(z, self._positions, len(self.sizes), self.num_experts, self.top_k)

    def mix(self, x: torch.Tensor, h: torch.Tensor, gate_major: bool = True) -> torch.Tensor:
        """``(G, M, D)``: gate g's mixture of the experts' outputs ``h`` (E, M, D), as
        ``mixture(self(x), h)``; dense softmax gates run as one ``gated_mixture`` op (on the
        CPU: the softmax and the gate's own experts per row, never the (G, M, E) weights;
        ``gate_major``: its output layout, see ``gated_mixture``)."""
        z = self.logits(cast(x, compute_dtype("GateBank", x, self.ref)))
        if self.top_k is not None:
            return mixture(gate_weights(z, self._positions, len(self.sizes), self.num_experts,
                                        self.top_k), h)
        return mix(z, cast(h, z.dtype), self._experts, list(self.sizes), self._positions,
                   gate_major)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, gates={len(self.sizes)}, " \
            f"experts={self.num_experts}, grouped={self.grouped}, bias={self.has_bias}, " \
            f"shared={list(self.shared)}, top_k={self.top_k}, skip_inputs={self.skip_inputs}"
