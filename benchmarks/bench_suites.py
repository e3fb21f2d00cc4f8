"""The ``python -m mtlfast bench --quick`` suites as pytest-benchmark tests (CPU, 1 thread).

Run: pytest benchmarks/bench_suites.py --benchmark-only --benchmark-group-by=group
One test per (case, contender). A contender is benchmarked only after the harness checked it
gives mtlfast's update on the same input (a contender that differs or is unavailable is
skipped with the reason); floors (linear scalarization) are benchmarked unchecked.
"""

from __future__ import annotations

import re

import pytest

from mtlfast.bench import SUITES, Config, run_case

CFG = Config.for_sizes("quick", "cpu")
CASES = [case for cases in SUITES.values() for case in cases(CFG)]
#: contender names per (suite, method): they do not depend on the sizes, so a tiny build says
_NAMES = {(c.suite, c.method): [x.name for x in c.build()]
          for cases in SUITES.values() for c in cases(Config.for_sizes("tiny", "cpu"))}

def _id(*parts: str) -> str:
    """``methods-PCGrad-T8_P100k-pairwise_loop``: usable with ``-k``."""
    return "-".join(re.sub(r"[^A-Za-z0-9.]+", "_", p.replace("=", "")).strip("_") for p in parts)


PARAMS = [pytest.param(case, name, id=_id(case.suite, case.method, case.label, name))
          for case in CASES for name in _NAMES.get((case.suite, case.method), [])]


pytestmark = pytest.mark.usefixtures("one_thread")  # benchmarks/conftest.py


@pytest.mark.parametrize(("case", "name"), PARAMS)
def test_contender(benchmark, case, name):
    check = Config(CFG.device, "quick", warmup=0, min_reps=1, max_reps=1, budget_s=0.0)
    status = {r.contender: r for r in run_case(case, check)}[name]
    if status.status not in ("ok", "floor"):
        pytest.skip(f"{name}: {status.status} {status.note}")
    contender = next(c for c in case.build() if c.name == name)
    benchmark.group = f"{case.suite} {case.method} {case.label}"
    benchmark.pedantic(contender.run, rounds=5, warmup_rounds=1)
