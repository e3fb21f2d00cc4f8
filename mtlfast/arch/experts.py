"""ExpertBank: E MLP experts of one level evaluated as one op per layer, never a Python loop.

Expert ``e`` is ``act(W_{e,L} ... act(W_{e,1} x + b_{e,1}) ... + b_{e,L})`` (the activation
after every layer, DeepCTR's DNN convention).

CPU, every expert of one shape (and, for per-group inputs, every owner with the same number
of experts): the expert-major path.

- Plain eager calls with ReLU or no activation whose experts' first-layer GEMM is large
  enough (``ops._dispatch.EXPERT_KERNEL_MIN_MACS``) run the whole bank as one C++ op each way
  (``mtlfast.ops.expert_mlp``: MKL GEMMs expert by expert, the activation on cache-resident
  slices; 1.1-1.5x faster than the bmm's below at 2048 rows, ``benchmarks/experts_cpu.py``).
- Otherwise layer 1 is one ``addmm`` over the concatenated weights (shared input) or one
  ``baddbmm`` over owners; layers 2..L one ``baddbmm`` over the ``(E, M, H)`` activations;
  ReLU in place (out of place after a shared-input layer 1, on its expert-major view: its
  gradient then needs no copy); backward by torch's autograd (bmm's). No transposes of the
  activations: measured faster than the grouped-linear layout below on the arch suite.

Otherwise (ragged widths, owners of different sizes, CUDA tensors): one
``mtlfast.ops.grouped_linear`` call per layer:

- layer 1 with one shared input: ONE dense GEMM ``x @ [W_{1,1}; ...; W_{E,1}]^T`` (addmm, bias
  and activation fused), any (ragged) hidden widths;
- layer 1 with per-group inputs (PLE's inner levels: the experts of owner ``o`` read
  ``x[o]``): one per-task grouped GEMM, group ``o`` computing all of its experts at once;
- layers 2..L: one block-diagonal grouped GEMM (``bmm`` on CPU when all experts share the
  layer's shape, the Triton grouped kernel on CUDA; ragged widths run as a loop of ``addmm``
  on CPU and as the same single Triton launch on CUDA).

Storage: ``weight{l}`` is the flat concatenation of the experts' ``(out, in)`` row-major
blocks of layer ``l`` (expert order), ``bias{l}`` the concatenation of their biases. With
``split=S`` (CGC / PLE levels) the first S experts (the shared ones) are stored apart, in
``shared_weight{l}`` / ``shared_bias{l}``, and the others in ``weight{l}`` / ``bias{l}``, so
that ``shared=`` can name the shared experts alone; each layer's GEMM then reads the two
concatenated (one ``torch.cat`` of the weights per layer, small next to the GEMM). The output
of the last layer is one ``(M, E * D)`` buffer, returned as the ``(E, M, D)`` view the mixture
op reads. Every expert's last width must be the same ``D`` (they are mixed).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import nn

from ..ops._dispatch import backend
from ..ops.expert_mlp import expert_mlp
from ..ops.grouped_linear import ACTIVATIONS, _eager, cast, grouped_linear

__all__ = ["ExpertBank", "expert_widths"]

_ACT_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def positive_int(name: str, value: object) -> int:
    """``value`` (an int, or an integer type such as numpy's) as an int >= 1, else a
    ValueError naming ``name``."""
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        n = 0
    if isinstance(value, bool) or n < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return n


def int_list(name: str, values: object, low: int) -> tuple[int, ...]:
    """``values`` as a tuple of ints >= ``low`` (integer types such as numpy's taken), else a
    ValueError naming ``name``."""
    try:
        if isinstance(values, (str, bytes)):
            raise TypeError
        out = tuple(-1 if isinstance(v, bool) else operator.index(v)
                    for v in values)  # type: ignore[union-attr]
        if any(v < low for v in out):
            raise TypeError
    except TypeError:
        raise ValueError(f"{name} must be a sequence of ints >= {low}, got {values!r}") from None
    return out


def compute_dtype(name: str, x: torch.Tensor, ref: torch.Tensor) -> torch.dtype:
    """What a block computes in: autocast's dtype when autocast is on for ``x``'s device, else
    the parameters' dtype, which ``x`` must then have."""
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: x has dtype {x.dtype} but the parameters are {ref.dtype} "
                        "(cast one of them, or run under torch.autocast)")
    return ref.dtype


def normalize_activation(activation: str | None) -> str:
    act = "none" if activation is None else activation
    if act not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS} or None, got {activation!r}")
    return act


