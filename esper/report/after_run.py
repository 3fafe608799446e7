"""``esper.train --report``: checked before the run (it needs JSONL telemetry to read), written
when the run ended well."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esper.report.telemetry import REPORT
from esper.simic.errors import ConfigError, UsageError
from esper.simic.preflight import check_file_target


def report_target(args: argparse.Namespace) -> Path | None:
    """The run directory to report on, or None without ``--report``; refused (before any work)
    when the run would write no JSONL telemetry."""
    if not getattr(args, "report", False):
        return None
    from esper.simic.cli import build_config

    try:
        cfg = build_config(args)
    except (ConfigError, ValueError, OSError):
        return None  # the config itself is refused by the run's own checks, in their words
    if "jsonl" not in [b.strip().lower() for b in cfg.telemetry.backends]:
        raise UsageError("--report reads the run's JSONL telemetry and this run writes none", "--report",
                         "add jsonl to --backends (e.g. --backends console,jsonl) and pick a --run-dir")
    check_file_target(Path(cfg.run_dir) / REPORT, "--report")
    return Path(cfg.run_dir)


def report_after(code: int, run_dir: Path | None) -> int:
    """Write the report of a run that exited 0; a report that cannot be written exits 1."""
    if run_dir is None or code != 0:
        return code
    from esper.report.build import write_report

    try:
        path = write_report(run_dir)
    except (UsageError, OSError) as err:
        print(f"error: report not written ({run_dir}): {err}", file=sys.stderr)
        return 1
    print(f"report {path}")
    return 0
