"""The README's Quick start test command is the one CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quick_start_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:bash|sh)\n(.*?)\n```", section, re.S)


def test_quick_start_has_exactly_two_commands():
    cmds = _quick_start_commands()
    assert len(cmds) == 2
    assert all("\n" not in c.strip() for c in cmds)


def test_ci_runs_the_readme_test_command():
    test_cmd = _quick_start_commands()[1].strip()
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_usage_example_runs():
    text = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text.split("## Usage", 1)[1], re.S)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["info"].weights.shape == (3,)
