"""Suite ``ops``: mtlfast's kernels against the torch code they replace, on the same inputs.

- ``copy``: one device copy (``dst.copy_(src)``), the bandwidth every memory-bound floor is
  measured against (``params["bytes"]``: bytes read + written);
- ``gram``: ``ops.gram(G)`` vs ``G @ G.T``; ``combine``: ``ops.combine(w, G)`` vs ``w @ G``;
  ``gram+combine``: both, the memory-bound part of every Gram method's step;
  ``graddrop``: ``ops.graddrop`` vs its torch reference;
- the T x T solvers (``mtlfast.ops.solvers``): each kernel vs its torch reference path, on one
  Gram and on a batch (of 64 on CUDA);
- ``grouped_linear`` (the fused heads' layers, forward): a dense first layer with ReLU vs
  ``torch._addmm_activation`` and ``addmm`` + ``relu_``; ragged second layers vs one
  zero-padded ``bmm`` and a loop of ``addmm`` (the choices its torch dispatch makes);
- ``mixture`` / ``gated_mixture`` (the expert blocks' mixtures, forward + backward):
  ``ops.mixture`` vs torch's batched ``bmm``; softmax gates and their mixture as one
  ``ops.gated_mixture`` vs the unfused path (gate weights + ``ops.mixture``) and vs the torch
  formulation (scatter, ``torch.softmax``, ``bmm``), on MMoE's dense gates and PLE's inner
  level (a shared gate over all 9 experts, 8 task gates over 2);
- ``gate_logits`` (PLE's grouped gates, forward + backward): ``ops.gate_logits`` vs one dense
  GEMM against the block-diagonal weight and vs one ``addmm`` per gate.

Each case's ``params["bytes"]`` is the memory its operation must move at least (G read, the
output written), so a report can put a time next to its floor at the measured copy rate.
On CUDA the sizes are those of a large model (P up to 100M) and bfloat16 is added.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from .harness import Case, Config, Contender, human

__all__ = ["cases"]

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"copy": 10_000, "gram": ((2, 300), (4, 1_000)),
             "graddrop": ((3, 1_000),), "solver_T": (4,), "batch": 4},
    "quick": {"copy": 10_000_000, "gram": ((8, 100_000), (32, 100_000), (8, 1_000_000)),
              "graddrop": ((8, 100_000),),
              "solver_T": (8, 32), "batch": 8},
    "full": {"copy": 100_000_000, "gram": ((8, 100_000), (32, 100_000), (8, 1_000_000),
                                           (32, 1_000_000)),
             "graddrop": ((8, 1_000_000), (32, 1_000_000)),
             "solver_T": (8, 32), "batch": 64},
}
#: on CUDA (quick and full): sizes where memory traffic, not launches, decides
CUDA_SIZES: dict[str, Any] = {
    "copy": 1 << 29, "gram": ((8, 10**7), (8, 10**8), (32, 10**7), (32, 10**8)),
    "graddrop": ((8, 10**7), (8, 10**8), (32, 10**7)),
    "batch": 64,
}
_ESIZE = {torch.float32: 4, torch.bfloat16: 2}
#: grouped_linear cases: name -> (batch, in width per group, out widths); one group: layer 1
LINEAR: dict[str, dict[str, tuple[int, int, tuple[int, ...]]]] = {
    "tiny": {"layer 1 (dense, relu)": (8, 16, (32,)), "layer 2 ragged": (8, 8, (1, 2, 5))},
    "quick": {"layer 1 (dense, relu)": (256, 512, (2048,)),
              "layer 2 ragged 8 MLP": (256, 256, (1, 2, 5, 10, 20, 50, 100, 200)),
              "layer 2 100x 64-1": (1024, 64, (1,) * 100)},
}
LINEAR["full"] = LINEAR["quick"]
#: mixture cases: name -> (B, D, per-gate expert lists, E)
_PLE_GATES = [list(range(9))] + [[0, t + 1] for t in range(8)]
MIXTURES: dict[str, dict[str, tuple[int, int, list[list[int]], int]]] = {
    "tiny": {"MMoE 3 gates x 4 experts": (8, 6, [list(range(4))] * 3, 4),
             "PLE inner 3 gates": (8, 6, [[0, 1, 2], [0, 1], [0, 2]], 3)},
    "quick": {"MMoE 8x8 D=128": (2048, 128, [list(range(8))] * 8, 8),
              "MMoE 8x8 D=32": (2048, 32, [list(range(8))] * 8, 8),
              "PLE inner 9 gates D=32": (2048, 32, _PLE_GATES, 9),
              "PLE inner 9 gates D=128": (2048, 128, _PLE_GATES, 9),
              "MMoE 40x8 B=256 D=64": (256, 64, [list(range(8))] * 40, 8)},
}
MIXTURES["full"] = MIXTURES["quick"]
#: gate_logits cases: name -> (B, K, gate sizes, skipped inputs)
GATES: dict[str, dict[str, tuple[int, int, list[int], int]]] = {
    "tiny": {"PLE last level 3 gates": (8, 6, [2] * 3, 1)},
    "quick": {"PLE last level 8 gates K=32": (2048, 32, [2] * 8, 1),
              "PLE inner level 9 gates K=32": (2048, 32, [2] * 8 + [9], 0),
              "PLE last level 8 gates K=128": (2048, 128, [2] * 8, 1)},
}
GATES["full"] = GATES["quick"]


def _sizes(cfg: Config) -> dict[str, Any]:
    sizes = dict(SIZES[cfg.sizes])
    if cfg.device.type == "cuda" and cfg.sizes != "tiny":
        sizes.update(CUDA_SIZES)
    return sizes


def _randn(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32,
           seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def _copy(n: int, device: torch.device) -> list[Contender]:
    src = _randn((n,), device)
    dst = torch.empty_like(src)
    return [Contender("torch copy_", run=lambda: dst.copy_(src), reference=True)]


def _gram(T: int, P: int, dtype: torch.dtype, device: torch.device) -> list[Contender]:
    from .. import ops

    G = _randn((T, P), device, dtype)
    return [Contender("mtlfast", run=lambda: ops.gram(G), reference=True),
            Contender("G @ G.T", run=lambda: G @ G.T)]


def _combine(T: int, P: int, dtype: torch.dtype, device: torch.device) -> list[Contender]:
    from .. import ops

    G = _randn((T, P), device, dtype)
    w = torch.rand(T, device=device)
    out = torch.empty(P, device=device, dtype=dtype)
    return [Contender("mtlfast", run=lambda: ops.combine(w, G, out), reference=True),
            Contender("w @ G", run=lambda: torch.matmul(w.to(dtype), G))]


def _gram_combine(T: int, P: int, dtype: torch.dtype, device: torch.device
                  ) -> list[Contender]:
    from .. import ops

    G = _randn((T, P), device, dtype)
    out = torch.empty(P, device=device, dtype=dtype)

    def mtlfast_step() -> torch.Tensor:
        return ops.combine(ops.gram(G)[0], G, out)

    def torch_step() -> torch.Tensor:
        return torch.matmul((G @ G.T)[0].to(dtype), G)

    return [Contender("mtlfast", run=mtlfast_step, reference=True),
            Contender("G @ G.T, w @ G", run=torch_step)]


def _graddrop(T: int, P: int, dtype: torch.dtype, device: torch.device) -> list[Contender]:
    from .. import ops

    G = _randn((T, P), device, dtype)
    u = torch.rand(P, generator=torch.Generator().manual_seed(7)).to(device)
    leak = torch.zeros(T, device=device)
    return [Contender("mtlfast", run=lambda: ops.graddrop(G, u, leak), reference=True),
            Contender("torch reference", run=lambda: ops.graddrop_reference(G, u, leak))]


def _grouped_linear(batch: int, k: int, widths: tuple[int, ...], device: torch.device
                    ) -> list[Contender]:
    from .. import ops

    T = 1 if len(widths) == 1 else len(widths)
    x = _randn((batch, T * k if T > 1 else k), device)
    Ws = [_randn((n, k), device, seed=1 + t) for t, n in enumerate(widths)]
    bs = [_randn((n,), device, seed=100 + t) for t, n in enumerate(widths)]
    w, b = torch.cat([W.reshape(-1) for W in Ws]), torch.cat(bs)
    in_widths = [k] * len(widths)
    if len(widths) == 1:
        W = Ws[0]
        return [Contender("mtlfast", reference=True, run=lambda: ops.grouped_linear(
                    x, w, b, in_widths, list(widths), activation="relu")),
                Contender("torch._addmm_activation",
                          run=lambda: torch._addmm_activation(b, x, W.T)),
                Contender("addmm + relu_", run=lambda: torch.relu_(torch.addmm(b, x, W.T)))]
    xs = x.split(in_widths, dim=1)
    widest = max(widths)
    padded = torch.zeros(len(widths), k, widest, device=device)
    for t, W in enumerate(Ws):
        padded[t, :, : widths[t]] = W.T
    bias_padded = torch.zeros(len(widths), 1, widest, device=device)
    for t, bt in enumerate(bs):
        bias_padded[t, 0, : widths[t]] = bt

    def bmm() -> torch.Tensor:
        return torch.baddbmm(bias_padded, x.view(batch, len(widths), k).transpose(0, 1), padded)

    def bmm_sliced() -> torch.Tensor:
        out = bmm()
        return torch.cat([out[t, :, :n] for t, n in enumerate(widths)], dim=1)

    return [Contender("mtlfast", reference=True,
                      run=lambda: ops.grouped_linear(x, w, b, in_widths, list(widths))),
            Contender("padded bmm", run=bmm, check=bmm_sliced,
                      note="(T, B, widest) output, sliced per task for the check only"),
            Contender("addmm loop", run=lambda: torch.cat(
                [torch.addmm(bt, xt, W.T) for xt, W, bt in zip(xs, Ws, bs, strict=True)],
                dim=1))]


def _mixtures(B: int, D: int, select: list[list[int]], E: int, device: torch.device
              ) -> tuple[list[Contender], list[Contender]]:
    """(mixture contenders, gated_mixture contenders), forward + backward."""
    from ..ops.gated_mixture import gate_positions, gate_weights, gated_mixture
    from ..ops.mixture import mixture

    G = len(select)
    experts = torch.tensor([e for s in select for e in s], device=device)
    sizes = [len(s) for s in select]
    logits = _randn((B, sum(sizes)), device).requires_grad_()
    h = _randn((B, E, D), device, seed=1).transpose(0, 1).requires_grad_()
    dz = _randn((G, B, D), device, seed=2)
    positions = gate_positions(experts, sizes, E)
    g = gate_weights(logits.detach(), positions, G, E).requires_grad_()

    def fwd_bwd(fn: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...]
                ) -> Callable[[], tuple[torch.Tensor, ...]]:
        def run() -> tuple[torch.Tensor, ...]:
            z = fn()
            return (z.detach(), *torch.autograd.grad(z, inputs, dz))
        return run

    def bmm_mixture(w: torch.Tensor) -> torch.Tensor:
        return torch.bmm(w.transpose(0, 1), h.transpose(0, 1)).transpose(0, 1)

    def torch_gates() -> torch.Tensor:
        z = logits if positions is None else logits.new_full(
            (B, G * E), float("-inf")).index_copy(1, positions, logits)
        return torch.softmax(z.view(B, G, E), dim=-1).transpose(0, 1)

    plain = [Contender("mtlfast", reference=True, run=fwd_bwd(lambda: mixture(g, h), (g, h))),
             Contender("torch bmm", run=fwd_bwd(lambda: bmm_mixture(g), (g, h)))]
    gated = [Contender("mtlfast", reference=True, run=fwd_bwd(
                 lambda: gated_mixture(logits, h, experts, sizes, positions), (logits, h))),
             Contender("unfused (gate weights + ops.mixture)", run=fwd_bwd(
                 lambda: mixture(gate_weights(logits, positions, G, E), h), (logits, h))),
             Contender("torch (softmax + bmm)", run=fwd_bwd(
                 lambda: bmm_mixture(torch_gates()), (logits, h)))]
    return plain, gated


def _gate_logits(B: int, K: int, sizes: list[int], skip: int, device: torch.device
                 ) -> list[Contender]:
    """Grouped gates' logits over an inner level's mixture (a transposed view of a row-major
    (B, skip + G, K) buffer), forward + backward: ``ops.gate_logits`` vs one dense GEMM of the
    (B, (skip + G) K) view against the block-diagonal weight, and vs one ``addmm`` per gate."""
    from ..ops.gate_logits import gate_logits

    G, N = len(sizes), sum(sizes)
    xb = _randn((B, skip + G, K), device).requires_grad_()
    x = xb.transpose(0, 1)
    w = _randn((N * K,), device, seed=1).requires_grad_()
    b = _randn((N,), device, seed=2).requires_grad_()
    dl = _randn((B, N), device, seed=3)
    cols = torch.arange(N, device=device)
    gate = torch.repeat_interleave(torch.arange(G, device=device),
                                   torch.tensor(sizes, device=device))
    rows = (skip + gate)[:, None] * K + torch.arange(K, device=device)  # (N, K)
    diagonal = (rows * N + cols[:, None]).reshape(-1)  # w's entries in the (S+G)K x N weight
    offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]

    def fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], tuple[torch.Tensor, ...]]:
        def run() -> tuple[torch.Tensor, ...]:
            y = fn()
            return (y.detach(), *torch.autograd.grad(y, (xb, w, b), dl))
        return run

    def block_diagonal() -> torch.Tensor:
        wd = w.new_zeros((skip + G) * K * N).index_copy(0, diagonal, w)
        return torch.addmm(b, xb.reshape(B, -1), wd.view((skip + G) * K, N))

    def addmm_loop() -> torch.Tensor:
        return torch.cat([torch.addmm(b[o:e], x[skip + g], w[o * K:e * K].view(e - o, K).T)
                          for g, (o, e) in enumerate(zip(offsets[:-1], offsets[1:],
                                                          strict=True))], dim=1)

    return [Contender("mtlfast", reference=True,
                      run=fwd_bwd(lambda: gate_logits(x, w, b, sizes, skip))),
            Contender("block-diagonal GEMM", run=fwd_bwd(block_diagonal)),
            Contender("addmm per gate", run=fwd_bwd(addmm_loop))]


def _solver_pairs(K: torch.Tensor) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (mtlfast's solver, the torch reference it is checked against)."""
    from ..ops import solvers
    from ..ops import solvers_nonlinear as nl

    T = K.shape[-1]
    p = torch.full(K.shape[:-1], 1.0 / T, dtype=K.dtype, device=K.device)
    zero = K.new_zeros(*K.shape[:-2], 1, T)
    upgrad_b = p.unsqueeze(-1) * K
    dualproj_b = (K @ p.unsqueeze(-1)).mT
    return {
        "nnqp simplex (MGDA)": (lambda: solvers.nnqp(K, zero, True),
                                lambda: solvers.nnqp_reference(K, zero, True)),
        "nnqp x T (UPGrad)": (lambda: solvers.nnqp(K, upgrad_b),
                              lambda: solvers.nnqp_reference(K, upgrad_b)),
        "nnqp (DualProj)": (lambda: solvers.nnqp(K, dualproj_b),
                            lambda: solvers.nnqp_reference(K, dualproj_b)),
        "cagrad c=0.4": (lambda: solvers.cagrad_weights(K, p, 0.4),
                         lambda: solvers.cagrad_weights_reference(K, p, 0.4)),
        "power_fixed_point a=1 (NashMTL)": (lambda: nl.power_fixed_point(K, 1.0, 20),
                                            lambda: nl.power_fixed_point_reference(K, 1.0, 20)),
        "power_fixed_point a=2 (FairGrad)": (lambda: nl.power_fixed_point(K, 2.0, 25),
                                             lambda: nl.power_fixed_point_reference(K, 2.0, 25)),
        "imtl_weights (IMTLG)": (lambda: nl.imtl_weights(K),
                                 lambda: nl.imtl_weights_reference(K)),
        # eigenvectors are defined up to sign: the eigenvalues are compared
        "sym_eig (AlignedMTL, ConFIG)": (lambda: nl.sym_eig(K)[0],
                                         lambda: torch.linalg.eigvalsh(K)),
    }


