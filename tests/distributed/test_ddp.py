"""DDP (gloo, 2 CPU processes): exact == one process on the global batch, local, errors."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from ._harness import run_ranks
from .workers import exact_vs_single, local_vs_by_hand, mismatched_tasks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

METHODS = ["Mean", "PCGrad", "UPGrad", "MGDA", "NashMTL", "RLW"]


@pytest.fixture(scope="module")
def exact_runs() -> list[dict]:
    return run_ranks(exact_vs_single, METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_exact_equals_single_process_on_global_batch(exact_runs, name):
    diffs = exact_runs[0][name]["diffs"]
    assert len(diffs) == 3 and max(diffs) < 1e-6, diffs


@pytest.mark.parametrize("name", METHODS)
def test_parameters_and_weights_identical_across_ranks(exact_runs, name):
    for rank_result in exact_runs:
        assert max(rank_result[name]["spread"]) == 0.0
        assert all(s == 0.0 for s in rank_result[name]["weights_spread"])


def test_exact_gradient_accumulation_over_micro_batches():
    runs = run_ranks(exact_vs_single, ["UPGrad", "PCGrad"], 2, 2)
    for name in ("UPGrad", "PCGrad"):
        assert max(runs[0][name]["diffs"]) < 1e-6, runs[0][name]
        assert max(runs[1][name]["spread"]) == 0.0


def test_local_is_per_rank_projection_then_mean():
    runs = run_ranks(local_vs_by_hand)
    for r in runs:
        assert r["err"] < 1e-12, r
    assert runs[0]["weights_differ"] > 1e-3  # each rank projected its own gradients
    assert runs[0]["vs_exact"] > 1e-6  # and the result is not the exact step


def test_mismatched_number_of_tasks_raises_on_every_rank():
    messages = run_ranks(mismatched_tasks, timeout=60)
    for msg in messages:
        assert "T (tasks)" in msg and "rank 0: T (tasks)=3" in msg and "rank 1: T (tasks)=2" in msg
