"""``python -m mtlfast bench``: mtlfast against the tools users would otherwise pick.

Three suites (``methods``, ``heads``, ``step``) each yield cases; on every case each
contender's answer is checked against mtlfast's before it is timed (see ``harness``).
"""

from .harness import Case, Config, Contender, Record, run_case, run_cases
from .runner import SUITES, add_arguments, run

__all__ = ["SUITES", "Case", "Config", "Contender", "Record", "add_arguments", "run", "run_case",
           "run_cases"]
