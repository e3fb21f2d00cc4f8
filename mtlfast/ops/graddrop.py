"""``graddrop(G, u, leak)``: GradDrop's combination (Chen et al. 2020, "Just Pick a Sign").

Per column p of G ``(T, P)``, with the caller's uniform draw ``u_p`` and per-task leaks
``l_t``: ``purity_p = (1 + sum_t G[t,p] / sum_t |G[t,p]|) / 2`` (1/2 for an all-zero column),
``M_tp = [purity_p > u_p][G[t,p] > 0] + [purity_p < u_p][G[t,p] < 0]`` and
``out[p] = sum_t (l_t + (1 - l_t) M_tp) G[t,p]``, in float32 (float64 for float64 G), returned
in G's dtype. The caller owns the random stream (``methods.GradDrop`` draws ``u`` from its
generator), so every backend combines the same draws.

NaN/Inf policy: a column with a NaN or Inf entry (or whose sums overflow) gives NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _validate
from ._dispatch import backend

__all__ = ["PurityFn", "graddrop", "graddrop_reference"]

PurityFn = Callable[[torch.Tensor], torch.Tensor]


def _acc_dtype(G: torch.Tensor) -> torch.dtype:
    return torch.float64 if G.dtype == torch.float64 else torch.float32


def _check(G: torch.Tensor, u: torch.Tensor, leak: torch.Tensor | None) -> None:
    _validate.tensor("graddrop", "G", G, floating=True, dim=2)
    if G.shape[0] == 0:
        raise ValueError(f"graddrop: G must be (T, P) with T > 0 tasks, got {tuple(G.shape)}")
    _validate.tensor("graddrop", "u", u, floating=True, dim=1)
    if u.shape[0] != G.shape[1]:
        raise ValueError(f"graddrop: u must hold one draw per column, shape ({G.shape[1]},), "
                         f"got {tuple(u.shape)}")
    if leak is not None:
        _validate.tensor("graddrop", "leak", leak, floating=True, dim=1)
        if leak.shape[0] != G.shape[0]:
            raise ValueError(f"graddrop: leak must hold one value per task, shape "
                             f"({G.shape[0]},), got {tuple(leak.shape)}")
    _validate.same_device("graddrop", G=G, u=u, leak=leak)


def graddrop_reference(G: torch.Tensor, u: torch.Tensor, leak: torch.Tensor | None = None,
                       purity_fn: PurityFn | None = None) -> torch.Tensor:
    """The spec (module docstring), with ``purity_fn`` (``f`` of the paper, monotonically
    increasing) applied to the purity before the comparison when given."""
    _check(G, u, leak)
    acc = _acc_dtype(G)
    leak = torch.zeros(G.shape[0], dtype=acc, device=G.device) if leak is None else leak.to(acc)
    W = torch.stack([torch.ones_like(leak), 1 - leak, leak])
    u = u.to(acc)
    out = torch.empty(G.shape[1], dtype=G.dtype, device=G.device)
    # On the CPU, column blocks of about 1 MiB keep the temporaries in cache (allocating and
    # first-touching T x P temporaries costs more than the arithmetic); one block elsewhere.
    block = max(4096, 2**18 // G.shape[0]) if G.device.type == "cpu" else max(G.shape[1], 1)
    for start in range(0, G.shape[1], block):
        cols = slice(start, start + block)
        out[cols] = _graddrop_block(G[:, cols].to(acc), u[cols], W, purity_fn)
    return out


def _graddrop_block(G: torch.Tensor, u: torch.Tensor, W: torch.Tensor,
                    purity_fn: PurityFn | None) -> torch.Tensor:
    # Two passes instead of one per quantity: rows (1, 1 - l, l) against G and (1, 1 - l)
    # against relu(G); sum |g| = 2 sum relu(g) - sum g, and negatives = all - positives.
    sums = W @ G
    positives = W[:2] @ G.clamp_min(0)
    abs_sum = 2 * positives[0] - sums[0]
    purity = torch.where(abs_sum > 0, 0.5 * (1 + sums[0] / abs_sum), 0.5)
    if purity_fn is not None:
        purity = purity_fn(purity)
    kept_positive, kept_negative = positives[1], sums[1] - positives[1]
    out = sums[2] + torch.where(purity > u, kept_positive, 0) \
        + torch.where(purity < u, kept_negative, 0)
    return torch.where(torch.isfinite(abs_sum), out, torch.nan)


def graddrop(G: torch.Tensor, u: torch.Tensor, leak: torch.Tensor | None = None) -> torch.Tensor:
    """GradDrop's combined gradient (length P, G's dtype) of per-task gradients G ``(T, P)``
    for uniform draws ``u`` ``(P,)`` and leaks ``leak`` ``(T,)`` (None: no leak).

    Dispatch (``_dispatch.backend("graddrop", G)``): the fused CUDA kernel (one pass over G)
    for float32/float16/bfloat16 CUDA tensors with float32 ``u``; elsewhere the reference
    (cache-blocked on the CPU).
    """
    _check(G, u, leak)
    if G.shape[1] > 0 and backend("graddrop", G) == "cuda" and u.dtype == torch.float32:
        leak_f = None if leak is None else leak.detach().to(torch.float32).contiguous()
        return torch.ops.mtlfast.graddrop(G.detach(), u.detach().contiguous(), leak_f)
    return graddrop_reference(G.detach(), u.detach(), None if leak is None else leak.detach())
