"""What a run is doing now, how far it is and how long it has left (principle 14).

A long phase (a torch.compile, a round of epochs, a PPO update, an evaluation) blocks the main
thread for minutes on a small machine, so the status is redrawn by a background thread: on a
terminal a one-line rich live view (twice a second), elsewhere (a log file, a pipe, CI) a plain
``progress:`` line at least every :data:`HEARTBEAT_S` seconds. The main thread only sets
fields (a phase, an epoch count) from host values it already holds: nothing here reads the
device. Compiles are seen through dynamo's compile callbacks, so the view says which graph is
compiling and for how long, and :class:`~esper.simic.preflight.StopSignals` can exit at once
during one (a compile cannot be stopped at a safe point).
"""

from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

HEARTBEAT_S = 5.0  # plain output: a status line at least this often (the promise is 10 s)
REFRESH_PER_S = 2  # terminal: redraws per second
# The esper functions whose first call compiles a graph, and what the view calls that graph.
GRAPH_NAMES = {"train_epoch": "training step", "validate": "validation", "test": "test scoring"}


def clock(seconds: float) -> str:
    """``1:05`` / ``1:02:03``: elapsed and remaining times the way a user reads them."""
    s = max(int(seconds), 0)
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def _graph_being_compiled() -> str:
    """Which esper function's graph dynamo is compiling: the nearest caller in esper.kasmina."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if frame.f_globals.get("__name__", "").startswith("esper.") and code.co_name in GRAPH_NAMES:
            return GRAPH_NAMES[code.co_name]
        frame = frame.f_back
    return "a graph"


class _Compiles:
    """Dynamo's compile start/end callbacks, registered once per process; :class:`RunProgress`
    and the stop signals read :attr:`since` (the running compile's start) and :attr:`what`."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.what = ""
        self.count = 0
        self.seconds = 0.0

    def install(self) -> None:
        from torch._dynamo.callback import callback_handler

        # torch._dynamo.reset() clears every callback: look, rather than remember a flag
        if self._start not in callback_handler.start_callbacks:
            callback_handler.register_start_callback(self._start)
        if self._end not in callback_handler.end_callbacks:
            callback_handler.register_end_callback(self._end)

    def _start(self, args: Any) -> None:
        self.what = _graph_being_compiled()
        self.since = time.monotonic()

    def _end(self, args: Any) -> None:
        if self.since is not None:
            self.count += 1
            self.seconds += time.monotonic() - self.since
        self.since = None

    @property
    def active(self) -> bool:
        return self.since is not None


COMPILES = _Compiles()


class RunProgress:
    """The live status of one command: ``phase`` (what), ``done/total`` (how far, in ``unit``),
    a rate and an ETA (how long). Use as a context manager around the work.

    ``live``: a rich live line (default: when the console is a terminal); otherwise plain lines
    every ``heartbeat`` seconds and at each phase change. ``enabled=False`` (a non-zero rank)
    shows nothing.
    """

    def __init__(self, console: Console, *, live: bool | None = None, heartbeat: float = HEARTBEAT_S,
                 enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled and not console.quiet
        self.live = console.is_terminal if live is None else live
        self.heartbeat = heartbeat
        self.start = time.monotonic()
        self.what = "starting"
        self.phase_start = self.start
        self.done = 0
        self.total: int | None = None
        self.unit = ""
        self.per_unit = 1  # env-epochs per unit (the envs of a batch), for the rate
        self.detail = ""
        self.eta_after = 0.0  # seconds of work known to follow this phase (later rounds)
        self._rate_t0: float | None = None
        self._rate_done = 0
        self._compile_s0 = 0.0
        self._view: Live | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._last_line = 0.0

    # ----------------------------------------------------------------------------- updates
    def phase(self, what: str, total: int | None = None, unit: str = "", per_unit: int = 1,
              eta_after: float = 0.0) -> None:
        """A new phase: ``what`` (e.g. ``round 2/3``), out of ``total`` ``unit``s."""
        self.what, self.total, self.unit, self.per_unit = what, total, unit, per_unit
        self.done, self.detail, self.eta_after = 0, "", eta_after
        self.phase_start = time.monotonic()
        self._rate_t0, self._rate_done = None, 0
        if self.enabled and not self.live:
            self._line()
        self._redraw()

    def advance(self, done: int, detail: str = "") -> None:
        """``done`` units of this phase finished. The rate is measured from the first unit on,
        with compile time taken out (a first epoch that compiled says nothing of the rest)."""
        now = time.monotonic()
        if self._rate_t0 is None:
            self._rate_t0, self._rate_done, self._compile_s0 = now, done, COMPILES.seconds
        self.done, self.detail = done, detail
        self._redraw()

    def _redraw(self) -> None:
        """On a terminal every change is drawn at once (a fast epoch is not skipped between two
        timed refreshes); plain output waits for its heartbeat."""
        if self._view is not None:
            self._view.refresh()

    def rate(self) -> float | None:
        """Units per second since the first finished unit of this phase (None before two)."""
        if self._rate_t0 is None or self.done <= self._rate_done:
            return None
        spent = time.monotonic() - self._rate_t0 - (COMPILES.seconds - self._compile_s0)
        return (self.done - self._rate_done) / max(spent, 1e-9)

    def eta(self) -> float | None:
        """Seconds until this phase (and the work known to follow it) is done."""
        r = self.rate()
        if r is None or self.total is None:
            return None
        return (self.total - self.done) / r + self.eta_after

    def status(self) -> str:
        """One line: what, how far, how fast, how long."""
        now = time.monotonic()
        parts = [self.what]
        if self.total is not None:
            parts.append(f"{self.unit} {self.done}/{self.total}".strip())
        if COMPILES.active:
            parts.append(f"compiling {COMPILES.what} (graph {COMPILES.count + 1}) for "
                         f"{clock(now - (COMPILES.since or now))}")
        r = self.rate()
        if r is not None:
            parts.append(f"{r * self.per_unit:.1f} env-epochs/s" if self.per_unit > 1 else f"{r:.2f} {self.unit}s/s")
        eta = self.eta()
        if eta is not None and not COMPILES.active:
            parts.append(f"ETA {clock(eta)}")
        if self.detail:
            parts.append(self.detail)
        parts.append(f"{clock(now - self.start)} elapsed")
        return " · ".join(parts)

    # ----------------------------------------------------------------------------- output
    def __rich__(self) -> Text:
        return Text(self.status(), style="cyan", overflow="ellipsis", no_wrap=True)

    def _line(self) -> None:
        self._last_line = time.monotonic()
        self.console.print(f"progress: {self.status()}", highlight=False, markup=False, soft_wrap=True)

    def _beat(self) -> None:
        while not self._stopped.wait(0.5):
            if time.monotonic() - self._last_line >= self.heartbeat:
                self._line()

    def __enter__(self) -> RunProgress:
        COMPILES.install()
        if not self.enabled:
            return self
        if self.live:
            self._view = Live(self, console=self.console, refresh_per_second=REFRESH_PER_S, transient=True)
            self._view.start()
        else:
            self._last_line = time.monotonic()
            self._thread = threading.Thread(target=self._beat, name="esper-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stopped.set()
        if self._view is not None:
            self._view.stop()
            self._view = None
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
