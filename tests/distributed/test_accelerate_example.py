"""examples/accelerate_mtl.py in one process at tiny size (skipped without accelerate)."""

from __future__ import annotations

import pytest


def test_accelerate_example_trains_three_tasks():
    pytest.importorskip("accelerate")
    pytest.importorskip("sklearn")
    from examples.accelerate_mtl import main

    acc = main(["--steps", "3", "--batch-size", "8"])
    assert set(acc) == {"digit", "parity", "large"}
    assert all(0.0 <= a <= 1.0 for a in acc.values())
