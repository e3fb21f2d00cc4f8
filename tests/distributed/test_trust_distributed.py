"""The non-finite policy across ranks: a NaN on one rank skips (or raises on) every rank, the
replicas never drift, and the message names the rank and the task."""

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
