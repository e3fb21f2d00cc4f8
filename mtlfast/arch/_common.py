"""Helpers shared by the expert blocks: task names, input checks, the loop keys of a bank."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ops.grouped_linear import cast
from .experts import ExpertBank, compute_dtype
from .gates import GateBank

__all__ = ["bank_blocks", "flatten_input", "gate_blocks", "level_reach", "resolve_tasks",
           "specific_counts"]


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


def specific_counts(num_shared, num_specific, T: int) -> tuple[int, ...]:
    """One task-specific expert count per task (an int for all), checked with ``num_shared``:
    ints >= 0 and at least one expert in all."""
    if isinstance(num_shared, bool) or not isinstance(num_shared, int) or num_shared < 0:
        raise ValueError(f"num_shared must be an int >= 0, got {num_shared!r}")
    counts = [num_specific] * T if isinstance(num_specific, int) else list(num_specific)
    if len(counts) != T or any(isinstance(c, bool) or not isinstance(c, int) or c < 0
                               for c in counts):
        raise ValueError(f"num_specific must be an int >= 0 or one per task ({T}), got "
                         f"{num_specific!r}")
    if num_shared + sum(counts) < 1:
        raise ValueError("num_shared + num_specific must give at least one expert, got "
                         f"num_shared={num_shared}, num_specific={num_specific!r}")
    return tuple(counts)


def level_reach(num_levels: int, num_shared: int, counts: Sequence[int]) -> list[dict]:
    """Which tasks each part of each CGC / PLE level reaches (from the structure alone).

    Level ``l`` of ``num_levels`` (the last one: CGC): the shared experts are mixed by every
    gate; task t's experts by task t's gate and, at inner levels, by the shared gate; the
    shared gate's mixture feeds the next level's shared experts and shared gate; task t's
    gate's mixture feeds the next level's task t experts and gate (at the last level: task
    t's output). Returns per level ``{"shared_experts", "shared_gate", "task_experts",
    "task_gates"}``: frozensets of task indices (per task for the last two; the shared gate's
    is empty at the last level, which has none). A part is shared (LibMTL's
    ``get_share_params`` generalized to PLE) when it reaches every task.
    """
    T = len(counts)
    out: list[dict] = [{}] * num_levels
    mix = [frozenset({t}) for t in range(T)]  # what each task's mixture of this level reaches
    shared_mix: frozenset[int] = frozenset()  # ... and the shared gate's (none at the last)
    for lvl in reversed(range(num_levels)):
        inner = lvl < num_levels - 1
        task_experts = [m | shared_mix if inner else m for m in mix]
        shared_experts = frozenset().union(*mix, shared_mix)
        out[lvl] = {"shared_experts": shared_experts, "shared_gate": shared_mix,
                    "task_experts": task_experts, "task_gates": list(mix)}
        # the mixtures of level lvl - 1 feed this level's experts and gates
        mix = [(task_experts[t] if k > 0 else frozenset()) | mix[t]
               for t, k in enumerate(counts)]
        shared_mix = (shared_experts if num_shared > 0 else frozenset()) | \
            (shared_mix if inner else frozenset())
    return out


def flatten_input(name: str, x: object, K: int, ref: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Size]:
    """``x (..., K)`` -> ``(M, K)`` in the block's compute dtype (``compute_dtype``: the
    parameters', or autocast's) and the batch shape; the device must match ``ref``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must be floating point, got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name}: x is on {x.device} but the parameters are on {ref.device}")
    x = cast(x, compute_dtype(name, x, ref))
    if x.dim() < 2 or x.shape[-1] != K:
        raise ValueError(f"{name}: x must be (..., batch, in_features={K}), got "
                         f"{tuple(x.shape)}")
    return x.reshape(-1, K), x.shape[:-1]


def bank_blocks(fused_prefix: str, bank: ExpertBank, loop_prefixes: Sequence[str]
                ) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """``{fused name: [(loop key, view)]}`` of an expert bank, expert ``e`` under
    ``loop_prefixes[e]`` (an ``nn.Sequential`` of Linear, act, ...); each stored part
    (``shared_weight{l}``: the first ``split`` experts, ``weight{l}``: the others) lists its
    experts' blocks."""
    out: dict[str, list[tuple[str, torch.Tensor]]] = {}
    step = 1 if bank.activation == "none" else 2
    for layer in range(bank.depth):
        w, b = bank.blocks(layer)
        for name, start, end in bank.parts:
            keys = loop_prefixes[start:end]
            out[f"{fused_prefix}{name}weight{layer}"] = [
                (f"{p}{layer * step}.weight", v) for p, v in zip(keys, w[start:end], strict=True)]
            out[f"{fused_prefix}{name}bias{layer}"] = [
                (f"{p}{layer * step}.bias", v) for p, v in zip(keys, b[start:end], strict=True)]
    return out


def gate_blocks(fused_prefix: str, gates: GateBank, loop_prefixes: Sequence[str]
                ) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """The same for a gate bank: gate ``g`` is ``nn.Sequential(Linear, Softmax)`` under
    ``loop_prefixes[g]``; ``shared_weight`` lists the gates named by ``gates.shared``."""
    w, b = gates.blocks()
    out = {}
    for name, gs in gates.parts:
        out[f"{fused_prefix}{name}weight"] = [(f"{loop_prefixes[g]}0.weight", w[g]) for g in gs]
        if b is not None:
            out[f"{fused_prefix}{name}bias"] = [(f"{loop_prefixes[g]}0.bias", b[g]) for g in gs]
    return out