def expert_widths(expert_hidden, num_experts: int) -> tuple[tuple[int, ...], ...]:
    """``expert_hidden``: one width list for every expert, or one list per expert (ragged
    hidden widths; same depth and last width). Returns one tuple per expert."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 0:
        raise ValueError(f"the number of experts must be an int >= 0, got {num_experts!r}")
    if isinstance(expert_hidden, int):
        expert_hidden = [expert_hidden]
    items = list(expert_hidden)
    if not items:
        raise ValueError("expert_hidden must name at least one layer width")
    per_expert = all(isinstance(i, Sequence) for i in items)
    widths = [tuple(i) for i in items] if per_expert else [tuple(items)] * num_experts
    if len(widths) != num_experts:
        raise ValueError(f"expert_hidden gives {len(widths)} per-expert width lists for "
                         f"{num_experts} experts")
    for w in widths:
        if not w or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in w):
            raise ValueError(f"expert widths must be non-empty lists of ints >= 1, got {list(w)}")
    if len({len(w) for w in widths}) > 1 or len({w[-1] for w in widths}) > 1:
        raise ValueError("all experts must have the same depth and the same last width (their "
                         f"outputs are mixed), got {[list(w) for w in widths]}")
    return tuple(widths)


class ExpertBank(nn.Module):
    """E MLP experts, ``in_features -> widths[e]``, evaluated as one GEMM per layer.

    Args:
        in_features: K, the input width.
        widths: one tuple of layer widths per expert (see ``expert_widths``).
        groups: None when every expert reads the same input ``x (M, K)``; else the number of
            experts of each input group (owner-contiguous), the input then being ``(G, M, K)``.
        activation: after every layer (``"relu" | "gelu" | "silu" | None``).
        split: store the first ``split`` experts in ``shared_weight{l}`` / ``shared_bias{l}``
            and the rest in ``weight{l}`` / ``bias{l}`` (None: all in ``weight{l}``).
    """

    def __init__(self, in_features: int, widths: Sequence[Sequence[int]],
                 groups: Sequence[int] | None = None, activation: str | None = "relu",
                 device=None, dtype=None, split: int | None = None) -> None:
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths \
                or not all(isinstance(w, Sequence) for w in widths):
            raise ValueError(f"widths must be one sequence of layer widths per expert (at least "
                             f"one expert), got {widths!r}")
        self.widths = expert_widths(widths, len(widths))
        self.num_experts = len(self.widths)
        self.groups = None if groups is None else int_list("groups", groups, low=0)
        if self.groups is not None and sum(self.groups) != self.num_experts:
            raise ValueError(f"groups {list(self.groups)} must add up to {self.num_experts}")
        self.activation = normalize_activation(activation)
        self.depth = len(self.widths[0])
        self.out_features = self.widths[0][-1]
        factory = {"device": device, "dtype": dtype}
        E = self.num_experts
        if split is not None and not 0 <= split <= E:
            raise ValueError(f"split must be in [0, {E}], got {split}")
        S = 0 if split is None else int(split)
        self.split = split
        # (name prefix, first expert, end) of each stored part, in bank order, none empty
        self.parts = tuple((n, a, b) for n, a, b in (("shared_", 0, S), ("", S, E)) if b > a)
        for layer in range(self.depth):
            ins, outs = self.layer_widths(layer)
            for name, a, b in self.parts:
                self.register_parameter(f"{name}weight{layer}", nn.Parameter(torch.empty(
                    sum(i * o for i, o in zip(ins[a:b], outs[a:b], strict=True)), **factory)))
                self.register_parameter(f"{name}bias{layer}", nn.Parameter(
                    torch.empty(sum(outs[a:b]), **factory)))
        self.reset_parameters()

    @property
    def ref(self) -> torch.Tensor:
        """A parameter of the bank (its dtype and device)."""
        return getattr(self, f"{self.parts[0][0]}weight0")

    def shared_part(self) -> list[nn.Parameter]:
        """The parameters of the first ``split`` experts (``shared_weight{l}``, ...)."""
        return [getattr(self, f"shared_{k}{layer}") for layer in range(self.depth)
                for k in ("weight", "bias") if self.parts[0][0] == "shared_"]

    def rest_part(self) -> list[nn.Parameter]:
        """The parameters of the other experts (``weight{l}``, ``bias{l}``)."""
        return [getattr(self, f"{k}{layer}") for layer in range(self.depth)
                for k in ("weight", "bias") if self.parts[-1][0] == ""]

    def layer_weight(self, layer: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Layer ``layer``'s flat weight of all experts, in bank order (one cat when split),
        cast to ``dtype`` (autocast's compute type) when given."""
        return self._layer("weight", layer, dtype)

    def layer_bias(self, layer: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Layer ``layer``'s flat bias of all experts, in bank order."""
        return self._layer("bias", layer, dtype)

    def _layer(self, kind: str, layer: int, dtype: torch.dtype | None) -> torch.Tensor:
        if len(self.parts) == 1:
            t = getattr(self, f"{self.parts[0][0]}{kind}{layer}")
        else:
            t = torch.cat([getattr(self, f"shared_{kind}{layer}"), getattr(self, f"{kind}{layer}")])
        return cast(t, dtype)

    def layer_widths(self, layer: int) -> tuple[list[int], list[int]]:
        """Per-expert (in, out) widths of ``layer``."""
        ins = [self.in_features if layer == 0 else w[layer - 1] for w in self.widths]
        return ins, [w[layer] for w in self.widths]

    def blocks(self, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Views of each expert's ``(out, in)`` weight and ``(out,)`` bias of ``layer`` (of the
        parameter that stores it), in bank order."""
        ins, outs = self.layer_widths(layer)
        ws: list[torch.Tensor] = []
        bs: list[torch.Tensor] = []
        for name, a, b in self.parts:
            w = getattr(self, f"{name}weight{layer}").split(
                [i * o for i, o in zip(ins[a:b], outs[a:b], strict=True)])
            ws += [v.view(o, i) for v, i, o in zip(w, ins[a:b], outs[a:b], strict=True)]
            bs += list(getattr(self, f"{name}bias{layer}").split(outs[a:b]))
        return ws, bs

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each layer as its ``nn.Linear``: uniform(+-1/sqrt(fan_in)) weights and biases."""
        for layer in range(self.depth):
            ins, _ = self.layer_widths(layer)
            for w, b, fan_in in zip(*self.blocks(layer), ins, strict=True):
                bound = 1.0 / math.sqrt(fan_in)
                w.uniform_(-bound, bound)
                b.uniform_(-bound, bound)

    def _expert_major(self, x: torch.Tensor) -> bool:
        """The CPU path for experts of one shape (and owners of one size): measured faster
        than the grouped op's (it keeps the activations expert-major, no transposes)."""
        return x.device.type == "cpu" and len(set(self.widths)) == 1 and (
            self.groups is None or len(set(self.groups)) == 1)

    def _forward_expert_major(self, x: torch.Tensor) -> torch.Tensor:
        """The C++ expert kernel where the dispatch table picks it; else layer 1: one addmm
        (shared input) or one baddbmm over owners, layers 2..L: one baddbmm over the (E, M, H)
        activations, in-place activations after layers 2..L, torch autograd."""
        params = [getattr(self, f"{name}{kind}{layer}") for kind in ("weight", "bias")
                  for layer in range(self.depth) for name, _, _ in self.parts]
        dt = x.dtype
        macs = x.shape[-2] * self.in_features * self.widths[0][0]
        if params[0].dtype == dt and backend("expert_mlp", x, eager=_eager(x, *params),
                                              activation=self.activation, macs=macs) == "cpu":
            n = len(params) // 2
            return expert_mlp(x, params[:n], params[n:], [b - a for _, a, b in self.parts],
                              0 if self.groups is None else self.groups[0],
                              self.activation == "relu")
        E, K, widths = self.num_experts, self.in_features, self.widths[0]
        act = self._act_
        H = widths[0]
        if self.groups is None:
            M = x.shape[0]
            pre = torch.addmm(self.layer_bias(0, dt), x,
                              self.layer_weight(0, dt).view(E * H, K).t())
            # out of place, on the (E, M, H) view: its backward writes the gradient in pre's
            # (M, E * H) layout (with the in-place activation before the view, the view's
            # backward copied an expert-major M x E x H gradient back, profiled every step)
            h = self._act_out(pre.view(M, E, H).transpose(0, 1))
        else:
            G, M, n = x.shape[0], x.shape[1], self.groups[0]
            pre = torch.baddbmm(self.layer_bias(0, dt).view(G, 1, n * H), x,
                                self.layer_weight(0, dt).view(G, n * H, K).transpose(1, 2))
            h = act(pre)
            if n > 1:
                h = h.view(G, M, n, H).transpose(1, 2).reshape(E, M, H)
        for layer in range(1, self.depth):
            n_in, n_out = widths[layer - 1], widths[layer]
            w = self.layer_weight(layer, dt).view(E, n_out, n_in).transpose(1, 2)
            h = act(torch.baddbmm(self.layer_bias(layer, dt).view(E, 1, n_out), h, w))
        return h

    @property
    def _act_out(self):
        return {"relu": torch.relu, "gelu": torch.nn.functional.gelu,
                "silu": torch.nn.functional.silu, "none": lambda t: t}[self.activation]

    @property
    def _act_(self):
        return {"relu": torch.relu_, "gelu": torch.nn.functional.gelu,
                "silu": torch.nn.functional.silu, "none": lambda t: t}[self.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(M, K)`` (shared input) or ``(G, M, K)`` (per group). Returns ``(E, M, D)``."""
        K, act = self.in_features, self.activation
        if self.groups is None:
            if x.dim() != 2 or x.shape[1] != K:
                raise ValueError(f"ExpertBank: x must be (M, {K}), got {tuple(x.shape)}")
        else:
            G = len(self.groups)
            if x.dim() != 3 or x.shape[0] != G or x.shape[2] != K:
                raise ValueError(f"ExpertBank: x must be (G={G}, M, {K}), got {tuple(x.shape)}")
        dt = compute_dtype("ExpertBank", x, self.ref)
        x = cast(x, dt)
        if self._expert_major(x):
            return self._forward_expert_major(x)
        if self.groups is None:
            h = grouped_linear(x, self.layer_weight(0, dt), self.layer_bias(0, dt), [K],
                               [sum(self.layer_widths(0)[1])], activation=act)
        else:
            G = len(self.groups)
            outs, start = [], 0
            for n in self.groups:
                outs.append(sum(w[0] for w in self.widths[start:start + n]))
                start += n
            live = [i for i, n in enumerate(self.groups) if n > 0]
            if len(live) < G:  # owners without experts read nothing
                x = x.index_select(0, torch.tensor(live, device=x.device))
            h = grouped_linear(x, self.layer_weight(0, dt), self.layer_bias(0, dt), [K] * len(live),
                               [outs[i] for i in live], per_task=True, activation=act)
        for layer in range(1, self.depth):
            ins, outs = self.layer_widths(layer)
            h = grouped_linear(h, self.layer_weight(layer, dt), self.layer_bias(layer, dt), ins,
                               outs, activation=act)
        M = h.shape[0]
        return h.view(M, self.num_experts, self.out_features).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, experts={self.num_experts}, " \
            f"widths={[list(w) for w in self.widths]}, groups={self.groups}, " \
            f"activation={self.activation}, split={self.split}"


def make_expert(in_features: int, widths: Sequence[int], activation: str,
                device=None, dtype=None) -> nn.Sequential:
    """The loop definition's expert: ``nn.Sequential(Linear, act, ..., Linear, act)``."""
    layers: list[nn.Module] = []
    prev = in_features
    for w in widths:
        layers.append(nn.Linear(prev, w, device=device, dtype=dtype))
        if activation != "none":
            layers.append(_ACT_MODULES[activation]())
        prev = w
    return nn.Sequential(*layers)
