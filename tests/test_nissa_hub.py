"""NissaHub fan-out and failure isolation; console, JSONL (rotation) and TensorBoard backends."""

from __future__ import annotations

import io
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from esper.leyline.events import AnomalyEvent, EventKind, LifecycleEvent, TelemetryEvent
from esper.nissa import (
    ConsoleBackend,
    JsonlBackend,
    NissaHub,
    TensorBoardBackend,
    epoch_event,
    make_backends,
)


class Recorder:
    def __init__(self) -> None:
        self.events: list[TelemetryEvent] = []
        self.flushed = 0
        self.closed = False

    def emit(self, event: TelemetryEvent) -> None:
        self.events.append(event)

    def flush(self) -> None:
        self.flushed += 1

    def close(self) -> None:
        self.closed = True


class Exploding(Recorder):
    def emit(self, event: TelemetryEvent) -> None:
        self.events.append(event)
        raise RuntimeError("backend down")


def ev(epoch: int) -> TelemetryEvent:
    return TelemetryEvent(kind=EventKind.EPOCH, epoch=epoch, payload={"x": epoch})


@pytest.mark.parametrize("synchronous", [True, False])
def test_failing_backend_isolated_and_disabled(
    synchronous: bool, caplog: pytest.LogCaptureFixture
) -> None:
    good, bad = Recorder(), Exploding()
    with (
        caplog.at_level(logging.ERROR, logger="esper.nissa.hub"),
        NissaHub([bad, good], synchronous=synchronous, max_failures=3) as hub,
    ):
        for i in range(10):
            hub.emit(ev(i))
        hub.flush()
        assert hub.active_backends == [good]
    assert [e.epoch for e in good.events] == list(range(10))
    assert len(bad.events) == 3  # disabled after 3 consecutive failures
    logged = [r for r in caplog.records if "failed in emit" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert any("disabled after 3" in r.getMessage() for r in caplog.records)
    assert good.closed and good.flushed >= 1


def test_intermittent_failures_reset_counter() -> None:
    class Flaky(Recorder):
        def emit(self, event: TelemetryEvent) -> None:
            super().emit(event)
            if event.epoch % 2:
                raise ValueError("odd")

    flaky = Flaky()
    hub = NissaHub([flaky], synchronous=True, max_failures=2)
    for i in range(8):
        hub.emit(ev(i))
    assert hub.active_backends == [flaky] and len(flaky.events) == 8
    hub.close()


def test_emit_never_blocks_on_slow_backend() -> None:
    gate = threading.Event()

    class Slow(Recorder):
        def emit(self, event: TelemetryEvent) -> None:
            gate.wait(5)
            super().emit(event)

    slow = Slow()
    hub = NissaHub([slow], max_queue=4)
    for i in range(20):
        hub.emit(ev(i))  # returns at once although the backend is stuck
    assert hub.dropped > 0
    gate.set()
    hub.close()
    assert len(slow.events) == 20 - hub.dropped
    hub.emit(ev(99))  # after close: ignored, no error
    assert len(slow.events) == 20 - hub.dropped


def test_close_in_finally_on_keyboard_interrupt() -> None:
    rec = Recorder()
    with pytest.raises(KeyboardInterrupt), NissaHub([rec]) as hub:
        hub.emit(ev(1))
        raise KeyboardInterrupt
    assert hub.closed and rec.closed and [e.epoch for e in rec.events] == [1]


def test_jsonl_one_event_per_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    backend = JsonlBackend(path)
    snap = {"metrics.loss": np.array([0.5, np.nan]), "gradients.nonfinite": np.array([[0], [3]])}
    with NissaHub([backend]) as hub:
        hub.emit(epoch_event(snap, 4))
        hub.emit(
            LifecycleEvent(
                kind=EventKind.LIFECYCLE,
                env=1,
                epoch=4,
                slot="mid",
                blueprint="norm",
                from_stage="DORMANT",
                to_stage="GERMINATED",
            )
        )
    lines = [json.loads(s) for s in path.read_text().splitlines()]
    assert lines[0] == {
        "kind": "epoch",
        "env": -1,
        "epoch": 4,
        "payload": {"metrics.loss": [0.5, None], "gradients.nonfinite": [[0], [3]]},
    }
    assert lines[1]["blueprint"] == "norm" and lines[1]["to_stage"] == "GERMINATED"


def test_jsonl_rotation(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    backend = JsonlBackend(path, max_bytes=300, backups=2)
    hub = NissaHub([backend], synchronous=True)
    for i in range(40):
        hub.emit(TelemetryEvent(kind=EventKind.EPOCH, epoch=i, payload={"pad": "x" * 40}))
    hub.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["t.jsonl", "t.jsonl.1", "t.jsonl.2"]
    epochs = []
    for name in ("t.jsonl.2", "t.jsonl.1", "t.jsonl"):
        text = (tmp_path / name).read_text()
        assert len(text.encode()) <= 300
        epochs += [json.loads(s)["epoch"] for s in text.splitlines()]
    assert epochs == list(range(40 - len(epochs), 40))  # newest kept, in order, none lost inside


def test_jsonl_rotation_without_backups(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    backend = JsonlBackend(path, max_bytes=200, backups=0)
    for i in range(20):
        backend.emit(TelemetryEvent(kind=EventKind.EPOCH, epoch=i, payload={"pad": "y" * 30}))
    backend.close()
    assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]
    assert path.stat().st_size <= 200


def test_console_verbosity() -> None:
    def render(verbosity: int) -> str:
        buf = io.StringIO()
        backend = ConsoleBackend(verbosity, Console(file=buf, width=200, color_system=None))
        backend.emit(epoch_event({"metrics.val_loss": np.array([1.0, 3.0])}, 2))
        backend.emit(
            AnomalyEvent(
                kind=EventKind.ANOMALY,
                env=1,
                epoch=2,
                detector="d",
                severity="severe",
                message="boom",
            )
        )
        backend.emit(
            TelemetryEvent(kind=EventKind.NARRATIVE, env=0, epoch=2, payload={"text": "story"})
        )
        return buf.getvalue()

    quiet, normal, loud = render(0), render(1), render(2)
    assert "boom" in quiet and "epoch 2" in quiet and "val_loss" not in quiet
    assert "metrics.val_loss 2" in normal and "env 0:" not in normal and "story" not in normal
    assert "env 1: metrics.val_loss 3" in loud and "story" in loud
    with pytest.raises(ValueError):
        ConsoleBackend(7)


def test_tensorboard_backend_writes_event_file(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    tb = TensorBoardBackend(tmp_path / "tb")
    tb.emit(
        epoch_event(
            {"metrics.val_loss": np.array([1.0, 2.0]), "gradients.norm": np.ones((2, 3))}, 1
        )
    )
    tb.emit(TelemetryEvent(kind=EventKind.PPO_UPDATE, epoch=1, payload={"entropy": 0.5}))
    # Dict payloads (per-head entropy, reward components) become one scalar per leaf.
    tb.emit(TelemetryEvent(kind=EventKind.PPO_UPDATE, epoch=2,
                           payload={"head_entropy": {"op": 0.25, "slot": 0.125}, "components": {"rent": {"x": -1.0}}}))
    tb.emit(AnomalyEvent(kind=EventKind.ANOMALY, epoch=1, message="m"))
    tb.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()
    assert {"metrics.val_loss/mean", "metrics.val_loss/env1", "ppo_update/entropy",
            "ppo_update/head_entropy/op", "ppo_update/head_entropy/slot",
            "ppo_update/components/rent/x"} <= set(tags["scalars"])
    assert [e.value for e in acc.Scalars("ppo_update/head_entropy/op")] == [0.25]
    assert "gradients.norm" in tags["histograms"]


def test_make_backends(tmp_path: Path) -> None:
    backends = make_backends("console, jsonl", run_dir=tmp_path, verbosity=0)
    assert [type(b).__name__ for b in backends] == ["ConsoleBackend", "JsonlBackend"]
    assert backends[1].path == tmp_path / "telemetry.jsonl"
    for b in backends:
        b.close()
    with pytest.raises(ValueError, match=r"unknown telemetry backend\(s\) \['kafka'\]"):
        make_backends(["console", "kafka"], run_dir=tmp_path)


def test_quiet_console_keeps_severe_and_run_level_anomalies_only() -> None:
    """Verbosity 0 (the default): a 64-env run must not print a line per env per epoch."""

    def render(verbosity: int) -> str:
        buf = io.StringIO()
        backend = ConsoleBackend(verbosity, Console(file=buf, width=200, color_system=None))
        for env, sev, msg in ((3, "warning", "env drop"), (-1, "warning", "ratio range"), (4, "severe", "nan loss")):
            backend.emit(AnomalyEvent(kind=EventKind.ANOMALY, env=env, epoch=2, detector="d", severity=sev,
                                      message=msg))
        backend.emit(TelemetryEvent(kind=EventKind.EPISODE, env=3, epoch=2, payload={"test_acc": 70.0}))
        return buf.getvalue()

    quiet, normal = render(0), render(1)
    assert "ratio range" in quiet and "nan loss" in quiet
    assert "env drop" not in quiet and "episode" not in quiet
    assert "env drop" in normal and "episode" in normal
