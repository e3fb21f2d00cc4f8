"""An expert bank's MLPs, forward and backward, one op each (the C++ CPU kernel).

E experts of one shape: ``h_l[e] = act(h_{l-1}[e] W_l[e]^T + b_l[e])``, ``h_{-1}[e]`` the
input: one shared ``x (M, K)``, or ``x[e // per_group]`` of a ``(G, M, K)`` input (PLE's inner
levels); ``act`` ReLU or the identity. Returns the last layer's ``(E, M, D)``.

Weights come in parts (``ExpertBank`` stores its shared experts apart): ``weights[l * P + p]``
is part p's flat concatenation of its experts' ``(out, in)`` row-major blocks of layer l,
``part_sizes[p]`` experts; ``biases`` alike. The op reads the parts in place (no concatenation
per step) and writes each part's gradient in its own buffer.

Dispatch (``_dispatch.backend("expert_mlp", x, ...)``): the C++ kernel
(``csrc/cpu/experts.cpp``: the experts one after the other, each layer one MKL GEMM, the
activation and its backward on one expert's cache-resident slice) for plain eager CPU calls
with ReLU or no activation and experts large enough (``_dispatch.EXPERT_KERNEL_MIN_MACS``);
otherwise ``ExpertBank``'s torch path (bmm). The backward runs torch's formula
(``expert_mlp_backward_torch``, bmm over experts) when autograd hands it a batched gradient
(``autograd.grad(..., is_grads_batched=True)``: a legacy vmap tensor the kernel cannot read).
First-order gradients only: a double backward raises.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._C._functorch import is_legacy_batchedtensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .._ext import extension

__all__ = ["expert_mlp", "expert_mlp_backward_torch", "expert_mlp_reference"]


def _expert_params(weights, biases, part_sizes, in_features: int):
    """Per layer, per expert: ``(W (out, in), b (out,))`` views of the parts, in bank order."""
    P = len(part_sizes)
    layers, fan_in = [], in_features
    for layer in range(len(weights) // P):
        out = biases[layer * P].numel() // part_sizes[0]
        ws, bs = [], []
        for p, n in enumerate(part_sizes):
            ws += list(weights[layer * P + p].view(n, out, fan_in).unbind(0))
            bs += list(biases[layer * P + p].view(n, out).unbind(0))
        layers.append((ws, bs))
        fan_in = out
    return layers


def expert_mlp_reference(x: torch.Tensor, weights: Sequence[torch.Tensor],
                         biases: Sequence[torch.Tensor], part_sizes: Sequence[int],
                         per_group: int, relu: bool) -> torch.Tensor:
    """The spec: one ``F.linear`` (+ ReLU) per expert and layer, differentiable by autograd."""
    outs = []
    for e in range(sum(part_sizes)):
        h = x if per_group == 0 else x[e // per_group]
        for ws, bs in _expert_params(weights, biases, part_sizes, x.shape[-1]):
            h = F.linear(h, ws[e], bs[e])
            h = torch.relu(h) if relu else h
        outs.append(h)
    return torch.stack(outs)


def expert_mlp_backward_torch(dy, x, weights, biases, outs, part_sizes, per_group: int,
                              relu: bool, need_x: bool):
    """The gradients as bmm over the experts (any batched ``dy``): ``(dx, dweights,
    dbiases)``, the weight and bias gradients shaped as ``weights`` / ``biases``."""
    P, E = len(part_sizes), sum(part_sizes)
    depth = len(weights) // P
    if per_group == 0:
        x_e = x.expand(E, *x.shape)
    else:
        x_e = x.unsqueeze(1).expand(x.shape[0], per_group, *x.shape[1:]).reshape(E, *x.shape[1:])
    dws: list = [None] * len(weights)
    dbs: list = [None] * len(biases)
    dx = None
    g = dy
    for layer in reversed(range(depth)):
        if relu:
            g = g * (outs[layer] > 0)
        inp = outs[layer - 1] if layer else x_e
        dw = torch.bmm(g.transpose(1, 2), inp)  # (E, out, in)
        db = g.sum(1)
        for p, (w_part, b_part) in enumerate(zip(dw.split(list(part_sizes)),
                                                  db.split(list(part_sizes)), strict=True)):
            dws[layer * P + p] = w_part.reshape(-1)
            dbs[layer * P + p] = b_part.reshape(-1)
        if layer or need_x:
            w = torch.cat([weights[layer * P + p] for p in range(P)]).view(
                E, g.shape[-1], inp.shape[-1])
            g = torch.bmm(g, w)
        if not layer and need_x:
            dx = g.sum(0) if per_group == 0 else g.reshape(-1, per_group, *g.shape[1:]).sum(1)
    return dx, dws, dbs


class _ExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, part_sizes, per_group, relu, num_weights, *params):
        weights, biases = params[:num_weights], params[num_weights:]
        outs = torch.ops.mtlfast.expert_mlp(x, weights, biases, part_sizes, per_group, relu)
        ctx.meta = (part_sizes, per_group, relu, num_weights)
        ctx.save_for_backward(x, *params, *outs)
        return outs[-1]

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        part_sizes, per_group, relu, num_weights = ctx.meta
        saved = ctx.saved_tensors
        x = saved[0]
        weights = saved[1:1 + num_weights]
        biases = saved[1 + num_weights:1 + 2 * num_weights]
        outs = saved[1 + 2 * num_weights:]
        need_x = ctx.needs_input_grad[0]
        if is_legacy_batchedtensor(dy):
            dx, dws, dbs = expert_mlp_backward_torch(dy, x, weights, biases, outs, part_sizes,
                                                     per_group, relu, need_x)
        else:
            res = torch.ops.mtlfast.expert_mlp_backward(dy, x, weights, biases, outs,
                                                        part_sizes, per_group, relu, need_x)
            dx, dws, dbs = res[0], res[1:1 + num_weights], res[1 + num_weights:]
        return (dx if need_x else None), None, None, None, None, *dws, *dbs


def expert_mlp(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
               part_sizes: Sequence[int], per_group: int, relu: bool) -> torch.Tensor:
    """The C++ kernel under autograd (callers check ``backend("expert_mlp", ...)`` first)."""
    if extension is None:  # pragma: no cover - the dispatch rule asks for the extension
        raise RuntimeError("expert_mlp: the compiled extension is not loaded")
    return _ExpertMLP.apply(x, list(part_sizes), int(per_group), bool(relu), len(weights),
                            *weights, *biases)
