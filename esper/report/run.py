"""A run's telemetry events gathered into what the report draws, on a run-wide epoch axis.

Every epoch event is one *step* (1, 2, ...) of the run: episodes restart their own epoch count,
and an evaluation runs several policies one after another, so the step, not the event's
``epoch``, orders the picture. Events an epoch produces (lifecycle, decisions, episode ends,
anomalies) follow its epoch event in the file and belong to its step; the governor's rollback
events come just before the epoch they concern and are placed on it.

A run directory reused by a later run holds both in one file: a ``run`` event (or an env count
that changes) starts over, and the report shows the latest run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

# The epoch payload keys the report reads (the rest stay in the file).
EPOCH_KEYS = ("signals.val_acc", "signals.train_acc", "signals.stage", "signals.epoch", "episode",
              "signals.params_added", "reward")
REWARD_PREFIX = "reward_components."
_GERMINATE = re.compile(r"germinate\((?P<bp>[^@]+)@(?P<slot>[^,)]+)")
_SLOT_OP = re.compile(r"^[a-z_]+\((?P<slot>[^)@,]+)\)$")


@dataclass(slots=True)
class Lifecycle:
    step: int
    env: int
    slot: str
    blueprint: str
    to_stage: str
    payload: dict[str, Any]


@dataclass(slots=True)
class Anomaly:
    step: int
    env: int
    epoch: int
    detector: str
    severity: str
    message: str
    action: str  # "rollback" for a governor action, else ""


@dataclass
class RunData:
    """Everything the report shows, appended to as the file grows (:meth:`add`)."""

    config: dict[str, Any] | None = None
    earlier_runs: int = 0  # runs before the latest one in the same files
    epochs: list[dict[str, np.ndarray]] = field(default_factory=list)
    lifecycle: list[Lifecycle] = field(default_factory=list)
    episodes: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    ppo: list[dict[str, Any]] = field(default_factory=list)
    heldout: list[dict[str, Any]] = field(default_factory=list)  # controller vs heuristic, per round
    parts: list[int] = field(default_factory=list)  # steps where a later part (policy) begins
    slot_names: dict[int, str] = field(default_factory=dict)
    events: int = 0
    _part_ended: bool = False

    @property
    def steps(self) -> int:
        return len(self.epochs)

    @property
    def n_envs(self) -> int:
        return int(self.epochs[-1]["signals.val_acc"].shape[0]) if self.epochs else 0

    @property
    def n_slots(self) -> int:
        return int(self.epochs[-1]["signals.stage"].shape[1]) if self.epochs else 0

    def slot_name(self, k: int) -> str:
        return self.slot_names.get(k, f"slot {k}")

    def series(self, key: str) -> np.ndarray:
        """``[steps, N, ...]`` float array of one epoch key (NaN where an epoch lacks it)."""
        rows = [e.get(key) for e in self.epochs]
        shape = next((r.shape for r in rows if r is not None), (self.n_envs,))
        return np.stack([r.astype(np.float64) if r is not None else np.full(shape, np.nan) for r in rows]) \
            if rows else np.zeros((0, *shape))

    def reward_keys(self) -> list[str]:
        keys = self.epochs[-1].keys() if self.epochs else ()
        return sorted(k[len(REWARD_PREFIX):] for k in keys if k.startswith(REWARD_PREFIX))

    # ------------------------------------------------------------------------- input
    def add(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self.events += 1
            handler = getattr(self, f"_on_{event.get('kind')}", None)
            if handler is not None:
                handler(event)

    def _restart(self) -> None:
        """Drop what was gathered: a later run starts in the same files."""
        fresh = RunData(config=self.config, earlier_runs=self.earlier_runs + 1, events=self.events)
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))

    def _on_run(self, event: dict[str, Any]) -> None:
        if self.epochs or self.ppo:
            self._restart()
        self.config = event.get("payload", {}).get("config", event.get("payload"))

    def _on_epoch(self, event: dict[str, Any]) -> None:
        payload = event.get("payload", {})
        row = {k: np.asarray(payload[k], dtype=np.float64) for k in EPOCH_KEYS if payload.get(k) is not None}
        row |= {k: np.asarray(v, dtype=np.float64) for k, v in payload.items()
                if k.startswith(REWARD_PREFIX) and v is not None}
        row |= {k: np.asarray(payload[k]) for k in ("action.slot",) if k in payload}
        if "signals.val_acc" not in row or "signals.stage" not in row:
            return
        if self.epochs and row["signals.stage"].shape != self.epochs[-1]["signals.stage"].shape:
            self._restart()  # another run in the same file, with a different env or slot count
        if self._part_ended:
            self.parts.append(self.steps + 1)
            self._part_ended = False
        self.epochs.append(row)

    def _on_lifecycle(self, event: dict[str, Any]) -> None:
        self.lifecycle.append(Lifecycle(step=self.steps, env=int(event.get("env", -1)), slot=str(event.get("slot", "")),
                                        blueprint=str(event.get("blueprint", "")),
                                        to_stage=str(event.get("to_stage", "")), payload=event.get("payload", {})))

    def _on_episode(self, event: dict[str, Any]) -> None:
        self.episodes.append((self.steps, event.get("payload", {})))

    def _on_ppo_update(self, event: dict[str, Any]) -> None:
        self.ppo.append(event.get("payload", {}))

    def _on_heldout(self, event: dict[str, Any]) -> None:
        self.heldout.append(event.get("payload", {}))

    def _on_analytics(self, event: dict[str, Any]) -> None:
        self._part_ended = True  # a runner finished; more epochs are another policy's

    def _on_anomaly(self, event: dict[str, Any]) -> None:
        env, epoch = int(event.get("env", -1)), int(event.get("epoch", -1))
        step = self.steps
        if env >= 0 and self.epochs:  # the governor reports before the epoch it judged is written
            last = self.epochs[-1]["signals.epoch"]
            if env < last.shape[0] and int(last[env]) != epoch:
                step += 1
        payload = event.get("payload", {})
        self.anomalies.append(Anomaly(step=step, env=env, epoch=epoch, detector=str(event.get("detector", "")),
                                      severity=str(event.get("severity", "warning")),
                                      message=str(event.get("message", "")),
                                      action=str(payload.get("action", "") or "")))

    def _on_decision(self, event: dict[str, Any]) -> None:
        """Slot names, read off decisions: a decision names the slot whose index the same
        env's epoch row holds (``action.slot``)."""
        if not self.epochs or "action.slot" not in self.epochs[-1]:
            return
        env, text = int(event.get("env", -1)), str(event.get("action", ""))
        slots = self.epochs[-1]["action.slot"]
        if not 0 <= env < slots.shape[0]:
            return
        m = _GERMINATE.search(text) or _SLOT_OP.match(text)
        if m:
            self.slot_names.setdefault(int(slots[env]), m.group("slot").strip())

    # ------------------------------------------------------------------------- views
    def episode_starts(self) -> list[int]:
        """Steps (after the first) where env 0 starts a new episode."""
        if self.steps < 2:
            return []
        ep = self.series("episode")[:, 0]
        epoch = self.series("signals.epoch")[:, 0]
        restart = (np.diff(ep) != 0) | (np.diff(epoch) < 0)
        return [int(i) + 2 for i in np.flatnonzero(restart)]

    def pick_envs(self, k: int) -> list[int]:
        """All envs when there are at most ``k``; else ``k`` spread over the ranking by final
        validation accuracy (worst, ..., median, ..., best), so a large run shows its range."""
        n = self.n_envs
        if n <= k:
            return list(range(n))
        final = self.epochs[-1]["signals.val_acc"]
        order = np.argsort(np.nan_to_num(final, nan=-np.inf), kind="stable")
        return sorted({int(order[round(q)]) for q in np.linspace(0, n - 1, k)})
