"""``python -m esper.report RUN_DIR``: write ``RUN_DIR/report.html`` (``--watch``: keep it current)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from esper.report.build import DRAW_ENVS, REPORT, TIMELINE_ROWS, Report, check_run_dir, write_report
from esper.report.live import live
from esper.report.watch import watch
from esper.simic.errors import UsageError
from esper.simic.preflight import add_debug_arg, check_file_target, run_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m esper.report", description=__doc__)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory holding telemetry.jsonl")
    p.add_argument("--out", type=Path, help=f"the page to write (default RUN_DIR/{REPORT})")
    p.add_argument("--watch", action="store_true",
                   help="rewrite the page as the telemetry grows (it reloads itself) until Ctrl-C")
    p.add_argument("--live", action="store_true",
                   help="follow the run in this terminal instead (seed stage per env and slot, an accuracy "
                        "sparkline, seeds by stage, the last decisions) until Ctrl-C; a snapshot when not a terminal")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes with --watch or --live")
    p.add_argument("--envs", type=int, default=DRAW_ENVS, help="envs drawn in full (all of them when the run has no more)")
    p.add_argument("--rows", type=int, default=TIMELINE_ROWS, help="env x slot rows of the stage timeline at most")
    add_debug_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for flag, value, least in (("--interval", args.interval, 0.5), ("--envs", args.envs, 1), ("--rows", args.rows, 1)):
        if not (value >= least and math.isfinite(value)):  # inf: the page's refresh is an integer
            raise UsageError(f"{flag} {value}", flag, f"a finite number >= {least}")
    out = args.out or args.run_dir / REPORT
    if args.live:
        if args.watch or args.out:
            raise UsageError("--live draws in the terminal and writes no page", "--live", "drop --watch/--out")
        check_run_dir(args.run_dir, need_telemetry=False)  # the run may not have written yet
        live(args.run_dir, min(args.interval, 1.0))
        return 0
    if not args.watch:
        check_run_dir(args.run_dir)
        check_file_target(out, "--out")
        path = write_report(args.run_dir, out, draw=args.envs, rows=args.rows)
        print(f"report {path}")
        return 0
    check_run_dir(args.run_dir, need_telemetry=False)  # the run may not have written yet
    check_file_target(out, "--out")
    report = Report(args.run_dir, out, draw=args.envs, rows=args.rows)
    print(f"watching {args.run_dir}; writing {out} every {args.interval:g} s while it grows (Ctrl-C stops)",
          file=sys.stderr)
    path = watch(report, args.interval)
    print(f"stopped watching; report {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
