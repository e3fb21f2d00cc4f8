"""MultiDigits: two real handwritten digits overlaid MultiMNIST-style, four tasks.

The source images are scikit-learn's bundled UCI handwritten digits (1,797 real 8x8 scans,
values 0..16, no download). Each example overlays a "left" and a "right" digit, each shifted
by a random offset, on a 10x14 canvas (pixel-wise max, so strokes overlap as in MultiMNIST,
Sabour et al. 2017). Tasks: left digit (10), right digit (10), parity of their sum (2), and
which is larger (3: left, equal, right). The source digits are split once, with a fixed seed,
into disjoint train/val/test pools, so no test example contains a digit scan seen in training.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import MTLData, Split, Task, split_indices

CANVAS = (10, 14)
TASKS = [
    Task("left", "classification", 10),
    Task("right", "classification", 10),
    Task("sum_parity", "classification", 2),
    Task("larger", "classification", 3),
]
# Top-left corner ranges (inclusive) of the 8x8 left and right digits on the canvas: the
# digits overlap by 2 to 6 columns.
_ROWS = (0, 2)
_LEFT_COLS = (0, 2)
_RIGHT_COLS = (4, 6)


def _load_source() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "MultiDigits needs scikit-learn (its bundled digits data): "
            "pip install 'mtlfast[data]'"
        ) from err
    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0)
    return images, torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))


def _compose(images, labels, pool, n, gen) -> Split:
    """``n`` two-digit canvases drawn from the source indices ``pool``."""
    pick = pool[torch.randint(len(pool), (n, 2), generator=gen)]
    rows = torch.randint(_ROWS[0], _ROWS[1] + 1, (n, 2), generator=gen)
    cols = torch.stack(
        [
            torch.randint(_LEFT_COLS[0], _LEFT_COLS[1] + 1, (n,), generator=gen),
            torch.randint(_RIGHT_COLS[0], _RIGHT_COLS[1] + 1, (n,), generator=gen),
        ],
        dim=1,
    )
    canvas = torch.zeros(n, *CANVAS)
    # Scatter each 8x8 digit at its offset with one gather-free index computation.
    r = torch.arange(8)
    for side in range(2):
        row_idx = (rows[:, side, None] + r).unsqueeze(2).expand(n, 8, 8)
        col_idx = (cols[:, side, None] + r).unsqueeze(1).expand(n, 8, 8)
        layer = torch.zeros(n, *CANVAS)
        layer[torch.arange(n)[:, None, None], row_idx, col_idx] = images[pick[:, side]]
        canvas = torch.maximum(canvas, layer)
    left, right = labels[pick[:, 0]], labels[pick[:, 1]]
    larger = torch.sign(right - left) + 1  # 0: left larger, 1: equal, 2: right larger
    y = {"left": left, "right": right, "sum_parity": (left + right) % 2, "larger": larger}
    return Split(canvas.unsqueeze(1), y, source=pick)


def multi_digits(
    n_train: int = 10_000, n_val: int = 1_000, n_test: int = 2_000, seed: int = 0
) -> MTLData:
    """Build MultiDigits: inputs (N, 1, 10, 14) in [0, 1], four classification tasks.

    The source scans are split 60/20/20 into train/val/test pools with ``seed``; composed
    pairs are drawn from their own pool only. Deterministic for a given argument set.
    """
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    images, labels = _load_source()
    pools = split_indices(len(labels), (0.6, 0.2, 0.2), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    train, val, test = (
        _compose(images, labels, pool, n, gen)
        for pool, n in zip(pools, (n_train, n_val, n_test), strict=True)
    )
    return MTLData(
        name="digits",
        tasks=list(TASKS),
        train=train,
        val=val,
        test=test,
        description="MultiDigits: two overlaid scikit-learn digit scans; left, right, "
        "sum parity, larger",
    )
