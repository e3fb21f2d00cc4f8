"""``python -m mtlfast bench``: mtlfast against the tools users would otherwise pick.

Suites (``methods``, ``weights``, ``heads``, ``step``, ``ops``, ``demo``) each yield cases;
on every case each contender's answer is checked against mtlfast's before it is timed by the
one timer, ``harness.measure`` (see ``harness``). The slow ways it times mtlfast against live
in :mod:`mtlfast.baselines`.
"""

from .harness import Case, Config, Contender, Record, run_case, run_cases
from .runner import SUITES, add_arguments, run

__all__ = ["SUITES", "Case", "Config", "Contender", "Record", "add_arguments", "run", "run_case",
           "run_cases"]
