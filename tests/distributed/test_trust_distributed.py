"""The non-finite policy across ranks: a NaN on one rank skips (or raises on) every rank, the
replicas never drift, and the message names the rank and the task. Exact accumulation
composed with DDP exact equals one process on the global batch of all micro-batches. FSDP2
runs the same pipeline (layer-wise methods, skip mode, StepInfo)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from ._harness import run_ranks
from .trust_workers import suite

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return run_ranks(suite, timeout=240)


@pytest.mark.parametrize("mode", ["local", "exact"])
def test_nan_on_one_rank_skips_every_rank(runs, mode):
    for r in runs:
        res = r[f"{mode}-skip"]
        assert res["skipped"] and res["grads_agree"] and res["grads_zero"], res


@pytest.mark.parametrize("mode", ["local", "exact"])
def test_nan_on_one_rank_raises_on_every_rank_naming_it(runs, mode):
    for r in runs:
        res = r[f"{mode}-raise"]
        assert "error" in res and res["grads_agree"] and res["grads_zero"], res
        assert "tasks [2]" in res["error"], res["error"]
        if mode == "local":
            assert "on rank 1" in res["error"] and "on rank 0" not in res["error"], res["error"]


@pytest.mark.parametrize("name", ["UPGrad", "PCGrad", "MGDA", "Mean"])
def test_accumulation_with_ddp_exact_equals_one_process_on_everything(runs, name):
    for r in runs:
        diffs = r["accumulate"][name]
        assert len(diffs) == 2 and max(diffs) < 1e-10, diffs


def test_fsdp2_runs_the_same_pipeline(runs):
    """Layer-wise GradVac under FSDP2 equals DDP exact; skip mode and StepInfo work there."""
    for r in runs:
        res = r["fsdp2"]
        assert res["weights_shape"] == (4, 3), res
        assert max(res["grad_err"]) < 1e-10, res
        assert res["skipped"] and res["unchanged"], res
