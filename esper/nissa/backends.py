"""Output backends: rich console, rotating JSON lines, TensorBoard (W&B and Prometheus in their
own modules); ``make_backends`` for the CLI."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from esper.leyline.events import AnomalyEvent, EventKind, TelemetryEvent
from esper.nissa.anomaly import PPO_SCOPE
from esper.nissa.hub import Backend
from esper.nissa.scalars import finite_mean, flat_items

BACKEND_NAMES: tuple[str, ...] = ("console", "jsonl", "tensorboard", "prometheus", "wandb")


def to_jsonable(value: Any) -> Any:
    """Plain JSON types for numpy arrays/scalars, enums, paths; non-finite floats become None."""
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer | int):
        return int(value)
    if isinstance(value, np.floating | float):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, str) or value is None:
        return value
    return str(value)


def where(event: TelemetryEvent) -> str:
    """Where an event happened, for humans: ``epoch E env I``; ``epoch E`` for a run-wide
    event (env -1); ``ppo update U`` for a PPO update's anomaly (its epoch is the update)."""
    if event.env >= 0:
        return f"epoch {event.epoch} env {event.env}"
    if event.payload.get("scope") == PPO_SCOPE:
        return f"ppo update {event.epoch}"
    return f"epoch {event.epoch}"


# Anomalies a normal run raises now and then, and why they need nothing from the user. The
# console shows them at verbosity 1 and up (yellow, with this note), never as red severe lines;
# at verbosity 0 it counts them and says so once when the run ends. Telemetry keeps them all.
ROUTINE = {
    "performance_degradation": "one env's accuracy swings between epochs; the others go on, the governor "
                               "steps in only when a loss diverges",
    "value_collapse": "usual while the critic is young (EV on the round lines); a concern only if it lasts "
                      "the whole run",
}


class ConsoleBackend:
    """Human-readable lines via rich.

    verbosity 0: severe anomalies (not the routine ones, :data:`ROUTINE`: counted, named at the
    end) and run-level warnings (a 64-env run would otherwise print a
    line per env per epoch); 1: + per-env warnings, episode ends, one line per epoch (means over
    envs), lifecycle changes, PPO updates; 2: + one line per env per epoch, decisions,
    narratives; 3: + everything else (analytics tables, info anomalies).
    """

    name = "console"

    def __init__(self, verbosity: int = 1, console: Console | None = None) -> None:
        if not 0 <= verbosity <= 3:
            raise ValueError(f"verbosity must be in 0..3, got {verbosity}")
        self.verbosity = verbosity
        self.console = console if console is not None else Console(stderr=True)
        self.routine: dict[str, int] = {}  # routine anomalies not shown (verbosity 0), by detector

    @staticmethod
    def _scalar_summary(payload: Mapping[str, Any], index: int | None) -> str:
        parts = []
        for key, value in payload.items():
            arr = np.asarray(value)
            if arr.dtype.kind not in "biuf":
                continue
            if index is None and arr.ndim == 1:
                parts.append(f"{key} {finite_mean(arr.astype(np.float64)):.4g}")
            elif index is None and arr.ndim == 0:
                parts.append(f"{key} {float(arr):.4g}")
            elif index is not None and arr.ndim == 1 and index < arr.shape[0]:
                parts.append(f"{key} {float(arr[index]):.4g}")
        return " | ".join(parts)

    def emit(self, event: TelemetryEvent) -> None:
        v, kind = self.verbosity, event.kind
        if kind is EventKind.ANOMALY and isinstance(event, AnomalyEvent) and event.detector in ROUTINE:
            if v >= 1:
                self.console.print(f"[yellow]{where(event)} {event.detector} (routine: {ROUTINE[event.detector]}): "
                                   f"{event.message}[/]", highlight=False)
            else:
                self.routine[event.detector] = self.routine.get(event.detector, 0) + 1
        elif kind is EventKind.ANOMALY:
            sev = event.severity if isinstance(event, AnomalyEvent) else "warning"
            shown = {"severe": 0, "warning": 0 if event.env < 0 else 1, "info": 3}.get(sev, 0)
            if v >= shown:
                style = "bold red" if sev == "severe" else "yellow"
                msg = event.message if isinstance(event, AnomalyEvent) else event.payload
                self.console.print(f"[{style}]{where(event)} {sev}: {msg}[/]")
        elif kind is EventKind.EPISODE and v >= 1:
            self.console.print(f"[bold]episode[/] {self._scalar_summary(event.payload, None)}")
        elif kind is EventKind.EPOCH and v >= 1:
            scalars = self._scalar_summary(event.payload, None)
            self.console.print(f"[cyan]epoch {event.epoch}[/] {scalars}", highlight=False)
            if v >= 2:
                n = max(
                    (
                        np.asarray(a).shape[0]
                        for a in event.payload.values()
                        if np.asarray(a).ndim >= 1
                    ),
                    default=0,
                )
                for i in range(n):
                    line = self._scalar_summary(event.payload, i)
                    self.console.print(f"  env {i}: {line}", highlight=False)
        elif kind in (EventKind.LIFECYCLE, EventKind.PPO_UPDATE) and v >= 1:
            body = {k: val for k, val in event.to_dict().items() if k not in ("kind", "epoch")}
            self.console.print(f"{kind.value} epoch {event.epoch}: {to_jsonable(body)}")
        elif kind in (EventKind.DECISION, EventKind.NARRATIVE) and v >= 2:
            text = event.payload.get("text") if kind is EventKind.NARRATIVE else None
            if text is None:
                text = to_jsonable(event.to_dict())
            self.console.print(f"{kind.value} {where(event)}: {text}")
        elif v >= 3:
            table = event.payload.get("table")
            if isinstance(table, str):
                self.console.print(table)
            else:
                self.console.print(f"{kind.value}: {to_jsonable(event.to_dict())}")

    def flush(self) -> None:
        self.console.file.flush()

    def close(self) -> None:
        if self.routine:
            counts = ", ".join(f"{d} x{n}" for d, n in sorted(self.routine.items()))
            self.console.print(f"routine anomalies not shown ({counts}): expected in a normal run; "
                               "every one is in the telemetry (verbosity 1 prints them)", style="dim",
                               highlight=False)
            self.routine = {}
        self.flush()


