"""Per-env narratives, red flags, opportunities and decision briefs from host values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from esper.leyline import GateReason, Reason, reason_from_name
from esper.leyline.events import DecisionEvent, EventKind, TelemetryEvent

LOSS_KEYS: tuple[str, ...] = ("metrics.val_loss", "metrics.train_loss")
ACC_KEY = "metrics.val_accuracy"

# Human phrasing of the decision reason codes controllers send (``leyline.Reason``; the
# runner reports them by name, ``REASONS[code]``) and of the gates' reason codes.
REASON_TEXT: dict[Reason, str] = {
    Reason.WAIT_WARMUP: "still in warm-up",
    Reason.WAIT_SEED_LIVE: "a seed is still in isolated training or live",
    Reason.WAIT_NO_PLATEAU: "validation has not plateaued",
    Reason.WAIT_COOLDOWN: "a seed was culled recently",
    Reason.WAIT_NO_SLOT: "no slot is free",
    Reason.WAIT_MAX_SEEDS: "the env holds as many seeds as allowed",
    Reason.GERMINATE_PLATEAU: "validation has plateaued",
    Reason.ADVANCE_GATE_PASSED: "its gate passed",
    Reason.CULL_ACC_DROP: "accuracy dropped past the cull threshold",
    Reason.FOSSILIZE_CONTRIBUTION: "its counterfactual contribution is above the threshold",
    Reason.CULL_LOW_CONTRIBUTION: "its counterfactual contribution stayed below the threshold",
    Reason.WAIT_SCHEDULE: "no germination is scheduled this epoch",
    Reason.GERMINATE_SCHEDULE: "the fixed schedule germinates this epoch",
    Reason.RANDOM: "a random legal action was drawn",
    Reason.STATIC: "the static baseline never grows",
}
GATE_REASON_TEXT: dict[GateReason, str] = {
    GateReason.PASSED: "its gate passed",
    GateReason.WRONG_STAGE: "the seed is not in the stage this action needs",
    GateReason.NO_FREE_SLOT: "no slot is free",
    GateReason.TOO_FEW_EPOCHS: "the seed has not spent enough epochs in its stage",
    GateReason.GRADIENT_UNHEALTHY: "seed gradients are unhealthy (NaN or exploding)",
    GateReason.GRADIENT_RATIO_LOW: "seed gradient norm is too small relative to the host",
    GateReason.NO_IMPROVEMENT: "the seed has not improved the host enough",
    GateReason.ALPHA_NOT_REACHED: "blending has not reached full alpha",
    GateReason.REGRESSION: "accuracy regressed while shadowing",
    GateReason.CONTRIBUTION_LOW: "the counterfactual contribution is below the threshold",
    GateReason.EMBARGOED: "the slot is embargoed after a cull",
}


def reason_text(reason: Reason | GateReason | str) -> str:
    """Words for a reason code or its name (``"germinate_plateau"``, either case); an unknown
    name is returned as it is."""
    if isinstance(reason, Reason):
        return REASON_TEXT[reason]
    if isinstance(reason, GateReason):
        return GATE_REASON_TEXT[reason]
    code = reason_from_name(reason)
    if code is not None:
        return REASON_TEXT[code]
    gate = GateReason.__members__.get(reason.strip().upper())
    return GATE_REASON_TEXT[gate] if gate is not None else reason


class TrainingHistory:
    """Ring buffer (``length`` epochs) of per-env scalar metrics, plus fossilization marks."""

    def __init__(self, length: int) -> None:
        if length < 2:
            raise ValueError("history length must be >= 2")
        self.length = length
        self.epochs: list[int] = []
        self.series: dict[str, list[np.ndarray]] = {}
        self.fossil_acc: np.ndarray | None = None

    def push(self, snapshot: Mapping[str, np.ndarray], epoch: int) -> None:
        """Append every ``metrics.*`` leaf and the gradient total norm ([N] arrays)."""
        self.epochs.append(epoch)
        for key, value in snapshot.items():
            arr = np.asarray(value)
            if arr.ndim == 1 and (key.startswith("metrics.") or key == "gradients.total_norm"):
                self.series.setdefault(key, []).append(arr.astype(np.float64))
        self.epochs = self.epochs[-self.length :]
        for key in self.series:
            self.series[key] = self.series[key][-self.length :]

    def get(self, key: str) -> np.ndarray | None:
        """History of ``key`` as [T, N], oldest first."""
        values = self.series.get(key)
        return np.stack(values) if values else None

    def mark_fossilized(self, envs: Sequence[int], num_envs: int) -> None:
        """Remember the latest validation accuracy of ``envs`` as their post-fossilization bar."""
        acc = self.get(ACC_KEY)
        if self.fossil_acc is None or self.fossil_acc.shape[0] != num_envs:
            self.fossil_acc = np.full(num_envs, np.nan)
        if acc is not None:
            for e in envs:
                self.fossil_acc[e] = acc[-1, e]


@dataclass(slots=True)
class EnvBrief:
    """What one env looks like this epoch."""

    env: int
    epoch: int
    loss_trend: str
    gradient_health: str
    red_flags: list[str] = field(default_factory=list)
    opportunities: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        parts = [
            f"env {self.env} epoch {self.epoch}: loss {self.loss_trend}; gradients {self.gradient_health}"
        ]
        if self.red_flags:
            parts.append("RED FLAGS: " + "; ".join(self.red_flags))
        if self.opportunities:
            parts.append("opportunities: " + "; ".join(self.opportunities))
        return ". ".join(parts) + "."

    def to_event(self) -> TelemetryEvent:
        return TelemetryEvent(
            kind=EventKind.NARRATIVE,
            env=self.env,
            epoch=self.epoch,
            payload={
                "text": self.text,
                "loss_trend": self.loss_trend,
                "gradient_health": self.gradient_health,
                "red_flags": list(self.red_flags),
                "opportunities": list(self.opportunities),
            },
        )


@dataclass(slots=True)
class NarrativeRules:
    """Thresholds for the narrative rules."""

    plateau_epochs: int = 5
    plateau_rel_tol: float = 1e-3
    trend_rel_tol: float = 1e-2
    vanishing_frac: float = 0.5
    exploding_frac: float = 0.0
    regression_drop: float = 0.02


def _loss_trend(series: np.ndarray | None, rules: NarrativeRules, k: int) -> tuple[str, bool]:
    """(description, plateaued) for one env's loss history; ``k``: the plateau window."""
    if series is None or series.shape[0] < 2:
        return "not enough history", False
    if not np.all(np.isfinite(series[-1:])):
        return "non-finite", False
    first, last = series[0], series[-1]
    rel = (last - first) / max(abs(first), 1e-12)
    trend = (
        "falling"
        if rel < -rules.trend_rel_tol
        else "rising"
        if rel > rules.trend_rel_tol
        else "flat"
    )
    plateau = False
    if series.shape[0] > k:
        window = series[-(k + 1) :]
        best_before = window[0]
        best_recent = np.nanmin(window[1:])
        plateau = (best_before - best_recent) <= rules.plateau_rel_tol * max(
            abs(best_before), 1e-12
        )
    return f"{trend} ({first:.4g} -> {last:.4g} over {series.shape[0]} epochs)", bool(plateau)


