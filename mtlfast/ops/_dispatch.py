"""The one backend table: which implementation serves an op for given input tensors.

Every public op asks ``backend(op, t, ...)`` once, after validating its inputs, and runs the
implementation named by the answer:

- ``"cuda"``: the CUDA kernel (``torch.ops.mtlfast.<kernel>`` on a CUDA tensor),
- ``"cpu"``: the C++ CPU kernel (``torch.ops.mtlfast.<kernel>`` on a CPU tensor),
- ``"triton"``: the Triton kernel (mtlfast/kernels/triton),
- ``"torch"``: torch's own op, where it was measured faster than ours,
- ``"reference"``: the op's pure-torch reference (its spec; any device, ``meta`` included).

========================  ============================  ==================  =================
op                        CUDA tensor                   CPU tensor          why
========================  ============================  ==================  =================
gram                      cuda                          cpu                 beat torch's
                                                                            ``G @ G.T`` 2-8x
                                                                            (RESULTS)
combine                   cuda                          torch (fp32/fp64)   BLAS addmv beat
                                                                            the C++ kernel
                                                                            1.5-5x (RESULTS)
graddrop                  cuda (fp32/fp16/bf16)         reference           the reference is
                                                                            cache-blocked
nnqp, cagrad, pcgrad      cuda (fp64, T <= 64)          cpu (fp64)          early stop per
                                                                            problem
pcgrad_orders             cuda                          cpu                 state read on
                                                                            device, no sync
power_fixed_point         cuda (floating, T <= 64)      cpu                 early stop
imtl_weights              cuda (fp64, T <= 64)          reference (eigh)    serial Jacobi is
                                                                            slower than eigh
sym_eig                   cuda (fp64, T <= 64)          torch (eigh)        eigh reads error
                                                                            codes on the host
aligned_mtl_weights,      reference                     cpu                 one small dense
config_weights,                                                             solve per block
gradvac_sweep,
clip_update_norm,
gradnorm_update
grouped_linear            triton (several groups)       torch               cuBLAS/MKL beat
                                                                            Triton on one
                                                                            dense group
mixture                   triton                        cpu (fp32/fp64,     one pass over
                                                        >= 256 rows), else  the rows (CPU);
                                                        torch (bmm)         one launch (GPU)
expert_mlp                torch (bmm, grouped GEMM)     cpu (eager, ReLU    MKL per expert,
                                                        or none, large      cache-resident
                                                        GEMMs), else torch  elementwise
gated_mixture             torch (gate weights +         cpu (eager,         softmax and only
                          mixture)                      fp32/fp64, >= 256   the gates'
                                                        rows), else torch   experts per row
gate_logits               torch (grouped_linear)        cpu (eager,         a row's gates
                                                        fp32/fp64), else    from cache, no
                                                        torch (baddbmm)     few-column GEMMs
mlp_heads, linear_heads   torch (FusedHeads' ATen ops)  cpu (eager), else   one autograd
                                                        torch               node, not one
                                                                            per op
========================  ============================  ==================  =================

"cuda"/"cpu" need the compiled extension with that kernel (``mtlfast._ext``); without it the
op falls back to its reference ("torch" for ``grouped_linear`` and ``sym_eig``). Triton on CPU
tensors runs only in the interpreter (``TRITON_INTERPRET=1``) and only when
``MTLFAST_HEADS_TRITON=1`` asks for it (a test switch: the interpreter is slow). The CUDA
solver kernels keep a block's workspace in shared memory, hence ``CUDA_SOLVER_MAX_T`` (the 64
in the table).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import torch
from torch._C._functorch import is_legacy_batchedtensor

from .. import _ext

__all__ = ["BACKENDS", "CUDA_SOLVER_MAX_T", "EXPERT_KERNEL_MIN_MACS", "Backend", "backend"]

Backend = Literal["cuda", "cpu", "triton", "torch", "reference"]
BACKENDS: tuple[str, ...] = ("cuda", "cpu", "triton", "torch", "reference")

#: Largest T the CUDA solver kernels take (their workspace lives in shared memory); larger
#: problems run the torch reference on the GPU.
CUDA_SOLVER_MAX_T = 64

#: Smallest per-expert first-layer GEMM (rows x in x out multiply-adds) the C++ expert kernel
#: takes: it makes ~8 ATen calls per expert and layer, which lost to the bmm's below this
#: (64-32 experts at 256 rows, 1M: 0.82x; 256-128 experts at 256 rows, 17M: 1.10x faster).
EXPERT_KERNEL_MIN_MACS = 1 << 22

# Name of each op's kernel under torch.ops.mtlfast when it differs from the op's name.
_KERNEL_NAME = {"combine": "combine_", "mixture": "mixture_cpu",
                "gated_mixture": "gated_mixture_cpu", "gate_logits": "gate_logits_cpu"}


def _kernel(op: str, t: torch.Tensor, device_type: str) -> bool:
    """The compiled kernel of ``op`` exists for ``t``'s device type."""
    if t.device.type != device_type:
        return False
    built = _ext.has_cpu_kernels() if device_type == "cpu" else _ext.has_cuda_kernels()
    return built and hasattr(torch.ops.mtlfast, _KERNEL_NAME.get(op, op))


