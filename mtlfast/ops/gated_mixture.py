"""Softmax gates and the mixture they weigh, one op: ``z[g, b] = sum_{j in gate g} p[b, j]
h[experts[j], b]`` with ``p[b, gate g] = softmax(logits[b, gate g])``.

``logits`` (B, N) holds the gates' columns one gate after the other (gate g owns
``sizes[g]`` of them, N = sum of sizes); ``experts`` (N,) int64 the expert each column
weighs (distinct within a gate); ``h`` (E, B, D) the experts' outputs. Returns ``z``
(G, B, D). A gate over a subset of the experts (CGC, PLE: the shared experts and the task's
own) names only those.

Dispatch (``_dispatch.backend("gated_mixture", logits, eager=...)``): for plain eager fp32/fp64
CPU calls of >= 256 rows the C++ kernel (``csrc/cpu/mixture.cpp``): one pass over the rows,
each row's softmax and the mixture of the experts its gates name from cache, the probabilities
saved for the backward; measured 1.6-3.1x faster forward + backward than the unfused path
(``benchmarks/RESULTS.md``). Otherwise the unfused path: the logits scattered among ``-inf``
into a (B, G, E) tensor, one softmax over E (``gate_weights``), and ``mtlfast.ops.mixture``
(Triton on CUDA). The kernel path's backward takes torch's formula when autograd hands it a
batched gradient (``autograd.grad(..., is_grads_batched=True)``). First-order gradients only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._C._functorch import is_legacy_batchedtensor
from torch.autograd.function import once_differentiable

from . import _validate
from ._dispatch import backend
from .grouped_linear import _eager
from .mixture import mixture

__all__ = ["gate_positions", "gate_weights", "gated_mixture", "gated_mixture_reference"]

_OP = "gated_mixture"


def gate_positions(experts: torch.Tensor, sizes: Sequence[int], num_experts: int
                   ) -> torch.Tensor | None:
    """Each column's flat position ``g * E + experts[j]`` in a (G, E) gate row; None when
    every gate weighs all E experts in order (no scatter needed)."""
    E = num_experts
    if all(n == E for n in sizes) and torch.equal(
            experts.cpu(), torch.arange(E).repeat(len(sizes))):
        return None
    gate = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes)))
    return (gate.to(experts.device) * E + experts).to(torch.long)


def gate_weights(logits: torch.Tensor, positions: torch.Tensor | None, num_gates: int,
                 num_experts: int, top_k: int | None = None) -> torch.Tensor:
    """``(G, B, E)`` gate weights (a transposed view of one (B, G, E) buffer): the logits
    scattered among ``-inf`` (exact zeros for the experts a gate does not weigh), each row's
    ``top_k`` largest kept when given, one softmax over E."""
    B, G, E = logits.shape[0], num_gates, num_experts
    z = logits
    if positions is not None:
        z = z.new_full((B, G * E), float("-inf")).index_copy(1, positions, z)
    z = z.view(B, G, E)
    if top_k is not None:
        z = top_k_mask(z, top_k)
    if z.dtype in (torch.float32, torch.float64):
        # softmax over E (a few experts) written out: forward + backward measured 2.3x
        # faster than torch.softmax's on the CPU at E = 8, B >= 256 (one thread); the max
        # is a constant shift (no gradient); half types keep torch's (fp32 inside)
        e = (z - z.detach().amax(-1, keepdim=True)).exp()
        return (e / e.sum(-1, keepdim=True)).transpose(0, 1)
    return torch.softmax(z, dim=-1).transpose(0, 1)


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``logits`` with every entry below its row's k-th largest set to ``-inf`` (a softmax then
    gives those experts exactly 0). The threshold is a constant (no gradient)."""
    if k >= logits.shape[-1]:
        return logits
    kth = logits.detach().topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits.detach() < kth, float("-inf"))


def gated_mixture_reference(logits: torch.Tensor, h: torch.Tensor, experts: torch.Tensor,
                            sizes: Sequence[int]) -> torch.Tensor:
    """The spec: per gate, a softmax over its columns and a loop over them."""
    _check(logits, h, experts, sizes)
    out, start = [], 0
    for n in sizes:
        p = torch.softmax(logits[:, start:start + n], dim=-1)
        z = p[:, 0, None] * h[int(experts[start])]
        for j in range(1, n):
            z = z + p[:, j, None] * h[int(experts[start + j])]
        out.append(z)
        start += n
    return torch.stack(out)


