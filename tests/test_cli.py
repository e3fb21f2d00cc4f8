import json
import subprocess
import sys

import pytest

from mtlfast.cli import main


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert {"torch", "extension", "cuda_kernels", "triton"} <= facts.keys()


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "mtlfast", "info"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "extension" in r.stdout


def test_unknown_command_fails():
    with pytest.raises(SystemExit):
        main(["nonsense"])
