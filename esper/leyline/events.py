"""Telemetry event types: what subsystems tell Nissa. Plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
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
        """The event as plain data, one key per field in declaration order (a subclass's fields
        after the base's): the kind by value, the payload a shallow copy."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["kind"] = self.kind.value
        out["payload"] = dict(self.payload)
        return out


@dataclass(slots=True)
class LifecycleEvent(TelemetryEvent):
    """A seed changed stage in one slot of one env."""

    slot: str = ""
    blueprint: str = ""
    from_stage: str = ""
    to_stage: str = ""


@dataclass(slots=True)
class DecisionEvent(TelemetryEvent):
    """The controller's choice for one env this epoch, with its reason."""

    action: str = ""
    accepted: bool = True
    reason: str = ""


@dataclass(slots=True)
class AnomalyEvent(TelemetryEvent):
    """Something that looks wrong; ``severity`` in {info, warning, severe}."""

    detector: str = ""
    severity: str = "warning"
    message: str = ""


EVENT_TYPES: tuple[type[TelemetryEvent], ...] = (
    TelemetryEvent,
    LifecycleEvent,
    DecisionEvent,
    AnomalyEvent,
)
