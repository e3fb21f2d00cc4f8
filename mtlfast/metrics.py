"""Per-task metrics and the multi-task Delta_m% of Navon et al. 2022 (Nash-MTL), eq. in Sec. 6.

Delta_m% = (100 / T) * sum_t (-1)^{delta_t} (M_m,t - M_b,t) / M_b,t, with delta_t = 1 when a
higher value of metric t is better: the mean relative degradation of method m against the
single-task baselines b. Lower is better; negative means better than single-task training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of rows whose arg-max logit equals the integer target."""
    if logits.ndim != 2 or target.ndim != 1 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"logits must be (N, C) and target (N,), got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    if target.numel() == 0:
        raise ValueError("accuracy of an empty batch is undefined (target has no rows)")
    return (logits.argmax(dim=1) == target).double().mean().item()


def mae(prediction: torch.Tensor, target: torch.Tensor, scale: float = 1.0) -> float:
    """Mean absolute error times ``scale`` (the target's standard deviation when standardized)."""
    prediction = prediction.reshape(prediction.shape[0], -1).squeeze(1)
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction must match target's shape {tuple(target.shape)}, got "
            f"{tuple(prediction.shape)}"
        )
    if target.numel() == 0:
        raise ValueError("MAE of an empty batch is undefined (target has no rows)")
    return (prediction.double() - target.double()).abs().mean().item() * scale


def delta_m(
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
) -> float:
    """Delta_m% of ``metrics`` against ``baseline`` over the tasks of ``higher_is_better``.

    Each mapping is keyed by task name. Raises ``ValueError`` when a task is missing from
    ``metrics`` or ``baseline``, or when a baseline value is zero or not finite (the relative
    change is undefined there).
    """
    if not higher_is_better:
        raise ValueError("higher_is_better must name at least one task")
    total = 0.0
    for task, higher in higher_is_better.items():
        if task not in metrics or task not in baseline:
            raise ValueError(f"task {task!r} is missing from metrics or baseline")
        base = float(baseline[task])
        if base == 0.0 or not math.isfinite(base):
            raise ValueError(f"baseline of task {task!r} must be finite and non-zero, got {base}")
        relative = (float(metrics[task]) - base) / base
        total += -relative if higher else relative
    return 100.0 * total / len(higher_is_better)
