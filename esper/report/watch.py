"""``--watch``: rewrite the report as the telemetry grows, until SIGINT or SIGTERM.

While watching, the page carries a meta refresh so an open browser tab follows the run; the
last write after a stop has none (the page stays still). Only new lines are read each time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from esper.report.build import Report
from esper.simic.preflight import StopSignals

TICK = 0.2  # seconds between checks for a stop signal while waiting


def watch(report: Report, interval: float, on_write: Callable[[Path], None] | None = None,
          max_writes: int | None = None) -> Path:
    """Write at once, then again every ``interval`` seconds when events arrived; the final page
    (no refresh) is written when a signal (or ``max_writes``, for tests) stops the loop."""
    writes = 0
    with StopSignals(first="writing the final page") as stop:
        report.update()
        while True:
            path = report.write(refresh=interval)
            writes += 1
            if on_write is not None:
                on_write(path)
            if (max_writes is not None and writes >= max_writes) or not _new_events(report, stop, interval):
                break
    return report.write()


def _new_events(report: Report, stop: StopSignals, interval: float) -> bool:
    """Wait until the telemetry gained events (True) or a stop signal came (False)."""
    while True:
        deadline = time.monotonic() + interval
        while stop.signum is None and time.monotonic() < deadline:
            time.sleep(TICK)
        if stop.signum is not None:
            return False
        if report.update():
            return True