def _solver(name: str, T: int, batch: int, device: torch.device) -> list[Contender]:
    from ..ops import solvers

    A = _randn((batch, T, 2 * T) if batch > 1 else (T, 2 * T), device, torch.float64)
    K = solvers.normalize_gram(A @ A.mT)[0]
    kernel, reference = _solver_pairs(K)[name]
    return [Contender("mtlfast", run=kernel, reference=True),
            Contender("torch reference", run=reference)]


def cases(cfg: Config) -> Iterator[Case]:
    sizes, device = _sizes(cfg), cfg.device
    n = sizes["copy"]
    yield Case("ops", "copy", f"n={human(n)}", {"n": n, "bytes": 2 * 4 * n},
               build=lambda: _copy(n, device))
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    for dtype in dtypes:
        tag = str(dtype).removeprefix("torch.")
        rtol = 1e-3 if dtype == torch.float32 else 2e-2
        es = _ESIZE[dtype]
        for T, P in sizes["gram"]:
            params = {"T": T, "P": P, "dtype": tag}
            yield Case("ops", "gram", f"T={T} P={human(P)} {tag}", {**params, "bytes": T * P * es},
                       sweeps=("P",) if T == sizes["gram"][0][0] else (), rtol=rtol,
                       build=lambda T=T, P=P, d=dtype: _gram(T, P, d, device))
            yield Case("ops", "combine", f"T={T} P={human(P)} {tag}",
                       {**params, "bytes": (T + 1) * P * es}, rtol=rtol,
                       build=lambda T=T, P=P, d=dtype: _combine(T, P, d, device))
            yield Case("ops", "gram+combine", f"T={T} P={human(P)} {tag}",
                       {**params, "bytes": (2 * T + 1) * P * es}, rtol=rtol,
                       headline=(T, P) == max(sizes["gram"]) and dtype == torch.float32,
                       build=lambda T=T, P=P, d=dtype: _gram_combine(T, P, d, device))
        for T, P in sizes["graddrop"]:
            yield Case("ops", "graddrop", f"T={T} P={human(P)} {tag}",
                       {"T": T, "P": P, "dtype": tag, "bytes": (T + 1) * P * es}, rtol=rtol,
                       headline=(T, P) == max(sizes["graddrop"]) and dtype == torch.float32,
                       build=lambda T=T, P=P, d=dtype: _graddrop(T, P, d, device))
    for label, (batch, k, widths) in LINEAR[cfg.sizes].items():
        yield Case("ops", "grouped_linear", label,
                   {"B": batch, "in": k, "widths": list(widths), "T": len(widths)},
                   headline=label.startswith("layer 2 ragged"),
                   build=lambda b=batch, k=k, w=widths: _grouped_linear(b, k, w, device))
    for label, (B, D, select, E) in MIXTURES[cfg.sizes].items():
        params = {"B": B, "D": D, "G": len(select), "E": E, "N": sum(map(len, select))}
        for i, op in enumerate(("mixture", "gated_mixture")):
            yield Case("ops", op, label, params, rtol=1e-4, headline=label.startswith("PLE"),
                       build=lambda B=B, D=D, s=select, E=E, i=i: _mixtures(B, D, s, E,
                                                                          device)[i])
    for label, (B, K, gate_sizes, skip) in GATES[cfg.sizes].items():
        yield Case("ops", "gate_logits", label,
                   {"B": B, "K": K, "G": len(gate_sizes), "N": sum(gate_sizes), "skip": skip},
                   rtol=1e-4, headline=label.startswith("PLE last level 8 gates K=32"),
                   build=lambda B=B, K=K, s=gate_sizes, k=skip: _gate_logits(B, K, s, k, device))
    probe = torch.zeros(1, 1, 1, dtype=torch.float64)
    for name in _solver_pairs(probe):
        for T in sizes["solver_T"]:
            for batch in (1, sizes["batch"]) if T == max(sizes["solver_T"]) else (1,):
                yield Case("ops", name, f"T={T} batch={batch}", {"T": T, "batch": batch},
                           rtol=1e-5, headline=name.startswith("nnqp x T") and batch == 1
                           and T == max(sizes["solver_T"]),
                           build=lambda name=name, T=T, b=batch: _solver(name, T, b, device))
