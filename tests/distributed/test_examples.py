"""examples/ddp_train.py under torchrun (2 CPU processes, gloo) at tiny size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ddp_train_example_runs_and_ranks_agree():
    pytest.importorskip("sklearn")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "ddp_train.py"), "--steps", "3", "--batch-size", "8",
           "--bucket-cap-mb", "0.05"]  # the Jacobian (199 KB) in 4 all-reduce buckets
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "max parameter difference across ranks: 0\n" in done.stdout, done.stdout
    assert "step    2  global losses: digit=" in done.stdout
