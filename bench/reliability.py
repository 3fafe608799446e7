"""The README's reliability figures, counted from the test suite as it is.

``python bench/reliability.py`` runs ``tests/test_reliability.py`` (slow cases included) and
prints the table. Every test there is one case (each parametrized id counts once), named by
what it proves: ``test_error_*`` a bad input refused in one clear line (exit 2, no traceback,
nothing run); ``test_fault_*`` a fault survived (drills of the ``faults`` config, a diverging env
or policy, a failing backend or checkpoint write); ``test_data_*`` an interruption, kill or
overwrite that must lose no checkpoint, result or flushed telemetry. Exit status: pytest's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

KINDS = ("error", "fault", "data")
SUITE = Path(__file__).resolve().parents[1] / "tests" / "test_reliability.py"


class Tally:
    """pytest plugin: the outcome of every case (a failed setup counts as a failure)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or report.outcome != "passed":
            self.outcomes.setdefault(report.nodeid, report.outcome)


def kind(nodeid: str) -> str:
    name = nodeid.split("::")[-1]
    return next((k for k in KINDS if name.startswith(f"test_{k}_")), "other")


def table(outcomes: dict[str, str]) -> str:
    tried = {n: o for n, o in outcomes.items() if o != "skipped"}

    def count(k: str, outcome: str) -> int:
        return sum(1 for n, o in tried.items() if kind(n) == k and o == outcome)

    def total(k: str) -> int:
        return sum(1 for n in tried if kind(n) == k)

    cli = sum(1 for n, o in tried.items() if "::test_error_bad_input[" in n and o == "passed")

    rows = [
        ("cases tried", f"{len(tried)}", f"cases run in `tests/{SUITE.name}`"),
        ("clear errors", f"{count('error', 'passed')} of {total('error')}",
         f"bad inputs refused before any work with one clear error ({cli} through the CLI: one line "
         "`error: what (where); allowed`, exit 2, no traceback, nothing written)"),
        ("faults survived", f"{count('fault', 'passed')} of {total('fault')}",
         "NaN and exploding envs (heuristic and PPO), diverged policy updates, full-disk telemetry backend, "
         "failing checkpoint writes, a poisoned observation normalizer"),
        ("data lost", f"{count('data', 'failed')} of {total('data')}",
         "SIGTERM, SIGINT, SIGKILL, overwrite and stale-temp cases that lost a checkpoint, result or flushed "
         "telemetry (goal 0)"),
    ]
    lines = ["| | count | what |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    return "\n".join(lines)


def main() -> int:
    tally = Tally()
    rc = pytest.main([str(SUITE), "-q", "-m", "slow or not slow", "-p", "no:cacheprovider"], plugins=[tally])
    print(table(tally.outcomes))
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
