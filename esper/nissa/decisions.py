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
from esper.nissa.narratives import GATE_REASON_TEXT, EnvBrief

S = SeedStage
_PRESENT = {int(s) for s in LIVE_STAGES} | {int(S.FOSSILIZED)}

GOOD_RULE = (
    "good when validation accuracy after k more epochs (or at the episode's end, if sooner) is at "
    "least what the controller saw when it decided, and a germinated, advanced or fossilized seed "
    "is still present (not culled); a wait or a refused action changed nothing and is judged on "
    "accuracy alone"
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


NO_BRIEF = "first epoch of the episode: no training history yet"


def decision_context(op: int, reason: str, decided: Mapping[str, np.ndarray], slots: Sequence[str],
                     brief: EnvBrief | None = None) -> dict:
    """Seed 003's ``decision_context`` for one env's decision: the ``narrative``, ``red_flags``
    and ``opportunities`` of the epoch the controller decided from (``brief``; None before the
    first epoch of an episode), ``why_this_action`` and ``why_not_alternatives``.

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
    return {
        "narrative": brief.text if brief is not None else NO_BRIEF,
        "red_flags": list(brief.red_flags) if brief is not None else [],
        "opportunities": list(brief.opportunities) if brief is not None else [],
        "why_this_action": why,
        "why_not_alternatives": alternatives,
    }


@dataclass(slots=True)
class _Pending:
    episode: int
    epoch: int
    op: Op
    slot: int
    action: str
    acc_at_decision: float
    accepted: bool
    record: dict | None  # the decision's pack record: its verdict is written into it


class Hindsight:
    """Judges every decision, waits and refused ones included, ``k`` epochs later; the last
    ``k - 1`` epochs' decisions are judged at their episode's end, so none goes unjudged."""

    def __init__(self, n_envs: int, k: int, slots: Sequence[str]) -> None:
        if k < 1:
            raise ValueError(f"hindsight needs k >= 1 epochs, got {k}")
        self.k = k
        self.slots = tuple(slots)
        self.pending: list[list[_Pending]] = [[] for _ in range(n_envs)]

    def record(self, env: int, episode: int, epoch: int, op: int, slot: int, action: str, acc_seen: float,
               accepted: bool = True, record: dict | None = None) -> None:
        """A decision taken before epoch ``epoch`` trained, on ``acc_seen``; ``record`` (a dict)
        receives the verdict under ``"hindsight"`` when it is made."""
        self.pending[env].append(_Pending(episode, epoch, Op(op), slot, action, acc_seen, accepted, record))

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
        acted = p.accepted and p.op is not Op.WAIT  # a wait or a refusal left the slots as they were
        stage = int(snap["signals.stage"][i, p.slot]) if acted else -1
        present = stage in _PRESENT
        good = acc >= p.acc_at_decision and (not acted or p.op is Op.CULL or present)
        payload = {
            "decision_epoch": p.epoch,
            "action": p.action,
            "accepted": p.accepted,
            "epochs_later": later,
            "accuracy_at_decision": p.acc_at_decision,
            f"accuracy_{self.k}_epochs_later": acc,
            "accuracy_delta": acc - p.acc_at_decision,
            "slot": self.slots[p.slot] if acted else None,
            "seed_stage": S(stage).name if acted else None,
            "seed_contribution": float(snap["signals.contribution"][i, p.slot]) if present else None,
            "was_good_decision": bool(good),
            "rule": GOOD_RULE,
        }
        if p.record is not None:
            p.record["hindsight"] = payload
        return TelemetryEvent(kind=EventKind.HINDSIGHT, env=i, epoch=int(snap["signals.epoch"][i]), payload=payload)