def _check(logits: object, h: object, experts: object, sizes: Sequence[int]) -> None:
    _validate.tensor(_OP, "logits", logits, floating=True, dim=2)
    _validate.tensor(_OP, "h", h, floating=True, dim=3)
    _validate.tensor(_OP, "experts", experts, dim=1)
    B, N = logits.shape  # type: ignore[union-attr]
    E = h.shape[0]  # type: ignore[union-attr]
    if h.shape[1] != B:  # type: ignore[union-attr]
        raise ValueError(f"{_OP}: h must be (E, B={B}, D) to match logits (B, N) = "
                         f"{tuple(logits.shape)}, got h {tuple(h.shape)}")  # type: ignore
    if experts.dtype != torch.long:  # type: ignore[union-attr]
        raise TypeError(f"{_OP}: experts must be int64, got {experts.dtype}")  # type: ignore
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"{_OP}: sizes must be ints >= 1, one per gate, got {list(sizes)}")
    if sum(sizes) != N or experts.numel() != N:  # type: ignore[union-attr]
        raise ValueError(f"{_OP}: logits and experts need sum(sizes) = {sum(sizes)} columns, got "
                         f"{N} and {experts.numel()}")  # type: ignore[union-attr]
    if logits.dtype != h.dtype:  # type: ignore[union-attr]
        raise TypeError(f"{_OP}: logits has dtype {logits.dtype} but h has {h.dtype}; "  # type: ignore
                        "cast one of them")
    _validate.same_device(_OP, logits=logits, h=h, experts=experts)  # type: ignore[arg-type]
    idx = experts.tolist()  # type: ignore[union-attr]
    if min(idx) < 0 or max(idx) >= E:
        raise ValueError(f"{_OP}: experts must index h's {E} experts, got values in "
                         f"[{min(idx)}, {max(idx)}]")
    start = 0
    for g, n in enumerate(sizes):
        if len(set(idx[start:start + n])) != n:
            raise ValueError(f"{_OP}: gate {g} names an expert twice (experts "
                             f"{idx[start:start + n]}); each gate weighs distinct experts")
        start += n


class _GatedMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, h, experts, sizes, positions, gate_major):
        z, p = torch.ops.mtlfast.gated_mixture_cpu(logits, h, experts, sizes, gate_major)
        ctx.meta = (sizes, positions)
        ctx.save_for_backward(p, h, experts)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, dz):
        sizes, positions = ctx.meta
        p, h, experts = ctx.saved_tensors
        need_l, need_h = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if is_legacy_batchedtensor(dz):
            dl, dh = _backward_torch(dz, p, h, positions, len(sizes), need_l, need_h)
        else:
            dl, dh = torch.ops.mtlfast.gated_mixture_backward_cpu(dz, p, h, experts, sizes,
                                                                   need_l, need_h)
        return (dl if need_l else None), (dh if need_h else None), None, None, None, None


def _backward_torch(dz, p, h, positions, G: int, need_l: bool, need_h: bool):
    """torch's formula from the saved probabilities (also for a batched ``dz``):
    ``dp[b, j] = <dz[g(j), b], h[e(j), b]>``, ``dlogits = p (dp - sum over j's gate of p dp)``,
    ``dh[e, b] = sum_j p[b, j] dz[g(j), b]`` over e's columns."""
    B, E = p.shape[0], h.shape[0]
    gate = positions // E if positions is not None else \
        torch.arange(G, device=p.device).repeat_interleave(E)
    dzb = dz.transpose(0, 1)  # (B, G, D)
    dl = dh = None
    if need_l:
        dw = torch.bmm(dzb, h.permute(1, 2, 0)).reshape(B, G * E)
        dp = dw.index_select(1, positions) if positions is not None else dw
        tot = p.new_zeros(B, G).index_add(1, gate, p * dp)
        dl = p * (dp - tot.index_select(1, gate))
    if need_h:
        w = p if positions is None else p.new_zeros(B, G * E).index_copy(1, positions, p)
        dh = torch.bmm(w.view(B, G, E).transpose(1, 2), dzb).transpose(0, 1)
    return dl, dh


def gated_mixture(logits: torch.Tensor, h: torch.Tensor, experts: torch.Tensor,
                  sizes: Sequence[int], positions: torch.Tensor | None = None,
                  gate_major: bool = True) -> torch.Tensor:
    """``(G, B, D)`` mixtures of softmax gates (module docstring). ``positions``: the
    ``gate_positions`` of ``experts`` and ``sizes`` when the caller keeps them (else computed).
    ``gate_major``: the C++ kernel's output layout, contiguous (default) or a transposed view
    of a row-major (B, G, D) buffer (False: a PLE inner level's, read by the next level's
    gates as one (B, G * D) matrix); the unfused path returns the mixture op's layout.
    ValueError / TypeError for shapes, dtypes, devices or expert indices that do not fit (the
    index checks read ``experts`` on the host: one sync for CUDA tensors; ``GateBank`` checks
    its gates once and calls the op without them)."""
    _check(logits, h, experts, sizes)
    return mix(logits, h, experts, [int(n) for n in sizes],
               gate_positions(experts, sizes, h.shape[0]) if positions is None else positions,
               bool(gate_major))


def mix(logits: torch.Tensor, h: torch.Tensor, experts: torch.Tensor, sizes: list[int],
        positions: torch.Tensor | None, gate_major: bool = True) -> torch.Tensor:
    """``gated_mixture`` without the checks, for callers that validated their gates once
    (``GateBank``; the checks read ``experts`` on the host)."""
    E = h.shape[0]
    if backend(_OP, logits, eager=_eager(logits, h)) == "cpu":
        return _GatedMixture.apply(logits, h, experts, sizes, positions, gate_major)
    return mixture(gate_weights(logits, positions, len(sizes), E), h)
