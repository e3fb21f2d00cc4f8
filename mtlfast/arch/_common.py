"""Helpers shared by the expert blocks: task names, input checks, the loop keys of a bank."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .experts import ExpertBank
from .gates import GateBank

__all__ = ["bank_blocks", "flatten_input", "gate_blocks", "resolve_tasks", "specific_counts"]


def resolve_tasks(tasks) -> tuple[str, ...]:
    """An int T (names ``task0..``) or a sequence of distinct names (ModuleDict keys)."""
    if isinstance(tasks, int) and not isinstance(tasks, bool):
        if tasks < 1:
            raise ValueError(f"tasks must be >= 1, got {tasks}")
        return tuple(f"task{t}" for t in range(tasks))
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be an int or a sequence of names, got {tasks!r}")
    names = tuple(tasks)
    if not names or len(set(names)) != len(names) or \
            any(not isinstance(n, str) or not n or "." in n for n in names):
        raise ValueError(f"task names must be distinct non-empty strings without '.', got "
                         f"{list(names)}")
    return names


def specific_counts(num_specific, T: int) -> tuple[int, ...]:
    """One task-specific expert count per task (an int for all)."""
    counts = [num_specific] * T if isinstance(num_specific, int) else list(num_specific)
    if len(counts) != T or any(isinstance(c, bool) or not isinstance(c, int) or c < 0
                               for c in counts):
        raise ValueError(f"num_specific must be an int >= 0 or one per task ({T}), got "
                         f"{num_specific!r}")
    return tuple(counts)


def flatten_input(name: str, x: object, K: int, ref: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Size]:
    """``x (..., K)`` -> ``(M, K)`` and the batch shape; dtype and device must match ``ref``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must be floating point, got {x.dtype}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: x has dtype {x.dtype} but the parameters are {ref.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name}: x is on {x.device} but the parameters are on {ref.device}")
    if x.dim() < 2 or x.shape[-1] != K:
        raise ValueError(f"{name}: x must be (..., batch, in_features={K}), got "
                         f"{tuple(x.shape)}")
    return x.reshape(-1, K), x.shape[:-1]


def bank_blocks(fused_prefix: str, bank: ExpertBank, loop_prefixes: Sequence[str]
                ) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """``{fused name: [(loop key, view)]}`` of an expert bank, expert ``e`` under
    ``loop_prefixes[e]`` (an ``nn.Sequential`` of Linear, act, ...)."""
    out: dict[str, list[tuple[str, torch.Tensor]]] = {}
    step = 1 if bank.activation == "none" else 2
    for layer in range(bank.depth):
        w, b = bank.blocks(layer)
        out[f"{fused_prefix}weight{layer}"] = [
            (f"{p}{layer * step}.weight", v) for p, v in zip(loop_prefixes, w, strict=True)]
        out[f"{fused_prefix}bias{layer}"] = [
            (f"{p}{layer * step}.bias", v) for p, v in zip(loop_prefixes, b, strict=True)]
    return out


def gate_blocks(fused_prefix: str, gates: GateBank, loop_prefixes: Sequence[str]
                ) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """The same for a gate bank: gate ``g`` is ``nn.Sequential(Linear, Softmax)`` under
    ``loop_prefixes[g]``."""
    w, b = gates.blocks()
    out = {f"{fused_prefix}weight": [(f"{p}0.weight", v)
                                     for p, v in zip(loop_prefixes, w, strict=True)]}
    if b is not None:
        out[f"{fused_prefix}bias"] = [(f"{p}0.bias", v)
                                      for p, v in zip(loop_prefixes, b, strict=True)]
    return out
