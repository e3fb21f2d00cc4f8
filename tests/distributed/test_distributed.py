"""DDP and FSDP2 on 2 CPU processes (gloo): exact == one process on the global batch, etc.

All checks run in ONE pair of spawned processes (tests/distributed/workers.py:suite), bounded
by a time limit; the tests below read their results.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from ._harness import run_ranks
from .workers import suite

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

METHODS = ["Mean", "PCGrad", "UPGrad", "MGDA", "NashMTL", "RLW"]


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return run_ranks(suite, timeout=300)


@pytest.mark.parametrize("name", METHODS)
def test_exact_equals_single_process_on_global_batch(runs, name):
    # three all-reduce buckets (SMALL_BUCKET_MB), one shared parameter no task reaches
    diffs = runs[0]["exact"][name]["diffs"]
    assert len(diffs) == 3 and max(diffs) < 1e-6, diffs
    assert runs[0]["exact"][name]["moved"] is not None


def test_exact_with_one_allreduce_equals_single_process(runs):
    diffs = runs[0]["one_bucket"]["UPGrad"]["diffs"]
    assert len(diffs) == 3 and max(diffs) < 1e-6, diffs
    assert max(runs[1]["one_bucket"]["UPGrad"]["spread"]) == 0.0


def test_bucketed_allreduce_is_bitwise_the_single_allreduce(runs):
    # (batched, chunks of 2, loop) x 3 steps, a graph that differs across ranks (side.weight on
    # rank 0 only)
    for r in runs:
        assert len(r["bucketed"]["G"]) == 9
        assert all(r["bucketed"]["G"]) and all(r["bucketed"]["K"]) and all(r["bucketed"]["grad"])


def test_buckets_start_during_the_backward_in_index_order(runs):
    # (buckets started when the backward ended, buckets) per step of the bucketed engine; a
    # batched engine's first step defers them (the batched backward is not yet known to work)
    for rank, r in enumerate(runs):
        several = [e for e in r["bucketed"]["early"] if e[1] > 1]
        assert len(several) == 9
        # rank 0 completes every bucket during the backward; on rank 1 the middle bucket
        # (side.weight, unused there) completes only at the end, so bucket 2 must wait
        during = (3, 3) if rank == 0 else (1, 3)
        assert several[:6] == [(0, 3), during, during] * 2, several
        assert several[6:] == [during] * 3, several  # the loop never replays: from step one


@pytest.mark.parametrize("name", METHODS)
def test_parameters_and_weights_identical_across_ranks(runs, name):
    # each rank built its method from a different global seed: rank 0's state is broadcast
    for r in runs:
        assert max(r["exact"][name]["spread"]) == 0.0
        assert all(s == 0.0 for s in r["exact"][name]["weights_spread"])


@pytest.mark.parametrize("name", ["UPGrad", "PCGrad"])
def test_exact_gradient_accumulation_over_micro_batches(runs, name):
    assert len(runs[0]["accumulation"][name]["diffs"]) == 2
    assert max(runs[0]["accumulation"][name]["diffs"]) < 1e-6
    assert max(runs[1]["accumulation"][name]["spread"]) == 0.0


def test_local_is_per_rank_projection_then_mean(runs):
    for r in runs:
        assert r["local"]["err"] < 1e-12, r["local"]
    assert runs[0]["local"]["weights_differ"] > 1e-3  # each rank projected its own gradients
    assert runs[0]["local"]["vs_exact"] > 1e-6  # and the result is not the exact step


@pytest.mark.parametrize("name", ["UPGrad", "PCGrad", "RLW"])
def test_fsdp2_sharded_equals_ddp_exact(runs, name):
    for r in runs:
        res = r["fsdp2"][name]
        assert len(res["grad_err"]) == 3
        assert max(res["grad_err"]) < 1e-10 and max(res["param_err"]) < 1e-10, res


def test_mismatched_number_of_tasks_raises_on_every_rank(runs):
    for r in runs:
        msg = r["mismatch"]
        assert "rank 0: T (tasks)=3" in msg and "rank 1: T (tasks)=2" in msg, msg


def test_mismatched_bucket_cap_raises_on_every_rank(runs):
    for r in runs:
        msg = r["mismatch_cap"]
        assert "rank 0: bucket cap (bytes)=26214400" in msg, msg
        assert "rank 1: bucket cap (bytes)=1048576" in msg, msg


def test_bad_bucket_cap_is_a_value_error(runs):
    assert all("bucket_cap_mb must be a positive number" in m for m in runs[0]["bad_cap"])


def test_sharded_parameters_are_pointed_to_fsdp_backward(runs):
    assert "FSDPBackward" in runs[0]["fsdp2"]["dtensor_error"]
