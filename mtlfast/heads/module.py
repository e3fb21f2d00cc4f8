"""FusedHeads: T task heads evaluated as one fused computation, forward and backward.

Linear heads are one GEMM over the concatenated weights. MLP heads are one GEMM for all first
layers (+ bias and activation), then the second layers as one grouped block-diagonal GEMM
(see ``mtlfast.ops.grouped_linear``). Eager CPU calls run the C++ op ``mtlfast::mlp_heads``
(``mtlfast.ops.mlp_heads``): the same math as ONE autograd node, since at the sizes of task
heads a step is bound by per-node costs; once a head's hidden layer is large (batch x hidden
past ``_HEADS_LOOP_MK``), and for per-task inputs of up to 8 heads, each head instead runs both
layers on its own (the op's per-head form, or as ATen ops on views of the fused parameters: the
loop of heads, measured faster there). On a CPU with no native bf16/fp16 GEMM (where torch runs
one 30-60x slower than fp32's) eager low-precision heads run their GEMMs in fp32. Other
eager calls (no extension, the GPU, more per-task heads) run plain ATen ops under torch's own
autograd (``grouped_linear_parts``: one ``bmm`` over equal-width groups, ragged ones
zero-padded while that is cheap; on the CPU one GEMM per group where that is measured
faster). torch.compile
and torch.func calls, and ragged groups on the GPU, run the ``mtlfast::grouped_linear`` custom
op (Triton on the GPU).

Parameters (fused storage) and the unfused ``nn.ModuleDict`` keys they map to, task ``t`` with
output rows ``o_t`` (``out_t`` wide), hidden rows ``h_t`` and packed block ``p_t``:

=================  ===========================================================================
fused parameter    unfused key (``state_dict`` uses these; ``named_parameters`` the fused ones)
=================  ===========================================================================
``weight[o_t]``    ``{t}.weight``           (Linear heads, ``(out_t, D)``)
``bias[o_t]``      ``{t}.bias``
``weight1[h_t]``   ``{t}.0.weight``         (MLP heads, ``(hidden_t, D)``)
``bias1[h_t]``     ``{t}.0.bias``
``weight2[p_t]``   ``{t}.{i}.weight``       (``(out_t, hidden_t)``, ``i`` = 2, or 3 with Dropout)
``bias2[o_t]``     ``{t}.{i}.bias``
=================  ===========================================================================

so a checkpoint of the equivalent plain ``ModuleDict`` (``unfuse()`` builds it) loads into the
fused model and the fused model's checkpoint loads into the plain one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._interop import Interop
from ..ops.grouped_linear import (
    _blocks,
    _eager,
    _large_groups,
    _parts,
    activation_grad,
    apply_activation,
    cast,
    grouped_linear,
    grouped_linear_input_grad,
)
from ..ops.linear_heads import linear_heads, linear_heads_serves
from ..ops.mlp_heads import mlp_heads, mlp_heads_layer2, upcast_gemms
from .spec import normalize_activation, resolve_tasks

__all__ = ["FusedHeads"]

_ACT_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
_PER_HEAD = "per head"
#: Routes kept per FusedHeads (one per batch size, dtype, device and mode); past it they are
#: chosen anew.
_ROUTES_KEPT = 64


class FusedHeads(Interop, nn.Module):
    """T task heads on shared features ``z``, computed as one fused op (forward and backward).

    ``heads(z)`` returns ``{task: y_t}`` with ``y_t = W2_t act(W1_t z + b1_t) + b2_t`` (MLP
    heads) or ``y_t = W_t z + b_t`` (Linear heads); the ``y_t`` are views of one buffer
    (``(..., sum out_t)``, or ``(T, ..., max out_t)`` for MLP heads on the bmm path), except
    where MLP heads' second layers, or whole heads (large groups), run one GEMM per group
    (ragged heads on the CPU).

    Args:
        in_features: D, the width of ``z``.
        tasks: ``{name: out_width or HeadSpec}`` (or a sequence of ``(name, ...)`` pairs).
        hidden: None for Linear heads; an int (all tasks) or one int per task for MLP heads.
        activation: ``"relu" | "gelu" | "silu" | None``, applied to the hidden layer of MLP
            heads (fused into the GEMM epilogue); Linear heads output raw values.
        dropout: dropout probability on the hidden layer of MLP heads (independent per task,
            as in separate heads). Linear heads take no dropout (apply it to ``z``).
        bias, device, dtype: as in ``nn.Linear``.

    NaN/Inf policy: none is checked or masked; they propagate exactly as through the unfused
    heads (a NaN in row ``i`` of ``z`` gives NaN in row ``i`` of every task's output only).
    """

    def __init__(self, in_features: int, tasks, hidden=None, activation: str | None = "relu",
                 dropout: float = 0.0, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        names, widths, hiddens = resolve_tasks(tasks, hidden)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if hiddens is None and dropout > 0:
            raise ValueError("dropout applies to the hidden layer of MLP heads; Linear heads "
                             "have none (apply dropout to z before the heads)")
        self.in_features = in_features
        self.tasks: tuple[str, ...] = names
        self.out_widths: tuple[int, ...] = widths
        self.hidden_widths: tuple[int, ...] | None = hiddens
        self.activation = normalize_activation(activation)
        self.dropout = float(dropout)
        # Index of the second Linear inside each unfused nn.Sequential (its state_dict keys).
        self._second_index = 1 + (self.activation != "none") + (self.dropout > 0)
        self._from_list = False  # unfuse() returns a ModuleList when fuse_heads got one
        self._routes: dict[tuple, str | None] = {}  # see _route
        factory = {"device": device, "dtype": dtype}
        N, D = sum(widths), in_features
        if hiddens is None:
            self.weight = nn.Parameter(torch.empty(N, D, **factory))
            self.bias = nn.Parameter(torch.empty(N, **factory)) if bias else None
        else:
            H = sum(hiddens)
            self.weight1 = nn.Parameter(torch.empty(H, D, **factory))
            self.bias1 = nn.Parameter(torch.empty(H, **factory)) if bias else None
            self.weight2 = nn.Parameter(
                torch.empty(sum(n * h for n, h in zip(widths, hiddens, strict=True)), **factory))
            self.bias2 = nn.Parameter(torch.empty(N, **factory)) if bias else None
        self.reset_parameters()
        self._register_interop()

    # ------------------------------------------------------------------ layout helpers
    @property
    def is_mlp(self) -> bool:
        return self.hidden_widths is not None

    def _param_blocks(self) -> dict[str, list[tuple[str, torch.Tensor]]]:
        """fused parameter name -> [(unfused key suffix, view of this task's block)]."""
        names, outs = self.tasks, self.out_widths
        if not self.is_mlp:
            plan = {"weight": list(zip(names, self.weight.split(list(outs)), strict=True))}
            if self.bias is not None:
                plan["bias"] = list(zip(names, self.bias.split(list(outs)), strict=True))
            return {p: [(f"{t}.{p}", v) for t, v in rows] for p, rows in plan.items()}
        hid, i2 = self.hidden_widths, self._second_index
        sizes = [n * h for n, h in zip(outs, hid, strict=True)]
        w2 = [b.view(n, h) for b, n, h in
              zip(self.weight2.split(sizes), outs, hid, strict=True)]
        w1 = self.weight1.split(hid)
        plan = {"weight1": [(f"{t}.0.weight", v) for t, v in zip(names, w1, strict=True)],
                "weight2": [(f"{t}.{i2}.weight", v) for t, v in zip(names, w2, strict=True)]}
        if self.bias1 is not None:
            b1, b2 = self.bias1.split(hid), self.bias2.split(list(outs))
            plan["bias1"] = [(f"{t}.0.bias", v) for t, v in zip(names, b1, strict=True)]
            plan["bias2"] = [(f"{t}.{i2}.bias", v) for t, v in zip(names, b2, strict=True)]
        return plan

    def _unfused_keys(self, keys: list[str]) -> list[str]:
        """The ModuleDict's order: task by task, layer by layer, weight before bias."""
        def order(key: str) -> tuple[int, int, bool]:
            parts = key.split(".")
            layer = int(parts[1]) if len(parts) == 3 else 0
            return self.tasks.index(parts[0]), layer, parts[-1] == "bias"

        return sorted(keys, key=order)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each head initialised as its ``nn.Linear`` would be: uniform(+-1/sqrt(fan_in))."""
        for fused, blocks in self._param_blocks().items():
            for t, (_, block) in enumerate(blocks):
                fan_in = self.hidden_widths[t] if fused in ("weight2", "bias2") \
                    else self.in_features
                block.uniform_(-1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    # ------------------------------------------------------------------ forward
    def _prepare(self, z, per_task):
        """Validate ``z``; return (x as (M, D) or (T, M, D), batch shape, per_task, dtype)."""
        ref = self.weight if self.hidden_widths is None else self.weight1
        # The usual call first, in as few steps as the checks below take for it (a plain (M, D)
        # tensor, or (T, M, D) with per_task=True, of the parameters' dtype and device, no
        # autocast): on tiny heads they are a measurable part of the step.
        if type(z) is torch.Tensor and z.dim() == (3 if per_task else 2) \
                and z.dtype == ref.dtype and z.shape[-1] == self.in_features \
                and (not per_task or z.shape[0] == len(self.tasks)) \
                and z.device == ref.device and not torch._C._is_any_autocast_enabled():
            return z, z.shape[-2:-1], bool(per_task), ref.dtype
        if isinstance(z, dict):
            if set(z) != set(self.tasks):
                raise ValueError(f"per-task input dict must have keys {list(self.tasks)}, got "
                                 f"{list(z)}")
            z = torch.stack([z[t] for t in self.tasks])
            per_task = True
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor or a dict of them, got {type(z).__name__}")
        device = z.device
        if device != ref.device:
            raise ValueError(f"z is on {device} but the heads' parameters are on {ref.device}")
        if not z.is_floating_point():
            raise TypeError(f"z must be floating point, got {z.dtype}")
        dev = device.type
        # (the global test first: it is one C call, the per-device ones cost microseconds on
        # every step of tiny heads)
        if torch._C._is_any_autocast_enabled() and torch.amp.is_autocast_available(dev) \
                and torch.is_autocast_enabled(dev):
            dtype = torch.get_autocast_dtype(dev)
        elif z.dtype != ref.dtype:
            raise TypeError(f"z has dtype {z.dtype} but the heads' parameters are {ref.dtype} "
                            "(cast one of them, or run under torch.autocast)")
        else:
            dtype = ref.dtype
        if z.dim() == 0 or z.shape[-1] != self.in_features:
            raise ValueError(f"z must have last dimension in_features={self.in_features}, got "
                             f"shape {tuple(z.shape)}")
        if per_task:
            if z.dim() < 3 or z.shape[0] != len(self.tasks):
                raise ValueError(f"per-task z must be (T={len(self.tasks)}, ..., "
                                 f"{self.in_features}), got {tuple(z.shape)}")
            batch = z.shape[1:-1]
            x = z.reshape(len(self.tasks), -1, self.in_features)
        else:
            batch = z.shape[:-1]
            x = z if z.dim() == 2 else z.reshape(-1, self.in_features)
        return (x if x.dtype == dtype else x.to(dtype)), batch, bool(per_task), dtype

    def _first_layer_widths(self, per_task: bool):
        T, D = len(self.tasks), self.in_features
        outs = self.hidden_widths if self.is_mlp else self.out_widths
        if per_task:
            return [D] * T, list(outs)
        return [D], [sum(outs)]

    def _hidden(self, x, w1, b1, per_task, eager):
        """Layer 1 of MLP heads: act(x W1^T + b1), (M, H), before dropout."""
        if not per_task and eager:
            # One dense GEMM (addmm: cuBLAS / MKL, what the op dispatches to as well) and the
            # activation, under torch's own autograd: no Python in the backward.
            return self._act(F.linear(x, w1, b1))
        ins, outs = self._first_layer_widths(per_task)
        return grouped_linear(x, w1.view(-1), b1, ins, outs, per_task=per_task,
                              activation=self.activation)

    def _act(self, pre):
        # in place on a fresh GEMM output: addmm's backward does not read its output
        return torch.relu_(pre) if self.activation == "relu" \
            else apply_activation(pre, self.activation)

    def _route(self, x: torch.Tensor, per_task: bool) -> str | None:
        """How an eager call runs the heads. MLP heads: the C++ op's form
        (``mtlfast.ops.mlp_heads``; its ``"heads"`` for large groups and per-task inputs),
        ``_PER_HEAD`` (each head on its own as ATen ops: large groups where the op does not
        serve), or None (the first layer in one op and
        ``grouped_linear_parts``). Linear heads: ``"heads"`` (``mtlfast.ops.linear_heads``,
        per-task inputs) or None (one ``F.linear``, or ``grouped_linear`` per task). Chosen
        once per (rows, dtype, device, train/eval, per-task): on heads this small the choice
        itself cost ~10% of a step. It reads shapes and what the process has (extension,
        interpreter switch) only."""
        key = (x.shape[-2], x.dtype, x.device, self.training, per_task)
        route = self._routes.get(key, "")
        if route == "":
            if len(self._routes) >= _ROUTES_KEPT:
                self._routes.clear()
            if not self.is_mlp:  # linear heads: the op for per-task inputs only
                route = "heads" if per_task and linear_heads_serves(x, self.out_widths) \
                    else None
            else:
                route = mlp_heads_layer2(x, self.hidden_widths, self.out_widths, per_task)
                if route is None and not per_task and _large_groups(x, self.hidden_widths):
                    route = _PER_HEAD
            self._routes[key] = route
        return route

    def _per_head(self, x, w1, b1, w2, b2) -> list[torch.Tensor]:
        """Each MLP head on its own, both layers on views of the fused parameters: at large
        groups the fused hidden layer only moves memory (the split of its (M, H) output is a
        cat of H columns in the backward, and each group's GEMMs copy their strided column
        slice), while the per-group op overhead it saves is negligible there."""
        hid, outs = self.hidden_widths, self.out_widths
        b1s = b1.split_with_sizes(hid) if b1 is not None else [None] * len(hid)
        b2s = b2.split_with_sizes(outs) if b2 is not None else [None] * len(outs)
        parts = []
        for w1t, b1t, w2t, b2t in zip(w1.split_with_sizes(hid), b1s, _blocks(w2, hid, outs),
                                      b2s, strict=True):
            h = self._act(F.linear(x, w1t, b1t))
            if self.dropout > 0:
                h = F.dropout(h, self.dropout, self.training)
            parts.append(F.linear(h, w2t, b2t))
        return parts

    def forward(self, z, per_task: bool | None = None) -> dict[str, torch.Tensor]:
        """``z``: ``(..., D)`` shared features; or per-task features, a ``(T, ..., D)`` tensor
        with ``per_task=True`` or a dict ``{task: (..., D)}``. Returns ``{task: (..., out_t)}``.
        """
        x, batch, per_task, dtype = self._prepare(z, per_task)
        if self.hidden_widths is not None:
            w1, b1, w2, b2 = self.weight1, self.bias1, self.weight2, self.bias2
            if w1.dtype != dtype:  # autocast
                w1, b1, w2, b2 = (cast(p, dtype) for p in (w1, b1, w2, b2))
            # eager (no compile, torch.func or fake tensors): plain ATen ops, torch's autograd
            eager = _eager(x, w1, b1, w2, b2)
            route = self._route(x, per_task) if eager else None
            if route == _PER_HEAD:
                parts = self._per_head(x, w1, b1, w2, b2)
            elif route is not None:
                parts = mlp_heads(x, w1, b1, w2, b2, self.hidden_widths, self.out_widths,
                                  self.activation, route,
                                  self.dropout if self.training else 0.0)
            else:
                h = self._hidden(x, w1, b1, per_task, eager)
                if self.dropout > 0:
                    h = F.dropout(h, self.dropout, self.training)
                parts = _parts(h, w2, b2, self.hidden_widths, self.out_widths, eager)
            return self._outputs(parts, batch)
        if not per_task:
            # One dense GEMM with no epilogue to fuse: the native op (addmm / cuBLAS) is the
            # fastest and adds no custom-op dispatch overhead; in fp32 where the CPU has no
            # native GEMM for a low-precision dtype (as the heads ops run theirs).
            w, b = cast(self.weight, dtype), cast(self.bias, dtype)
            if upcast_gemms(x) and _eager(x, w, b):
                y = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
            else:
                y = F.linear(x, w, b)
        else:
            w, b = cast(self.weight, dtype), cast(self.bias, dtype)
            if _eager(x, w, b) and self._route(x, True) == "heads":
                return self._outputs(linear_heads(x, w, b, self.out_widths), batch)
            ins, outs = self._first_layer_widths(per_task)
            y = grouped_linear(x, w.view(-1), b, ins, outs, per_task=per_task)
        if len(batch) != 1:
            y = y.view(*batch, y.shape[-1])
        # the ATen method: Tensor.split's Python wrapper costs as much again (tiny heads)
        return dict(zip(self.tasks, y.split_with_sizes(self.out_widths, -1), strict=True))

    def _outputs(self, parts: list[torch.Tensor], batch) -> dict[str, torch.Tensor]:
        """``{task: y_t}``, each ``(M, out_t)`` part viewed in the input's batch shape."""
        if len(batch) != 1:
            parts = [p.view(*batch, p.shape[-1]) for p in parts]
        return dict(zip(self.tasks, parts, strict=True))

    # ------------------------------------------------------------------ per-task Jacobian
    @torch.no_grad()
    def task_feature_grads(self, grad_outputs, z, per_task: bool | None = None) -> torch.Tensor:
        """Per-task feature gradients ``J[t] = dL_t/dz`` as one ``(T, ..., D)`` tensor.

        ``grad_outputs``: ``{task: dL_t/dy_t}`` (each ``(..., out_t)``) or the concatenated
        ``(..., sum out_t)`` tensor; ``z``: the features the heads were called on (as in
        ``forward``). For Linear heads ``J[t] = g_t W_t`` (one grouped GEMM); for MLP heads
        ``J[t] = ((g_t W2_t) * act'(W1_t z + b1_t)) W1_t`` (layer 1 recomputed, two grouped
        GEMMs). No loop over heads. With per-task inputs ``J[t] = dL_t/dz_t``.
        Dropout masks are not kept, so MLP heads with dropout need ``eval()`` mode here.
        """
        x, batch, per_task, dtype = self._prepare(z, per_task)
        if isinstance(grad_outputs, dict):
            if set(grad_outputs) != set(self.tasks):
                raise ValueError(f"grad_outputs must have keys {list(self.tasks)}, got "
                                 f"{list(grad_outputs)}")
            g = torch.cat([grad_outputs[t] for t in self.tasks], dim=-1)
        else:
            g = grad_outputs
        if not isinstance(g, torch.Tensor) or g.shape[-1] != sum(self.out_widths) \
                or g.shape[:-1] != batch:
            raise ValueError(f"grad_outputs must be (*{tuple(batch)}, out_t) per task, got "
                             f"{getattr(g, 'shape', type(g).__name__)}")
        g = g.reshape(-1, g.shape[-1]).to(dtype)
        T, D = len(self.tasks), self.in_features
        if self.is_mlp:
            if self.training and self.dropout > 0:
                raise ValueError("task_feature_grads: dropout masks are not kept; call it in "
                                 "eval() mode or use dropout=0")
            ins, outs = self._first_layer_widths(per_task)
            h_pre = grouped_linear(x, self.weight1.to(dtype).view(-1),
                                   cast(self.bias1, dtype), ins, outs, per_task=per_task)
            gh = grouped_linear_input_grad(g, self.weight2.to(dtype), self.hidden_widths,
                                           self.out_widths)
            # relu' reads the output's sign, which equals the pre-activation's.
            gpre = activation_grad(gh, h_pre, h_pre, self.activation)
            J = grouped_linear_input_grad(gpre, self.weight1.to(dtype).view(-1), [D] * T,
                                          self.hidden_widths, per_task=True)
        else:
            J = grouped_linear_input_grad(g, self.weight.to(dtype).view(-1), [D] * T,
                                          self.out_widths, per_task=True)
        return J.view(T, *batch, D)

    # ------------------------------------------------------------------ unfused form
    def unfuse(self) -> nn.ModuleDict:
        """The equivalent ``nn.ModuleDict`` of ``nn.Linear`` / ``nn.Sequential`` heads (copies)."""
        from .fuse import unfuse

        return unfuse(self)

    def extra_repr(self) -> str:
        kind = f"hidden={list(self.hidden_widths)}, activation={self.activation}, " \
            f"dropout={self.dropout}, " if self.is_mlp else ""
        tasks = dict(zip(self.tasks, self.out_widths, strict=True))
        return f"in_features={self.in_features}, tasks={tasks}, {kind}" \
            f"bias={(self.bias if not self.is_mlp else self.bias1) is not None}"
