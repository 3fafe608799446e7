"""The per-epoch Nissa pipeline of a run: device diagnostics in, host events out.

Before an epoch it tells Kasmina what to capture for the active profile (escalated profiles
included); after it, it turns the captures into the profile's diagnostics on the device
(``DiagnosticTracker``), which ride in the epoch's single ``materialize``; from that host
snapshot it builds the epoch event, narratives, anomaly events, decision explanations and the
blueprint analytics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from esper.kasmina.epoch import MorphogeneticBatch
from esper.kasmina.model import forward_eval
from esper.kasmina.state import as_dicts
from esper.leyline import DecisionEvent, LifecycleEvent, TelemetryEvent
from esper.nissa import (
    AnomalyMonitor,
    BlueprintAnalytics,
    DiagnosticTracker,
    EscalationState,
    TelemetryConfig,
    TrainingHistory,
    build_briefs,
    explain_decision,
)
from esper.nissa.anomaly import PerformanceDegradationDetector
from esper.nissa.diagnostics import (
    INPUT_ACTIVATIONS,
    INPUT_GRADS,
    INPUT_LABELS,
    INPUT_LOGITS,
    INPUT_LOSS_FN,
    INPUT_PARAMS,
)

PREFIX = "diag."
_CAPTURE_FOR_INPUT = {INPUT_GRADS: "grads", INPUT_ACTIVATIONS: "activations", INPUT_LOGITS: "logits"}


def landscape_loss_fn(batch: MorphogeneticBatch, val_rows: int = 256) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """Per-env validation loss ``[N]`` as a function of the host parameters (for sharpness)."""
    st = as_dicts(batch.state)
    names = list(st["host"])
    x = batch.task.prepare(batch.task.val_x[:val_rows])
    y = batch.task.val_y[:val_rows]
    ctrl = batch.controls()

    @torch.no_grad()
    def loss_fn(params: list[torch.Tensor]) -> torch.Tensor:
        logits = forward_eval(batch.arch, dict(zip(names, params, strict=True)), st["buffers"], st["seeds"], ctrl, x,
                             counterfactuals=False)[0]
        k = logits.shape[-1]
        return F.cross_entropy(logits.reshape(-1, k), y.reshape(-1).repeat(batch.n),
                               reduction="none").view(batch.n, -1).mean(1)

    return loss_fn


class EpochTelemetry:
    """Profile-driven diagnostics and the host-side event stream of one run."""

    def __init__(self, profile: TelemetryConfig, batch: MorphogeneticBatch, envs: int | None = None) -> None:
        self.profile = profile
        self.batch = batch
        self.envs = envs if envs is not None else batch.n  # envs reported (the whole run when sharded)
        self.escalation = EscalationState(profile)
        self.history = TrainingHistory(profile.history_length)
        # Accuracies here are in percent points: a drop of 5 points is a warning, 10 severe.
        self.monitor = AnomalyMonitor(degradation=PerformanceDegradationDetector(warmup_epochs=5, drop=5.0))
        self.analytics = BlueprintAnalytics()
        self.tracker = DiagnosticTracker(profile)

    def begin_epoch(self, epoch: int) -> frozenset[str]:
        """Pick this epoch's profile (escalation may raise it) and return Kasmina's captures."""
        self.tracker = DiagnosticTracker(self.escalation.config_for_next())  # its own epoch clock
        need = self.tracker.required_inputs
        return frozenset(_CAPTURE_FOR_INPUT[k] for k in need if k in _CAPTURE_FOR_INPUT)

    def diagnostics(self, signals: TensorDict) -> TensorDict:
        """The active profile's diagnostics for this epoch, on the device (batch ``[N]``), from
        the epoch's signals and the captures it returned (``signals["captured"]``)."""
        b = self.batch
        held = signals.get("captured", None)
        cap = {k: held.get(k) for k in held.keys()} if held is not None else {}  # noqa: SIM118 (TensorDict iterates rows)
        need = self.tracker.required_inputs
        kwargs: dict[str, object] = {}
        if INPUT_GRADS in need:
            kwargs["grads"] = {k[len("grad."):]: v for k, v in cap.items() if k.startswith("grad.")}
        if INPUT_ACTIVATIONS in need:
            kwargs["activations"] = [cap[k] for k in sorted(k for k in cap if k.startswith("act."))]
            kwargs["activation_env_dim"] = 0
        if INPUT_LOGITS in need or INPUT_LABELS in need:
            kwargs["logits"], kwargs["labels"] = cap["val_logits"], b.task.val_y.reshape(-1)
        if INPUT_PARAMS in need:
            kwargs["params"] = list(b.state["host"].values())
        if INPUT_LOSS_FN in need:
            kwargs["loss_fn"] = landscape_loss_fn(b)
        metrics = {
            "train_loss": signals["train_loss"],
            "train_accuracy": signals["train_acc"],
            "val_loss": signals["val_loss"],
            "val_accuracy": signals["val_acc"],
        }
        return self.tracker.collect(metrics=metrics, **kwargs)

    @staticmethod
    def host_view(snap: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The diagnostics part of a materialized packet, with Nissa's own key names."""
        return {k[len(PREFIX):]: v for k, v in snap.items() if k.startswith(PREFIX)}

    def epoch_events(self, diag: Mapping[str, np.ndarray], epoch: int, free_slots: np.ndarray) -> list[TelemetryEvent]:
        """Per-env narratives and anomaly events (which may escalate the profile)."""
        self.history.push(diag, epoch)
        events: list[TelemetryEvent] = []
        anomalies = self.monitor.check_epoch(diag, epoch)
        self.escalation.observe(anomalies, epoch)
        events += anomalies
        self.briefs = build_briefs(diag, self.history, epoch, free_slots=free_slots)
        events += [brief.to_event() for brief in self.briefs]
        return events

    def episode_restarted(self, mask: np.ndarray) -> None:
        """Envs in ``mask`` start fresh hosts: their anomaly baselines start over."""
        self.monitor.reset_envs(mask)

    def explain(self, decision: DecisionEvent, reason: str) -> TelemetryEvent:
        brief = self.briefs[decision.env] if decision.env < len(self.briefs) else None
        return explain_decision(decision, [reason] if reason else [], brief)

    def lifecycle(self, event: LifecycleEvent, fossilized_envs: list[int]) -> None:
        self.analytics.record(event)
        if fossilized_envs:
            self.history.mark_fossilized(fossilized_envs, self.envs)
