"""RL health per PPO round: per-head entropy, value variance, EV, KL, clip fraction, actor and
critic gradient norms, as events and as TensorBoard scalars."""

from __future__ import annotations

import json
import math

import pytest
from tiny_config import TINY

from esper import train

HEALTH = ("kl", "clip_fraction", "explained_variance", "value_variance", "actor_grad_norm", "critic_grad_norm")


def test_ppo_round_reports_rl_health_to_jsonl_and_tensorboard(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    run = tmp_path / "run"
    assert train.main(["--config", str(cfg), "--rounds", "1", "--backends", "jsonl,tensorboard",
                       "--run-dir", str(run), "--save", str(tmp_path / "p.pt")]) == 0
    events = [json.loads(x) for x in (run / "telemetry.jsonl").read_text().splitlines()]
    (update,) = [e for e in events if e["kind"] == "ppo_update"]
    p = update["payload"]
    for key in HEALTH:
        assert math.isfinite(p[key]), key
    assert p["actor_grad_norm"] > 0 and p["critic_grad_norm"] > 0 and p["value_variance"] >= 0
    assert set(p["entropy"]) == {"op", "slot", "blueprint", "tempo"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {f"ppo_update/entropy/{h}" for h in ("op", "slot", "blueprint", "tempo")} <= scalars
    assert {f"ppo_update/{k}" for k in HEALTH} <= scalars
    (op,) = acc.Scalars("ppo_update/entropy/op")
    assert op.value == pytest.approx(p["entropy"]["op"], rel=1e-6)


def test_ratio_drill_names_the_transitions() -> None:
    """When the ratio check fires, one extra transfer names the transitions outside the bounds,
    with their old and new log-probabilities (here the bounds are drawn tight around 1, so
    the first update's own change trips them)."""
    from esper.simic.config import TrainingConfig
    from esper.simic.ppo import PPOTrainer, RoundTelemetry

    trainer = PPOTrainer(TrainingConfig.from_dict(TINY))
    trainer.monitor.ratio_bounds = (1 - 1e-9, 1 + 1e-9)
    events: list = []

    class Hub:
        def emit(self, e) -> None:
            events.append(e)

        def emit_many(self, es) -> None:
            events.extend(es)

        def flush(self) -> None:
            return None

    trainer.hooks.append(RoundTelemetry(Hub()))  # telemetry attaches to the rounds as a hook
    stats = trainer.train_round()
    (debug,) = [e for e in events if getattr(e, "detector", "") == "ratio_debug"]
    rows = debug.payload["transitions"]
    assert 0 < len(rows) <= 8
    n, t = TINY["episode"]["envs"], TINY["episode"]["length"]
    for r in rows:
        assert 0 <= r["env"] < n and 0 <= r["step"] < t and r["action"]
        assert r["ratio"] == pytest.approx(math.exp(r["new_log_prob"] - r["old_log_prob"]), rel=1e-6)
        assert not (1 - 1e-9 <= r["ratio"] <= 1 + 1e-9)
    assert f"env {rows[0]['env']} step {rows[0]['step']}" in debug.message
    assert any("ratio" in a for a in stats.anomalies)
