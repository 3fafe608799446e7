"""Every telemetry profile's features reach its JSONL output, and disabled ones do not."""

from __future__ import annotations

import json

import pytest
from tiny_config import TINY as SHARED_TINY

from esper.nissa import JsonlBackend, NissaHub, load_profile
from esper.simic.config import TrainingConfig
from esper.simic.env import MorphogeneticEnv
from esper.simic.runner import EpisodeRunner
from esper.tamiyo.policies import make_policy

TINY = {
    **SHARED_TINY,
    "task": {"train_size": 128, "val_size": 64},
    "kasmina": {"batch_size": 64, "blueprints": ["norm", "conv_small"]},
    "episode": {"length": 2, "envs": 2, "episodes": 1},
}

# Feature group -> a key it must produce in the epoch payload.
FEATURES = {
    "gradients": "diag.gradients.nonfinite",
    "gradient_norm": "diag.gradients.total_norm",
    "percentiles": "diag.gradients.percentiles",
    "histogram": "diag.gradients.histogram",
    "per_class": "diag.per_class.accuracy",
    "confusion": "diag.per_class.confusion",
    "landscape": "diag.landscape.sharpness",
    "weights": "diag.weights.norm",
    "activations": "diag.activations.mean",
}


def _enabled(profile) -> set[str]:
    g, pc = profile.gradients, profile.per_class
    on = set()
    if g.enabled:
        on.add("gradients")
        if g.track_norm:
            on.add("gradient_norm")
        if g.percentiles:
            on.add("percentiles")
        if g.full_histogram:
            on.add("histogram")
    if pc.enabled and pc.track_accuracy:
        on.add("per_class")
    if pc.enabled and pc.track_confusion:
        on.add("confusion")
    if profile.loss_landscape.enabled and profile.loss_landscape.estimate_sharpness:
        on.add("landscape")
    if profile.track_weight_norms:
        on.add("weights")
    if profile.track_activation_stats:
        on.add("activations")
    return on


@pytest.mark.parametrize("name", ["minimal", "standard", "diagnostic", "research"])
def test_profile_features_in_jsonl(name: str, tmp_path) -> None:
    profile = load_profile(name)
    cfg = TrainingConfig.from_dict(TINY)
    env = MorphogeneticEnv(cfg)
    path = tmp_path / "telemetry.jsonl"
    with NissaHub([JsonlBackend(path)], synchronous=True) as hub:
        policy = make_policy("fixed", env, cfg)
        runner = EpisodeRunner(env, policy, hub=hub, profile=profile)
        runner.run(1)
    epochs = [json.loads(line) for line in path.read_text().splitlines() if json.loads(line)["kind"] == "epoch"]
    assert len(epochs) == 2 and runner.transfers == runner.epochs == 2
    payload = epochs[-1]["payload"]
    on = _enabled(profile)
    for feature, key in FEATURES.items():
        assert (key in payload) == (feature in on), f"{name}: {feature} ({key})"
    assert payload["diag.metrics.val_accuracy"] == payload["signals.val_acc"]