def _solver_size(t: torch.Tensor) -> bool:
    return 0 < t.shape[-1] <= CUDA_SOLVER_MAX_T


def _triton_cpu() -> bool:
    return _ext.triton_interpreter() and os.environ.get("MTLFAST_HEADS_TRITON") == "1"


Rule = Callable[[str, torch.Tensor, dict], bool]

_CPU: Rule = lambda op, t, f: _kernel(op, t, "cpu")  # noqa: E731
_CUDA: Rule = lambda op, t, f: _kernel(op, t, "cuda")  # noqa: E731
_CUDA_SOLVER_F64: Rule = lambda op, t, f: (  # noqa: E731
    _kernel(op, t, "cuda") and t.dtype == torch.float64 and _solver_size(t))
_CPU_F64: Rule = lambda op, t, f: _kernel(op, t, "cpu") and t.dtype == torch.float64  # noqa: E731
_ON_CPU: Rule = lambda op, t, f: t.device.type == "cpu"  # noqa: E731

def _combine_out(t: torch.Tensor, f: dict) -> bool:
    """The kernels write a contiguous ``out`` of G's dtype (the reference casts)."""
    return f["out_dtype"] == t.dtype and f["out_contiguous"]


_HEADS_OP = (("cpu", lambda op, t, f: f["eager"] and not _triton_cpu() and _kernel(op, t, "cpu")),
             ("torch", lambda op, t, f: True))

