"""Narratives and red flags, decision briefs, blueprint analytics, anomalies, escalation, profiler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from esper.leyline.events import DecisionEvent, EventKind, LifecycleEvent
from esper.nissa import (
    AnomalyMonitor,
    BlueprintAnalytics,
    EscalationState,
    GradientDriftDetector,
    PerformanceDegradationDetector,
    TrainingHistory,
    ValueCollapseDetector,
    build_briefs,
    check_lstm_health,
    check_ratio_explosion,
    explain_decision,
    load_profile,
    lstm_hidden_stats,
    phase,
    trace_run,
)


def run_history(losses: np.ndarray, accs: np.ndarray, length: int = 20) -> TrainingHistory:
    h = TrainingHistory(length)
    for t in range(losses.shape[0]):
        h.push({"metrics.val_loss": losses[t], "metrics.val_accuracy": accs[t]}, t)
    return h


def test_briefs_flags_and_opportunities() -> None:
    t = 8
    losses = np.stack(
        [
            np.linspace(2.0, 1.0, t),  # env 0: falling, healthy
            np.r_[np.linspace(2.0, 1.0, 2), np.full(t - 2, 1.0)],  # env 1: plateau
            np.linspace(2.0, 1.0, t),  # env 2: vanishing gradients
            np.linspace(2.0, 1.0, t),  # env 3: NaN gradients
        ],
        axis=1,
    )
    accs = np.full((t, 4), 0.5)
    history = run_history(losses, accs)
    snap = {
        "metrics.val_loss": losses[-1],
        "metrics.val_accuracy": accs[-1],
        "gradients.total_norm": np.array([1.0, 1.0, 1e-9, np.nan]),
        "gradients.nonfinite": np.array([[0, 0], [0, 0], [0, 0], [3, 0]]),
        "gradients.frac_vanishing": np.array([[0, 0], [0, 0.1], [0.9, 1.0], [0, 0]]),
        "gradients.frac_exploding": np.zeros((4, 2)),
    }
    briefs = build_briefs(snap, history, t - 1, free_slots=np.array([1, 2, 1, 1]))
    assert [b.env for b in briefs] == [0, 1, 2, 3]
    b0, b1, b2, b3 = briefs
    assert b0.loss_trend.startswith("falling") and b0.red_flags == []
    assert b0.gradient_health.startswith("healthy") and b0.opportunities == [
        "1 free slot(s) with healthy gradients"
    ]
    assert b1.loss_trend.startswith("flat") or b1.loss_trend.startswith("falling")
    assert any("sustained plateau" in f for f in b1.red_flags)
    assert b1.opportunities == ["2 free slot(s) with healthy gradients: germination candidate"]
    assert any("vanishing" in f for f in b2.red_flags) and b2.opportunities == []
    assert b2.gradient_health.startswith("unhealthy")
    assert any("NaN" in f for f in b3.red_flags) and b3.opportunities == []
    ev = b1.to_event()
    assert ev.kind is EventKind.NARRATIVE and "RED FLAGS" in ev.payload["text"]
    json.dumps(ev.to_dict())


def test_exploding_and_regression_after_fossilization() -> None:
    accs = np.array([[0.5], [0.7], [0.7], [0.6]])
    losses = np.array([[1.0], [0.8], [0.7], [0.75]])
    h = TrainingHistory(10)
    for t in range(3):
        h.push({"metrics.val_loss": losses[t], "metrics.val_accuracy": accs[t]}, t)
    h.mark_fossilized([0], num_envs=1)
    h.push({"metrics.val_loss": losses[3], "metrics.val_accuracy": accs[3]}, 3)
    snap = {"metrics.val_accuracy": accs[3], "gradients.frac_exploding": np.array([[0.0, 0.25]])}
    (b,) = build_briefs(snap, h, 3)
    assert any("regression after fossilization" in f for f in b.red_flags)
    assert any("exploding" in f for f in b.red_flags)


def test_history_is_bounded() -> None:
    h = run_history(np.arange(30.0).reshape(30, 1), np.zeros((30, 1)), length=5)
    assert h.get("metrics.val_loss")[:, 0].tolist() == [25.0, 26.0, 27.0, 28.0, 29.0]
    assert h.epochs == [25, 26, 27, 28, 29]


def test_decision_brief_explains_reason_codes() -> None:
    d = DecisionEvent(kind=EventKind.DECISION, env=2, epoch=7, action="GERMINATE", accepted=True)
    brief = build_briefs({"metrics.val_loss": np.ones(3)}, TrainingHistory(3), 7)[2]
    brief.red_flags.append("sustained plateau")
    ev = explain_decision(d, ["germinate_plateau", "custom_code"], brief)
    text = ev.payload["text"]
    assert "GERMINATE (accepted) because validation has plateaued; custom_code" in text
    assert "context: sustained plateau" in text and ev.env == 2
    refused = explain_decision(
        DecisionEvent(kind=EventKind.DECISION, env=0, action="ADVANCE", accepted=False),
        ["TOO_FEW_EPOCHS"],
    )
    assert "refused" in refused.payload["text"] and "enough epochs" in refused.payload["text"]


def lc(bp: str, to: str, **payload: float) -> LifecycleEvent:
    return LifecycleEvent(
        kind=EventKind.LIFECYCLE, blueprint=bp, to_stage=to, payload=dict(payload)
    )


def test_blueprint_analytics() -> None:
    a = BlueprintAnalytics()
    events = [
        lc("norm", "GERMINATED", params=100, flops=1e3),
        lc("norm", "FOSSILIZED", accuracy_delta=0.02),
        lc("norm", "GERMINATED", params=100, flops=1e3),
        lc("norm", "CULLED", accuracy_delta=-0.01),
        lc("norm", "GERMINATED", params=100, flops=1e3),
        lc("conv_heavy", "GERMINATED", params=74000, flops=5e6),
        lc("conv_heavy", "TRAINING"),
        lc("conv_heavy", "FOSSILIZED", accuracy_delta=0.05),
    ]
    for event in events:  # lifecycle events one by one, as the runner records them
        a.record(event)
    norm, heavy = a.stats["norm"], a.stats["conv_heavy"]
    assert (norm.germinated, norm.fossilized, norm.culled) == (3, 1, 1)
    assert norm.fossilization_rate == 0.5 and norm.mean_acc_delta == pytest.approx(0.005)
    assert norm.mean_params == 100 and heavy.mean_flops == 5e6 and heavy.fossilization_rate == 1.0
    table = a.summary()
    assert "conv_heavy" in table and "norm" in table and "0.50" in table
    ev = a.to_event(epoch=25)
    assert ev.kind is EventKind.ANALYTICS and ev.payload["blueprints"]["norm"]["culled"] == 1
    assert math.isnan(
        BlueprintAnalytics().to_event().payload["blueprints"].get("x", {}).get("r", math.nan)
    )


def test_gradient_drift_ema_bias_correction() -> None:
    d = GradientDriftDetector(beta=0.9, ratio=3.0, warmup=3)
    assert d.update(2.0) == []
    # m1 = 0.1 * 2 = 0.2; bias-corrected 0.2 / (1 - 0.9) = 2.0 exactly
    np.testing.assert_allclose(d.ema, [2.0])
    d.update(4.0)
    # m2 = 0.9 * 0.2 + 0.1 * 4 = 0.58; corrected 0.58 / 0.19
    np.testing.assert_allclose(d.ema, [0.58 / 0.19])
    d.update(3.0)
    assert d.update(3.0) == []  # within ratio
    (ev,) = d.update(50.0, epoch=9)
    assert ev.detector == "gradient_drift" and ev.severity == "warning" and ev.env == -1
    assert ev.payload["ratio"] > 3 and not ev.payload["escalate"]
    (nan_ev,) = d.update(float("nan"))
    assert nan_ev.severity == "severe" and nan_ev.payload["escalate"]


def test_gradient_drift_per_env() -> None:
    d = GradientDriftDetector(beta=0.5, ratio=2.0, warmup=2)
    for _ in range(3):
        assert d.update(np.array([1.0, 1.0, 1.0])) == []
    events = d.update(np.array([1.0, 5.0, 0.1]))
    assert sorted(e.env for e in events) == [1, 2]


def test_performance_degradation_after_warmup() -> None:
    d = PerformanceDegradationDetector(warmup_epochs=3, drop=0.05)
    assert d.update(np.array([0.5, 0.5]), 0) == []
    assert d.update(np.array([0.1, 0.6]), 1) == []  # in warm-up: ignored
    assert d.update(np.array([0.6, 0.6]), 2) == []
    events = d.update(np.array([0.58, 0.42]), 3)
    (ev,) = events
    assert ev.env == 1 and ev.severity == "severe"  # 0.18 > 2 * 0.05
    (ev,) = d.update(np.array([0.53, 0.6]), 4)
    assert ev.env == 0 and ev.severity == "warning"


def test_value_collapse_needs_k_consecutive() -> None:
    d = ValueCollapseDetector(threshold=0.1, patience=3)
    seq = [0.05, 0.0, 0.5, 0.0, -0.2, 0.01, 0.0]
    fired = [i for i, ev in enumerate(seq) if d.update(ev, i)]
    assert fired == [5]
    assert d.update(float("nan"), 7) == []  # NaN counts as below threshold, streak continues


def test_ratio_explosion_and_lstm_health() -> None:
    assert check_ratio_explosion(1.5, 0.7, 0) == []
    (ev,) = check_ratio_explosion(12.0, 0.7, 1)
    assert ev.severity == "warning"
    assert check_ratio_explosion(math.inf, 0.7, 1)[0].severity == "severe"
    h = torch.stack([torch.ones(2, 4), torch.full((2, 4), 1e3), torch.zeros(2, 4)], dim=1)
    h[0, 2, 0] = float("nan")
    st = lstm_hidden_stats(h, h.clone(), env_dim=1)  # [layers=2, N=3, H=4]
    assert st.batch_size == torch.Size([3]) and st["nonfinite"].tolist() == [0, 0, 2]
    events = check_lstm_health(
        st["h_norm"].numpy(), 5, c_norm=st["c_norm"].numpy(), nonfinite=st["nonfinite"].numpy()
    )
    got = sorted((e.env, e.severity) for e in events)
    assert got == [(1, "warning"), (1, "warning"), (2, "severe")]
    (small,) = check_lstm_health(1e-6, 5)
    assert small.env == -1 and "<" in small.message


def test_monitor_and_escalation() -> None:
    mon = AnomalyMonitor(degradation=PerformanceDegradationDetector(warmup_epochs=1, drop=0.05))
    base = load_profile("standard")
    esc = EscalationState(base)
    assert esc.config_for_next().name == "standard"
    for epoch, acc in enumerate([0.5, 0.6, 0.3]):
        events = mon.check_epoch(
            {"metrics.val_accuracy": np.array([acc]), "gradients.total_norm": np.array([1.0])},
            epoch,
        )
        esc.observe(events, epoch)
    assert [e.severity for e in events] == ["severe"]
    names = []
    for _ in range(4):  # the next escalation_epochs (3) epochs run escalated, then standard
        names.append(esc.config_for_next().name)
        esc.observe([], None)
    assert names == ["diagnostic"] * 3 + ["standard"]
    ppo = mon.check_ppo_update(
        {
            "explained_variance": 0.5,
            "ratio_max": 9.0,
            "ratio_min": 0.9,
            "grad_norm": 1.0,
            "lstm_h_norm": 1.0,
        },
        0,
    )
    assert [e.detector for e in ppo] == ["ratio_explosion"]
    assert not EscalationState(load_profile("research")).observe(events, 2)  # nowhere to escalate


def test_profiler_trace_and_phases(tmp_path: Path) -> None:
    with phase("train"):  # no profiler: plain no-op
        torch.ones(2).sum()
    with trace_run(tmp_path, "run1"):
        with phase("train"):
            torch.ones(4).sum()
        with phase("telemetry"):
            torch.ones(4).mul(2)
    trace = json.loads((tmp_path / "run1.trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"train", "telemetry"} <= names
