"""Live metrics: /metrics answers over HTTP while a run trains, with the listed series."""

from __future__ import annotations

import re
import urllib.request

from tiny_config import TINY

from esper.simic.cli import make_hub
from esper.simic.config import TrainingConfig, merge_config
from esper.simic.env import MorphogeneticEnv
from esper.simic.runner import EpisodeRunner
from esper.tamiyo.policies import make_policy


def _value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"{series} missing from /metrics"
    return float(match.group(1))


def test_metrics_are_served_during_a_run() -> None:
    cfg = TrainingConfig.from_dict(merge_config(TINY, {
        "episode": {"length": 4, "envs": 2},
        "telemetry": {"backends": ["prometheus"], "prometheus_port": 0}}))
    scraped: dict[int, str] = {}
    with make_hub(cfg) as hub:
        (backend,) = hub.backends
        env = MorphogeneticEnv(cfg, hub=hub)

        def scrape(epoch: int, snap: dict) -> None:
            hub.flush()  # the hub's worker has handed this epoch's events to the backend
            with urllib.request.urlopen(f"http://127.0.0.1:{backend.port}/metrics", timeout=5) as r:
                scraped[epoch] = r.read().decode()
            scraped[-epoch] = snap

        env.pipeline.callbacks.append(scrape)
        EpisodeRunner(env, make_policy("heuristic", env, cfg), hub=hub).run(1)
    mid = scraped[2]  # while the episode was still running
    snap = scraped[-2]
    for i in range(2):
        assert _value(mid, f'esper_val_accuracy{{env="{i}"}}') == float(snap["signals.val_acc"][i])
    assert _value(mid, "esper_epochs_total") == 2.0 and _value(mid, "esper_epoch") == 2.0
    stages = sum(_value(mid, f'esper_seed_stage_count{{stage="{s}"}}') for s in ("dormant", "germinated", "training",
                                                                                 "blending", "shadowing"))
    assert stages <= 2 * len(env.slots) and _value(mid, 'esper_seed_stage_count{stage="dormant"}') >= 0
    assert _value(mid, "esper_env_epochs_per_second") > 0
    end = scraped[4]
    assert _value(end, "esper_epochs_total") == 4.0
    assert "# TYPE esper_anomalies_total counter" in end and _value(end, "esper_episodes_total") == 2.0


def test_ppo_rounds_and_anomalies_become_series() -> None:
    from esper.leyline import AnomalyEvent, EventKind, TelemetryEvent
    from esper.nissa.prometheus import PrometheusBackend

    backend = PrometheusBackend(port=0)
    try:
        backend.emit(TelemetryEvent(kind=EventKind.PPO_UPDATE, epoch=3, payload={
            "round": 3, "mean_return": 1.5, "kl": 0.02, "clip_fraction": 0.1, "explained_variance": 0.8,
            "test_acc": 71.0, "entropy": {"op": 0.25, "slot": 0.5}}))
        backend.emit(AnomalyEvent(kind=EventKind.ANOMALY, detector="ratio", severity="warning", message="m"))
        with urllib.request.urlopen(f"http://127.0.0.1:{backend.port}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        backend.close()
    assert _value(text, 'esper_ppo{stat="kl"}') == 0.02
    assert _value(text, 'esper_ppo{stat="explained_variance"}') == 0.8
    assert _value(text, 'esper_ppo_entropy{head="op"}') == 0.25
    assert _value(text, 'esper_anomalies_total{detector="ratio",severity="warning"}') == 1.0


def test_a_port_in_use_is_refused_before_any_work(tmp_path, capsys) -> None:
    import json
    import socket

    from esper import evaluate

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "c.json"
        cfg.write_text(json.dumps({**TINY, "telemetry": {"prometheus_port": port}}))
        out = tmp_path / "r.json"
        rc = evaluate.main(["--policies", "static", "--config", str(cfg), "--backends", "prometheus",
                            "--json", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert err == [f"error: port {port} cannot be served (Address already in use) (telemetry.prometheus_port); "
                   "a free local port, or 0 for any"]
