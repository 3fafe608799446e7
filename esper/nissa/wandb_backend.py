"""Weights & Biases backend (optional extra ``wandb``): the run's scalars in a W&B run.

Offline unless ``WANDB_MODE`` says otherwise, so a run never waits on a login prompt or the
network (``wandb sync <run_dir>/wandb/offline-run-*`` uploads it later). A W&B that fails never
stops training: a failed ``wandb.init`` or ``log`` raises from :meth:`emit`, and the hub logs
it once, disables the backend after repeated failures and reports the lost events at the end.

What is logged (the TensorBoard backend's choice): epoch events as ``<key>/mean`` over envs
(with the epoch as W&B's step metric), other events' numeric payload entries as
```<kind>/<key>``, the run's configuration as the W&B config, and each env's latest episode
trajectory and anomaly as text in the run summary.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from esper.leyline.events import EventKind, TelemetryEvent
from esper.nissa.scalars import finite_mean, flat_items

DEFAULT_MODE = "offline"


def _scalars(event: TelemetryEvent) -> dict[str, float]:
    prefix = "" if event.kind is EventKind.EPOCH else f"{event.kind.value}/"
    out: dict[str, float] = {}
    for key, value in flat_items(event.payload):
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf" or arr.size == 0:
            continue
        arr = arr.astype(np.float64)
        if arr.ndim == 0:
            out[f"{prefix}{key}"] = float(arr)
        elif arr.ndim == 1 and event.kind is EventKind.EPOCH:
            out[f"{prefix}{key}/mean"] = finite_mean(arr)
    return out


class WandbBackend:
    """Telemetry into one W&B run (``project``, under ``run_dir``); see the module doc."""

    name = "wandb"

    def __init__(self, run_dir: str | Path, project: str = "esper") -> None:
        import wandb  # ImportError: the CLI's preflight refuses --backends wandb without it

        self.wandb = wandb
        self.mode = os.environ.get("WANDB_MODE", DEFAULT_MODE)
        self.error: str | None = None
        self.logged = 0
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=project, dir=str(run_dir), mode=self.mode, settings=wandb.Settings(silent=True))
            self.run.define_metric("epoch")
            self.run.define_metric("*", step_metric="epoch")
        except Exception as err:  # any W&B failure: training goes on without it
            self.run = None
            self.error = f"wandb.init failed: {type(err).__name__}: {err}"

    def emit(self, event: TelemetryEvent) -> None:
        if self.run is None:
            raise RuntimeError(self.error)
        if event.kind is EventKind.RUN and "config" in event.payload:  # the run's config, once
            self.run.config.update(event.payload["config"], allow_val_change=True)
            return
        if event.kind is EventKind.ANOMALY or event.kind is EventKind.EPISODE:
            key = f"{event.kind.value}/env{event.env}/last"
            self.run.summary[key] = str(event.payload.get("trajectory", event.to_dict()))
        data = _scalars(event)
        if data:
            data["epoch"] = max(event.epoch, 0)
            self.run.log(data)
            self.logged += 1

    def flush(self) -> None:
        return None  # W&B's own process writes the run; nothing is buffered here

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