class JsonlBackend:
    """One JSON object per line; rotates ``path`` -> ``path.1`` ... ``path.<backups>`` at ``max_bytes``."""

    name = "jsonl"

    def __init__(self, path: str | Path, max_bytes: int = 50 * 2**20, backups: int = 3) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if backups < 0:
            raise ValueError("backups must be >= 0")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = self.path.open("a", encoding="utf-8")
        self._size = self.path.stat().st_size

    def _rotate(self) -> None:
        self._file.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            oldest = self.path.with_name(f"{self.path.name}.{self.backups}")
            oldest.unlink(missing_ok=True)
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    src.rename(self.path.with_name(f"{self.path.name}.{i + 1}"))
            self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        self._file = self.path.open("a", encoding="utf-8")
        self._size = 0

    def emit(self, event: TelemetryEvent) -> None:
        line = json.dumps(to_jsonable(event.to_dict()), allow_nan=False) + "\n"
        data_len = len(line.encode("utf-8"))
        with self._lock:
            if self._size > 0 and self._size + data_len > self.max_bytes:
                self._rotate()
            self._file.write(line)
            self._size += data_len

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()


class TensorBoardBackend:
    """Scalars and histograms through ``torch.utils.tensorboard.SummaryWriter``.

    EPOCH payloads: [N] arrays give ``<key>/mean`` plus ``<key>/env<i>`` for the first
    ``max_env_scalars`` envs; larger arrays give a histogram. Other events: numeric payload
    entries as scalars under ``<kind>/<key>``; anomalies as text.
    """

    name = "tensorboard"

    def __init__(self, logdir: str | Path, max_env_scalars: int = 8) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "the tensorboard backend needs the 'tensorboard' package "
                "(pip install tensorboard, or the project's [dev] extra)"
            ) from err
        self.writer = SummaryWriter(log_dir=str(logdir))
        self.max_env_scalars = max_env_scalars

    def emit(self, event: TelemetryEvent) -> None:
        step = max(event.epoch, 0)
        if event.kind is EventKind.ANOMALY:
            self.writer.add_text("anomaly", json.dumps(to_jsonable(event.to_dict())), step)
            return
        prefix = "" if event.kind is EventKind.EPOCH else f"{event.kind.value}/"
        for key, value in flat_items(event.payload):
            arr = np.asarray(value)
            if arr.dtype.kind not in "biuf" or arr.size == 0:
                continue
            arr = arr.astype(np.float64)
            tag = f"{prefix}{key}"
            if arr.ndim == 0:
                self.writer.add_scalar(tag, float(arr), step)
            elif arr.ndim == 1 and event.kind is EventKind.EPOCH:
                self.writer.add_scalar(f"{tag}/mean", finite_mean(arr), step)
                for i in range(min(arr.shape[0], self.max_env_scalars)):
                    self.writer.add_scalar(f"{tag}/env{i}", float(arr[i]), step)
            else:
                finite = arr[np.isfinite(arr)]
                if finite.size:
                    self.writer.add_histogram(tag, finite, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_backends(
    names: list[str] | str,
    *,
    run_dir: str | Path = "runs/latest",
    verbosity: int = 1,
    jsonl_max_bytes: int = 50 * 2**20,
    jsonl_backups: int = 3,
    prometheus_port: int = 9464,
) -> list[Backend]:
    """Backends from CLI names (a list or ``"console,jsonl,tensorboard"``).

    JSONL goes to ``<run_dir>/telemetry.jsonl``, TensorBoard to ``<run_dir>/tensorboard``, W&B
    (offline unless ``WANDB_MODE`` is set) to ``<run_dir>/wandb``; Prometheus serves ``http://127.0.0.1:<prometheus_port>/metrics`` while the run lasts.
    """
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    cleaned = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in cleaned if n not in BACKEND_NAMES]
    if unknown:
        raise ValueError(
            f"unknown telemetry backend(s) {unknown}; choose from {list(BACKEND_NAMES)}"
        )
    run = Path(run_dir)
    out: list[Backend] = []
    for name in dict.fromkeys(cleaned):
        if name == "console":
            out.append(ConsoleBackend(verbosity=verbosity))
        elif name == "jsonl":
            out.append(JsonlBackend(run / "telemetry.jsonl", jsonl_max_bytes, jsonl_backups))
        elif name == "prometheus":
            from esper.nissa.prometheus import PrometheusBackend

            out.append(PrometheusBackend(prometheus_port))
        elif name == "wandb":
            from esper.nissa.wandb_backend import WandbBackend

            out.append(WandbBackend(run))
        else:
            out.append(TensorBoardBackend(run / "tensorboard"))
    return out