#: op -> ordered (backend, rule) pairs; the first rule that holds picks the backend, and
#: "reference" serves when none does. ``f`` holds the op's keyword facts.
RULES: dict[str, tuple[tuple[str, Rule], ...]] = {
    "gram": (("cuda", _CUDA), ("cpu", _CPU)),
    "combine": (("cuda", lambda op, t, f: _CUDA(op, t, f) and _combine_out(t, f)),
                ("torch", lambda op, t, f: _ON_CPU(op, t, f) and _combine_out(t, f)
                 and t.dtype in (torch.float32, torch.float64))),
    "graddrop": (("cuda", lambda op, t, f: _kernel(op, t, "cuda") and t.dtype in (
        torch.float32, torch.float16, torch.bfloat16)),),
    "nnqp": (("cpu", _CPU), ("cuda", _CUDA_SOLVER_F64)),
    "cagrad": (("cpu", _CPU), ("cuda", _CUDA_SOLVER_F64)),
    "pcgrad": (("cpu", _CPU_F64), ("cuda", _CUDA_SOLVER_F64)),
    "pcgrad_orders": (("cpu", _CPU), ("cuda", _CUDA)),
    "power_fixed_point": (("cpu", _CPU), ("cuda", lambda op, t, f: _kernel(op, t, "cuda")
                                          and t.is_floating_point() and _solver_size(t))),
    "imtl_weights": (("cuda", _CUDA_SOLVER_F64),),
    "sym_eig": (("cuda", _CUDA_SOLVER_F64), ("torch", lambda op, t, f: True)),
    "aligned_mtl_weights": (("cpu", _CPU),),
    "config_weights": (("cpu", _CPU),),
    "gradvac_sweep": (("cpu", _CPU),),
    "clip_update_norm": (("cpu", _CPU),),
    "gradnorm_update": (("cpu", _CPU),),
    # A legacy vmap BatchedTensor (what autograd.grad(..., is_grads_batched=True) hands the
    # backward) has no storage for a Triton launch; torch's ops have batching rules.
    "grouped_linear": (
        ("torch", lambda op, t, f: f.get("dense", False) or not _ext.has_triton()
         or is_legacy_batchedtensor(t)),
        ("triton", lambda op, t, f: t.is_cuda or (t.device.type == "cpu" and _triton_cpu())),
        ("torch", lambda op, t, f: True)),
    # an expert bank's MLPs: the C++ kernel for plain eager CPU calls with ReLU or no
    # activation whose experts' first-layer GEMMs are large enough (EXPERT_KERNEL_MIN_MACS);
    # torch.compile, torch.func and other activations keep ExpertBank's bmm path
    "expert_mlp": (("cpu", lambda op, t, f: f["eager"] and f["activation"] in ("relu", "none")
                    and f["macs"] >= EXPERT_KERNEL_MIN_MACS and _kernel(op, t, "cpu")),
                   ("torch", lambda op, t, f: True)),
    # the per-task mixture of experts: the C++ kernel for fp32/fp64 CPU tensors of >= 256
    # rows (below, the autograd.Function around it costs more than the bmm's; unless a test
    # asks for the Triton interpreter), Triton where it runs, else one torch bmm (the rules of
    # grouped_linear's several-groups case)
    "mixture": (
        ("cpu", lambda op, t, f: t.dtype in (torch.float32, torch.float64) and not _triton_cpu()
         and t.shape[1] >= 256 and not is_legacy_batchedtensor(t) and _kernel(op, t, "cpu")),
        ("torch", lambda op, t, f: not _ext.has_triton() or is_legacy_batchedtensor(t)),
        ("triton", lambda op, t, f: t.is_cuda or (t.device.type == "cpu" and _triton_cpu())),
        ("torch", lambda op, t, f: True)),
    # softmax gates and their mixture: the C++ kernel for plain eager fp32/fp64 CPU calls of
    # >= 256 rows (the mixture's rule); else the unfused path ("torch": the gate weights and
    # the mixture op, which dispatches on its own)
    "gated_mixture": (
        ("cpu", lambda op, t, f: f["eager"] and t.dtype in (torch.float32, torch.float64)
         and not _triton_cpu() and t.shape[0] >= 256 and _kernel(op, t, "cpu")),
        ("torch", lambda op, t, f: True)),
    # grouped gates' logits (each gate on its own input): the C++ kernel for plain eager
    # fp32/fp64 CPU calls, else torch's batched GEMMs
    "gate_logits": (
        ("cpu", lambda op, t, f: f["eager"] and t.dtype in (torch.float32, torch.float64)
         and not _triton_cpu() and _kernel(op, t, "cpu")),
        ("torch", lambda op, t, f: True)),
    # FusedHeads' MLP heads, and its Linear heads on per-task inputs: the C++ op (one autograd
    # node) for plain eager CPU calls; otherwise FusedHeads' own composition of ATen ops
    "mlp_heads": _HEADS_OP,
    "linear_heads": _HEADS_OP,
}


def backend(op: str, t: torch.Tensor, **facts: object) -> Backend:
    """The implementation that serves ``op`` for the (validated) input ``t``.

    ``t`` is the op's main tensor (the Gram batch, G, x); ``facts`` are op-specific keywords
    the rules read (``combine``: ``out_dtype``; ``grouped_linear``: ``dense``).
    """
    for name, rule in RULES[op]:
        if rule(op, t, facts):
            return name  # type: ignore[return-value]
    return "reference"
