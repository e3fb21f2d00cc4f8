import json
import os
import subprocess
import sys

import torch

import mtlfast
from mtlfast import _ext

SCRIPT = """
import warnings, torch
warnings.simplefilter("always")
import mtlfast
from mtlfast.ops import gram, gram_reference, combine
G = torch.randn(7, 1001, generator=torch.Generator().manual_seed(1))
assert torch.allclose(gram(G), gram_reference(G), rtol=1e-5, atol=1e-4)
w = torch.ones(7)
assert torch.allclose(combine(w, G), G.sum(0), rtol=1e-5, atol=1e-5)
print(mtlfast.info()["extension"])
"""


def _run(env_extra):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)


def test_fallback_without_extension_warns_once_and_computes():
    r = _run({"MTLFAST_NO_EXT": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
    lines = [ln for ln in r.stderr.splitlines() if "compiled extension unavailable" in ln]
    assert len(lines) == 1, r.stderr
    assert "MTLFAST_NO_EXT=1" in lines[0]


def test_info_tells_the_truth():
    facts = mtlfast.info()
    assert facts["torch"] == torch.__version__
    assert facts["extension"] == (_ext.extension is not None)
    assert facts["cuda_kernels"] == _ext.has_cuda_kernels()
    if facts["extension"]:
        assert hasattr(torch.ops.mtlfast, "gram")
    json.dumps(facts)  # serializable for `info --json`
