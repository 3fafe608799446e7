"""Decisions explained: why this action, why not the others, and hindsight k epochs later.

Seed 003 asks every decision to carry a ``decision_context`` (why this action, why not the
alternatives) and a ``hindsight`` record (was it good, accuracy k epochs later). Everything
here reads host snapshots the epoch pipeline already made: the signals the controller decided
from (stage, gate results, legal ops) and the later epochs' snapshots. No device access.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from esper.leyline import LIVE_STAGES, EventKind, GateId, Op, SeedStage, TelemetryEvent
from esper.leyline.constants import GateReason
from esper.nissa.narratives import GATE_REASON_TEXT

S = SeedStage
_PRESENT = {int(s) for s in LIVE_STAGES} | {int(S.FOSSILIZED)}

GOOD_RULE = (
    "good when validation accuracy after k more epochs is at least what the controller saw when "
    "it decided, and a germinated, advanced or fossilized seed is still present (not culled)"
)


def _gate_refusals(gate: GateId, stage: np.ndarray, gate_reason: np.ndarray, slots: Sequence[str],
                   holder: SeedStage) -> str:
    """Why ``gate`` refused every slot whose seed is in ``holder`` (or that none is there)."""
    held = np.flatnonzero(stage == int(holder))
    if held.size == 0:
        return f"no seed is in {holder.name}"
    parts = []
    for k in held:
        code = int(gate_reason[k, gate])
        text = GATE_REASON_TEXT.get(GateReason(code), str(code)) if 0 <= code < len(GateReason) else str(code)
        parts.append(f"{slots[k]}: {text}")
    return f"gate {gate.name} refused ({'; '.join(parts)})"


def why_refused(op: Op, stage: np.ndarray, gate_reason: np.ndarray, slots: Sequence[str]) -> str:
    """Why the mask refused ``op`` for one env, from its stages ``[S]`` and gate reasons ``[S, G]``."""
    if op is Op.GERMINATE:
        if not (stage == int(S.DORMANT)).any():
            held = ", ".join(f"{slots[k]} {S(int(stage[k])).name}" for k in range(len(slots)))
            return f"no slot is free ({held})"
        return "no blueprint is allowed"
    if op is Op.ADVANCE:  # offered only from TRAINING (G2); the later moves are automatic
        return _gate_refusals(GateId.G2_BLENDING, stage, gate_reason, slots, S.TRAINING)
    if op is Op.FOSSILIZE:
        return _gate_refusals(GateId.G5_FOSSILIZE, stage, gate_reason, slots, S.PROBATIONARY)
    if op is Op.CULL:
        return "no live seed to cull"
    return "always legal"


def decision_context(op: int, reason: str, decided: Mapping[str, np.ndarray], slots: Sequence[str]) -> dict:
    """``why_this_action`` and ``why_not_alternatives`` for one env's decision.

    ``decided`` holds the env's decision-time ``stage [S]``, ``gate_reason [S, G]``, ``op_mask [5]``
    and, for a learned controller, ``op_probs [5]`` (masked softmax) and ``value``.
    """
    probs = decided.get("op_probs")
    why = reason or "no reason given"
    if probs is not None:
        why = f"policy: p({Op(op).name.lower()}) = {float(probs[op]):.2f}"
        if "value" in decided:
            why += f", value estimate {float(decided['value']):.3f}"
    alternatives: dict[str, str] = {}
    for o in Op:
        if int(o) == op:
            continue
        name = o.name.lower()
        if not bool(decided["op_mask"][int(o)]):
            alternatives[name] = "refused: " + why_refused(o, decided["stage"], decided["gate_reason"], slots)
        elif probs is not None:
            alternatives[name] = f"legal, p = {float(probs[int(o)]):.2f}"
        else:
            alternatives[name] = "legal, not chosen"
    return {"why_this_action": why, "why_not_alternatives": alternatives}


@dataclass(slots=True)
class _Pending:
    episode: int
    epoch: int
    op: Op
    slot: int
    action: str
    acc_at_decision: float


class Hindsight:
    """Judges each accepted lifecycle decision ``k`` epochs later (or at its episode's end)."""

    def __init__(self, n_envs: int, k: int, slots: Sequence[str]) -> None:
        if k < 1:
            raise ValueError(f"hindsight needs k >= 1 epochs, got {k}")
        self.k = k
        self.slots = tuple(slots)
        self.pending: list[list[_Pending]] = [[] for _ in range(n_envs)]

    def record(self, env: int, episode: int, epoch: int, op: int, slot: int, action: str, acc_seen: float) -> None:
        """An accepted non-WAIT decision, taken before epoch ``epoch`` trained, on ``acc_seen``."""
        if op != Op.WAIT:
            self.pending[env].append(_Pending(episode, epoch, Op(op), slot, action, acc_seen))

    def check(self, snap: Mapping[str, np.ndarray], episode: np.ndarray) -> list[TelemetryEvent]:
        """Hindsight events for the decisions whose k epochs are up (or whose episode ended)."""
        out: list[TelemetryEvent] = []
        epoch, done = snap["signals.epoch"], snap["done"]
        for i, queue in enumerate(self.pending):
            if not queue:
                continue
            keep = []
            for p in queue:
                if p.episode != int(episode[i]):
                    continue  # the host was replaced before a verdict: nothing to judge on
                later = int(epoch[i]) - (p.epoch - 1)  # epochs trained since the decision
                if later >= self.k or bool(done[i]):
                    out.append(self._verdict(snap, i, p, later))
                else:
                    keep.append(p)
            self.pending[i] = keep
        return out

    def _verdict(self, snap: Mapping[str, np.ndarray], i: int, p: _Pending, later: int) -> TelemetryEvent:
        acc = float(snap["signals.val_acc"][i])
        stage = int(snap["signals.stage"][i, p.slot])
        present = stage in _PRESENT
        good = acc >= p.acc_at_decision and (p.op is Op.CULL or present)
        payload = {
            "decision_epoch": p.epoch,
            "action": p.action,
            "epochs_later": later,
            "accuracy_at_decision": p.acc_at_decision,
            f"accuracy_{self.k}_epochs_later": acc,
            "accuracy_delta": acc - p.acc_at_decision,
            "slot": self.slots[p.slot],
            "seed_stage": S(stage).name,
            "seed_contribution": float(snap["signals.contribution"][i, p.slot]) if present else None,
            "was_good_decision": bool(good),
            "rule": GOOD_RULE,
        }
        return TelemetryEvent(kind=EventKind.HINDSIGHT, env=i, epoch=int(snap["signals.epoch"][i]), payload=payload)