def build_briefs(
    snapshot: Mapping[str, np.ndarray],
    history: TrainingHistory,
    epoch: int,
    *,
    free_slots: np.ndarray | None = None,
    rules: NarrativeRules | None = None,
) -> list[EnvBrief]:
    """One brief per env from a materialized snapshot and the history (push it first).

    ``free_slots`` ([N] ints) enables the "free slot with healthy gradients" opportunity.
    """
    rules = rules or NarrativeRules()
    # The plateau window fits the history the profile keeps (minimal keeps 5 epochs: a window
    # of 4 epochs after a reference one), else the flag could never fire.
    window = max(1, min(rules.plateau_epochs, history.length - 1))
    loss_key = next((k for k in LOSS_KEYS if history.get(k) is not None), None)
    losses = history.get(loss_key) if loss_key else None
    acc = history.get(ACC_KEY)
    sizes = [np.asarray(v).shape[0] for v in snapshot.values() if np.asarray(v).ndim >= 1]
    n = max(sizes) if sizes else 0
    nonfinite = snapshot.get("gradients.nonfinite")
    vanish = snapshot.get("gradients.frac_vanishing")
    explode = snapshot.get("gradients.frac_exploding")
    briefs = []
    for i in range(n):
        flags: list[str] = []
        opps: list[str] = []
        trend, plateau = _loss_trend(losses[:, i] if losses is not None else None, rules, window)
        if plateau:
            flags.append(f"sustained plateau: no loss improvement for {window} epochs")
        latest = [snapshot[k][i] for k in (*LOSS_KEYS, ACC_KEY) if k in snapshot]
        if (nonfinite is not None and np.sum(nonfinite[i]) > 0) or not np.all(np.isfinite(latest)):
            flags.append("NaN/Inf in loss or gradients")
        health = []
        if vanish is not None:
            v = float(np.mean(vanish[i]))
            health.append(f"{v:.0%} vanishing")
            if v > rules.vanishing_frac:
                flags.append(f"vanishing gradients ({v:.0%} of layers' elements)")
        if explode is not None:
            x = float(np.max(explode[i]))
            health.append(f"{x:.0%} exploding")
            if x > rules.exploding_frac:
                flags.append(f"exploding gradients (up to {x:.0%} of a layer's elements)")
        if "gradients.total_norm" in snapshot:
            health.insert(0, f"norm {float(snapshot['gradients.total_norm'][i]):.3g}")
        grad_flags = any(f.startswith(("vanishing", "exploding", "NaN")) for f in flags)
        if health:
            health_text = ("unhealthy: " if grad_flags else "healthy: ") + ", ".join(health)
        else:
            health_text = "not tracked"
        if history.fossil_acc is not None and acc is not None and i < history.fossil_acc.shape[0]:
            bar = history.fossil_acc[i]
            if np.isfinite(bar) and bar - acc[-1, i] > rules.regression_drop:
                flags.append(
                    f"regression after fossilization (accuracy {acc[-1, i]:.4f} < {bar:.4f})"
                )
        if free_slots is not None and free_slots[i] > 0 and health and not grad_flags:
            opps.append(
                f"{int(free_slots[i])} free slot(s) with healthy gradients"
                + (": germination candidate" if plateau else "")
            )
        briefs.append(EnvBrief(i, epoch, trend, health_text, flags, opps))
    return briefs


def explain_decision(
    decision: DecisionEvent, reasons: Sequence[str | Reason], brief: EnvBrief | None = None
) -> TelemetryEvent:
    """Why a decision was taken: reason codes in words, with the env's red flags for context."""
    words = [reason_text(r) for r in reasons] or ["no reason given"]
    verdict = "accepted" if decision.accepted else "refused"
    text = (
        f"env {decision.env} epoch {decision.epoch}: {decision.action} ({verdict}) because "
        + "; ".join(words)
    )
    if brief is not None and brief.red_flags:
        text += " [context: " + "; ".join(brief.red_flags) + "]"
    return TelemetryEvent(
        kind=EventKind.NARRATIVE,
        env=decision.env,
        epoch=decision.epoch,
        payload={
            "text": text,
            "action": decision.action,
            "accepted": decision.accepted,
            "reasons": [r.name.lower() if isinstance(r, Reason) else r for r in reasons],
        },
    )
