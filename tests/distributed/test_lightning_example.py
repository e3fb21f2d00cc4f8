"""examples/lightning_mtl.py at tiny size: one process in-process, and 2 CPU processes under
Lightning's "ddp" strategy (gloo) in a subprocess; both equal a plain loop on the global batch.
Skipped without lightning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, TensorDataset

import mtlfast

ROOT = Path(__file__).resolve().parents[2]
STEPS, GLOBAL_BATCH = 3, 16


def plain_loop_params() -> torch.Tensor:
    """The example's training without Lightning, one process, on the global batches."""
    pytest.importorskip("sklearn")
    from examples.ddp_train import Model, load_tasks
    from examples.lightning_mtl import TASKS

    torch.manual_seed(0)
    x, targets = load_tasks(torch.device("cpu"))
    model = Model()
    sampler = DistributedSampler(TensorDataset(x), num_replicas=1, rank=0, shuffle=True, seed=1)
    order = list(sampler)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method = mtlfast.methods.UPGrad()
    for step in range(STEPS):
        batch = order[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        opt.zero_grad()
        logits = model(x[batch])
        mtlfast.backward({t: F.cross_entropy(logits[t], targets[t][batch]) for t in TASKS},
                         model.trunk, method)
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_lightning_example_one_process_equals_plain_loop():
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    from examples.lightning_mtl import main

    result = main(["--steps", str(STEPS), "--batch-size", str(GLOBAL_BATCH)])
    assert set(result["accuracy"]) == {"digit", "parity", "large"}
    assert result["world"] == 1
    expected = plain_loop_params()
    assert (result["params"] - expected).abs().max().item() < 1e-6


def test_lightning_example_ddp_two_processes_is_the_global_batch_step(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    out = tmp_path / "rank0.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, str(ROOT / "examples" / "lightning_mtl.py"), "--devices", "2",
           "--steps", str(STEPS), "--batch-size", str(GLOBAL_BATCH // 2), "--out", str(out)]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = torch.load(out, weights_only=False)
    assert result["world"] == 2
    assert result["max_spread"] == 0.0  # identical parameters on both ranks
    # each rank saw half of every global batch: equal to one process on the whole batch
    assert (result["params"] - plain_loop_params()).abs().max().item() < 1e-6
