"""Telemetry event types: what subsystems tell Nissa. Plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class EventKind(StrEnum):
    EPOCH = "epoch"
    LIFECYCLE = "lifecycle"
    DECISION = "decision"
    EPISODE = "episode"
    PPO_UPDATE = "ppo_update"
    ANOMALY = "anomaly"
    NARRATIVE = "narrative"
    ANALYTICS = "analytics"
    RUN = "run"
    HINDSIGHT = "hindsight"
    HELDOUT = "heldout"  # the controller vs the heuristic on held-out hosts, per PPO round


@dataclass(slots=True)
class TelemetryEvent:
    """Base event: a kind, the env it concerns (-1: the whole run), an epoch and a payload."""

    kind: EventKind
    env: int = -1
    epoch: int = -1
    payload: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "env": self.env,
            "epoch": self.epoch,
            "payload": dict(self.payload),
        }


@dataclass(slots=True)
class LifecycleEvent(TelemetryEvent):
    """A seed changed stage in one slot of one env."""

    slot: str = ""
    blueprint: str = ""
    from_stage: str = ""
    to_stage: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "env": self.env,
            "epoch": self.epoch,
            "payload": dict(self.payload),
            "slot": self.slot,
            "blueprint": self.blueprint,
            "from_stage": self.from_stage,
            "to_stage": self.to_stage,
        }


@dataclass(slots=True)
class DecisionEvent(TelemetryEvent):
    """The controller's choice for one env this epoch, with its reason."""

    action: str = ""
    accepted: bool = True
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "env": self.env,
            "epoch": self.epoch,
            "payload": dict(self.payload),
            "action": self.action,
            "accepted": self.accepted,
            "reason": self.reason,
        }


@dataclass(slots=True)
class AnomalyEvent(TelemetryEvent):
    """Something that looks wrong; ``severity`` in {info, warning, severe}."""

    detector: str = ""
    severity: str = "warning"
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "env": self.env,
            "epoch": self.epoch,
            "payload": dict(self.payload),
            "detector": self.detector,
            "severity": self.severity,
            "message": self.message,
        }


EVENT_TYPES: tuple[type[TelemetryEvent], ...] = (
    TelemetryEvent,
    LifecycleEvent,
    DecisionEvent,
    AnomalyEvent,
)
