"""Live metrics: a Nissa backend serving Prometheus' ``/metrics`` while a run trains.

Seed 000 (Nissa review) asks for metrics export for live monitoring. Each backend owns its
registry (two runs in one process never collide) and an HTTP server on a local port
(``telemetry.prometheus_port``; 0 picks a free one, see :attr:`PrometheusBackend.port`).
Series, all prefixed ``esper_``: per-env validation accuracy and train loss, seed stage counts,
epochs and env-epochs per second, episodes and their test accuracy, anomalies by detector and
severity, and each PPO round's return, test accuracy, explained variance, KL, clip fraction and
per-head entropy.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from esper.leyline import EventKind, SeedStage, TelemetryEvent


class PrometheusBackend:
    name = "prometheus"

    def __init__(self, port: int = 9464, addr: str = "127.0.0.1") -> None:
        try:
            import prometheus_client as pc
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise ImportError("the prometheus backend needs the 'prometheus_client' package") from err
        self.registry = pc.CollectorRegistry()
        r = self.registry
        self.val_acc = pc.Gauge("esper_val_accuracy", "validation accuracy (percent) per env", ["env"], registry=r)
        self.train_loss = pc.Gauge("esper_train_loss", "training loss per env", ["env"], registry=r)
        self.stages = pc.Gauge("esper_seed_stage_count", "slots in each seed stage, all envs", ["stage"], registry=r)
        self.epochs = pc.Counter("esper_epochs", "epochs run (all envs step together)", registry=r)
        self.epoch_last = pc.Gauge("esper_epoch", "the latest epoch of the run's envs", registry=r)
        self.rate = pc.Gauge("esper_env_epochs_per_second", "env-epochs per second between epochs", registry=r)
        self.episodes = pc.Counter("esper_episodes", "episodes finished", registry=r)
        self.test_acc = pc.Gauge("esper_episode_test_accuracy", "test accuracy of the latest finished episode",
                                 ["env"], registry=r)
        self.anomalies = pc.Counter("esper_anomalies", "anomaly events", ["detector", "severity"], registry=r)
        self.ppo = pc.Gauge("esper_ppo", "the latest PPO round's statistics", ["stat"], registry=r)
        self.entropy = pc.Gauge("esper_ppo_entropy", "the latest PPO round's entropy per head", ["head"], registry=r)
        self.server, self.thread = pc.start_http_server(port, addr=addr, registry=r)
        self.port = int(self.server.server_port)
        self._last_epoch_time: float | None = None

    def emit(self, event: TelemetryEvent) -> None:
        p = event.payload
        if event.kind is EventKind.EPOCH:
            self._epoch(p, event.epoch)
        elif event.kind is EventKind.EPISODE:
            self.episodes.inc()
            if isinstance(p.get("test_acc"), float) and np.isfinite(p["test_acc"]):
                self.test_acc.labels(env=str(event.env)).set(p["test_acc"])
        elif event.kind is EventKind.ANOMALY:
            d = event.to_dict()
            self.anomalies.labels(detector=d.get("detector", ""), severity=d.get("severity", "")).inc()
        elif event.kind is EventKind.PPO_UPDATE:
            for stat in ("round", "mean_return", "test_acc", "explained_variance", "kl", "clip_fraction",
                         "value_loss", "lr", "fossilized", "params_added"):
                if isinstance(p.get(stat), int | float):
                    self.ppo.labels(stat=stat).set(float(p[stat]))
            for head, value in (p.get("entropy") or {}).items():
                self.entropy.labels(head=head).set(float(value))

    def _epoch(self, p: Mapping[str, Any], epoch: int) -> None:
        acc = np.asarray(p.get("signals.val_acc", []), dtype=np.float64)
        loss = np.asarray(p.get("signals.train_loss", []), dtype=np.float64)
        for i, (a, ell) in enumerate(zip(acc, loss, strict=False)):
            self.val_acc.labels(env=str(i)).set(float(a))
            self.train_loss.labels(env=str(i)).set(float(ell))
        stage = np.asarray(p.get("signals.stage", []))
        if stage.size:
            counts = np.bincount(stage.reshape(-1).astype(np.int64), minlength=len(SeedStage))
            for s in SeedStage:
                self.stages.labels(stage=s.name.lower()).set(int(counts[s]))
        self.epochs.inc()
        self.epoch_last.set(epoch)
        now = time.perf_counter()
        if self._last_epoch_time is not None and now > self._last_epoch_time:
            self.rate.set(acc.size / (now - self._last_epoch_time))
        self._last_epoch_time = now

    def flush(self) -> None:
        return None  # served on demand: nothing is buffered

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
