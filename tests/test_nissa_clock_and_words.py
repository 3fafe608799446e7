"""Nissa fixes: one escalation clock across episodes, reason codes in words, the plateau flag
under the minimal profile, PPO anomalies without an env."""

from __future__ import annotations

import io

import numpy as np
from rich.console import Console

from esper.leyline import REASONS, DecisionEvent, EventKind, Reason
from esper.nissa import (
    AnomalyMonitor,
    ConsoleBackend,
    EscalationState,
    PerformanceDegradationDetector,
    TrainingHistory,
    build_briefs,
    explain_decision,
    load_profile,
)
from esper.nissa.narratives import REASON_TEXT


def test_escalation_works_in_every_episode() -> None:
    """The runner labels epochs per episode (they restart) and begins epochs by a global step;
    escalation must not depend on either numbering."""
    minimal = load_profile("minimal")  # escalates to standard for 2 epochs
    esc = EscalationState(minimal)
    mon = AnomalyMonitor(degradation=PerformanceDegradationDetector(warmup_epochs=2, drop=5.0))
    length, seen = 6, []
    accs = [50.0, 60.0, 70.0, 70.0, 70.0, 40.0]  # a severe drop in the last epoch
    for episode in range(3):
        for epoch in range(1, length + 1):  # per-episode epoch labels
            seen.append((episode, epoch, esc.config_for_next().name))
            acc = accs[epoch - 1] if episode == 1 else 70.0
            events = mon.check_epoch({"metrics.val_accuracy": np.array([acc])}, epoch)
            esc.observe(events, epoch)
        mon.reset_envs(np.array([True]))
    escalated = [(e, t) for e, t, name in seen if name == "standard"]
    assert escalated == [(2, 1), (2, 2)]  # the two epochs after episode 1's severe drop
    assert esc.since_epoch == length and not esc.is_escalated()


def test_every_reason_the_runner_sends_is_put_in_words() -> None:
    assert set(REASON_TEXT) == set(Reason)
    for code, name in enumerate(REASONS):  # the runner sends REASONS[reason]
        d = DecisionEvent(kind=EventKind.DECISION, env=1, epoch=4, action="act", accepted=True, reason=name)
        text = explain_decision(d, [name]).payload["text"]
        assert text.endswith("because " + REASON_TEXT[Reason(code)]), text
    ev = explain_decision(DecisionEvent(kind=EventKind.DECISION, env=0), [Reason.GERMINATE_PLATEAU])
    assert ev.payload["text"].endswith("because validation has plateaued")
    assert ev.payload["reasons"] == ["germinate_plateau"]


def test_plateau_flag_fires_under_the_minimal_profile() -> None:
    history = TrainingHistory(load_profile("minimal").history_length)
    for t in range(10):
        loss = np.array([1.0, 2.0 - 0.1 * t])  # env 0 flat, env 1 still falling
        history.push({"metrics.val_loss": loss}, t)
    b0, b1 = build_briefs({"metrics.val_loss": loss}, history, 9)
    assert b0.red_flags == ["sustained plateau: no loss improvement for 4 epochs"]
    assert b1.red_flags == []


def test_ppo_anomalies_print_without_env() -> None:
    events = AnomalyMonitor().check_ppo_update({"ratio_max": 9.0, "ratio_min": 0.9}, 3)
    assert [e.env for e in events] == [-1] and events[0].payload["scope"] == "ppo_update"
    buf = io.StringIO()
    # verbosity 1: a host env's accuracy drop is routine (counted, not printed, at verbosity 0)
    backend = ConsoleBackend(verbosity=1, console=Console(file=buf, width=200, color_system=None))
    backend.emit(events[0])
    detector = PerformanceDegradationDetector(warmup_epochs=0, drop=0.1)
    detector.update(np.array([0.9, 0.9]), 6)
    (host,) = detector.update(np.array([0.9, 0.2]), 7)  # a host env's anomaly keeps its env
    backend.emit(host)
    lines = buf.getvalue().splitlines()
    assert "env -1" not in buf.getvalue()
    assert lines[0].startswith("ppo update 3 warning: PPO ratio range")
    assert lines[1].startswith("epoch 7 env 1 performance_degradation (routine: ")
    assert "accuracy 0.2000 is 0.7000 below its best" in buf.getvalue()
