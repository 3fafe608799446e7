"""NissaHub: fan telemetry events out to backends without ever blocking or breaking training."""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Protocol, runtime_checkable

from esper.leyline.events import TelemetryEvent

logger = logging.getLogger(__name__)

_STOP = object()


@runtime_checkable
class Backend(Protocol):
    """Where events go. ``emit`` may raise; the hub isolates failures."""

    def emit(self, event: TelemetryEvent) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def backend_name(backend: object) -> str:
    return str(getattr(backend, "name", type(backend).__name__))


class _Slot:
    """A backend and its health: failure streaks per method (a buffered writer's emits succeed
    while its flushes fail, so one method's success must not excuse another's failures) and the
    events it lost: not written, written but never flushed, or sent after it was disabled."""

    __slots__ = ("backend", "disabled", "error", "failures", "logged", "lost", "streak", "unflushed")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.failures = 0
        self.streak: dict[str, int] = {}
        self.disabled = False
        self.logged = False
        self.lost = 0
        self.unflushed = 0  # emitted since the last successful flush
        self.error = ""

    @property
    def consecutive_failures(self) -> int:
        return max(self.streak.values(), default=0)


class NissaHub:
    """Routes events to backends from a daemon worker thread (or inline when synchronous).

    ``emit`` never blocks: events go to a bounded queue and are dropped (and counted) if it is
    full. A backend that raises is logged once with its traceback and disabled after
    ``max_failures`` consecutive failures of one method (a buffered writer on a full disk whose
    emits succeed while every flush fails is disabled too); the others are unaffected. Events
    each backend lost are counted (:meth:`loss_report`, printed at the end of every run). The hub is flushed and
    closed at interpreter exit, on ``close()`` and when leaving its ``with`` block (also on
    Ctrl-C).
    """

    def __init__(
        self,
        backends: Iterable[Backend] = (),
        *,
        synchronous: bool = False,
        max_failures: int = 3,
        max_queue: int = 10_000,
    ) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be >= 1")
        self._slots = [_Slot(b) for b in backends]
        self.synchronous = synchronous
        self.max_failures = max_failures
        self.dropped = 0
        self.emitted = 0  # events handed to the hub while open
        self.closed = False
        self._lock = threading.Lock()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_queue)
        self._worker: threading.Thread | None = None
        if not synchronous:
            self._worker = threading.Thread(target=self._run, name="nissa-hub", daemon=True)
            self._worker.start()
        atexit.register(self.close)

    # -- public API ---------------------------------------------------------------------------
    @property
    def backends(self) -> list[Backend]:
        return [s.backend for s in self._slots]

    @property
    def active_backends(self) -> list[Backend]:
        """Backends not yet disabled by repeated failures."""
        return [s.backend for s in self._slots if not s.disabled]

    def add_backend(self, backend: Backend) -> None:
        with self._lock:
            self._slots.append(_Slot(backend))

    def emit(self, event: TelemetryEvent) -> None:
        """Queue an event (or dispatch it inline in synchronous mode). Never raises."""
        if self.closed:
            return
        self.emitted += 1
        if self.synchronous:
            self._dispatch(event)
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                logger.warning("NissaHub queue full; dropping telemetry events")

    def losses(self) -> dict[str, int]:
        """Events lost per backend (by name), the hub's own queue drops included."""
        return {backend_name(s.backend): s.lost + self.dropped for s in self._slots}

    def loss_report(self) -> list[str]:
        """One line per backend that lost events (none when nothing was lost): what the end
        of a run prints, so lost telemetry is never silent."""
        lines = []
        for s in self._slots:
            lost = s.lost + self.dropped
            if lost:
                state = f"disabled after repeated failures ({s.error})" if s.disabled else (s.error or "queue full")
                lines.append(f"telemetry lost: {backend_name(s.backend)} dropped {lost} of {self.emitted} events; "
                             f"{state}")
        return lines

    def emit_many(self, events: Iterable[TelemetryEvent]) -> None:
        for event in events:
            self.emit(event)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait until queued events are dispatched, then flush every active backend."""
        if not self.synchronous and self._worker is not None and self._worker.is_alive():
            done = threading.Event()
            self._queue.put(done)  # blocks only if the queue is full, which flush may do
            done.wait(timeout)
        for slot in list(self._slots):
            self._call(slot, "flush")

    def close(self) -> None:
        """Flush, stop the worker and close the backends. Idempotent."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        if self._worker is not None and self._worker.is_alive():
            self._queue.put(_STOP)
            self._worker.join(timeout=30.0)
        for slot in list(self._slots):
            self._call(slot, "close")
        atexit.unregister(self.close)

    def __enter__(self) -> NissaHub:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            self._dispatch(item)  # type: ignore[arg-type]

    def _dispatch(self, event: TelemetryEvent) -> None:
        for slot in list(self._slots):
            self._call(slot, "emit", event)

    def _call(self, slot: _Slot, method: str, *args: object) -> None:
        fn = getattr(slot.backend, method, None)
        if slot.disabled:
            slot.lost += method == "emit"
            if method == "close" and fn is not None:  # release its files; it lost what it had
                with contextlib.suppress(Exception):
                    fn()
            return
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as err:
            slot.failures += 1
            slot.streak[method] = slot.streak.get(method, 0) + 1
            slot.error = f"{type(err).__name__}: {err}"
            if method == "emit":
                slot.lost += 1
            elif method == "flush":  # what it buffered since its last good flush is gone
                slot.lost += slot.unflushed
                slot.unflushed = 0
            name = backend_name(slot.backend)
            if not slot.logged:
                slot.logged = True
                logger.exception("telemetry backend %s failed in %s()", name, method)
            if slot.streak[method] >= self.max_failures:
                slot.disabled = True
                slot.lost += slot.unflushed
                slot.unflushed = 0
                logger.error(
                    "telemetry backend %s disabled after %d consecutive failures",
                    name,
                    slot.streak[method],
                )
        else:
            slot.streak[method] = 0
            if method == "emit":
                slot.unflushed += 1
            elif method == "flush":
                slot.unflushed = 0
