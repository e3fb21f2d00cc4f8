"""Shared containers for the bundled multi-task data sets."""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass, field
from typing import Literal

import torch

TaskKind = Literal["classification", "regression"]


@dataclass(frozen=True)
class Task:
    """One task of a data set: its name, kind, output width and held-out metric.

    ``classes`` is the number of logits for a classification task and 1 for a regression
    target; ``metric`` is "accuracy" (higher is better) or "mae" (lower is better).
    """

    name: str
    kind: TaskKind
    classes: int

    @property
    def out_features(self) -> int:
        return self.classes if self.kind == "classification" else 1

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "classification" else "mae"

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "classification"


@dataclass
class Split:
    """Inputs ``x`` (N, ...), one label tensor (N,) per task name, and ``source`` ids.

    ``source`` (N, ...) int64 names the raw records each example was built from (digit scans,
    utterances, molecules), so split disjointness can be checked.
    """

    x: torch.Tensor
    y: dict[str, torch.Tensor]
    source: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name, labels in self.y.items():
            if labels.shape[0] != self.x.shape[0]:
                raise ValueError(
                    f"labels of task {name!r} have {labels.shape[0]} rows, x has {self.x.shape[0]}"
                )

    def __len__(self) -> int:
        return self.x.shape[0]

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        """Yield ``(x, {task: y})`` mini-batches; shuffled when a generator is given."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield self.x[idx], {name: labels[idx] for name, labels in self.y.items()}


@dataclass
class MTLData:
    """A multi-task data set: task list, train/val/test splits, and what a metric means.

    ``target_scale`` maps a regression task to the standard deviation used to standardize
    its target, so an MAE on standardized predictions times the scale is in the data's units.
    """

    name: str
    tasks: list[Task]
    train: Split
    val: Split
    test: Split
    target_scale: dict[str, float] = field(default_factory=dict)
    description: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    @property
    def task_widths(self) -> dict[str, int]:
        return {t.name: t.out_features for t in self.tasks}


def cache_dir() -> pathlib.Path:
    """Where generated data sets are cached: ``$MTLFAST_CACHE`` or ``~/.cache/mtlfast``."""
    root = os.environ.get("MTLFAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mtlfast"
    )
    path = pathlib.Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def split_indices(
    n: int, fractions: tuple[float, float, float], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed-seed random partition of ``range(n)`` into train/val/test index tensors."""
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(n * fractions[1])
    n_test = round(n * fractions[2])
    n_train = n - n_val - n_test
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
