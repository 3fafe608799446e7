"""The shipped telemetry profiles follow seed 003's schema, or say in a comment why not."""

from __future__ import annotations

from importlib import resources

import pytest

from esper.nissa import load_profile

# Seed 003 ("Rich Telemetry Design"), its profile table: dotted field -> value.
SEED: dict[str, dict[str, object]] = {
    "minimal": {"history_length": 5, "gradients.enabled": False, "per_class.enabled": False,
                "loss_landscape.enabled": False},
    "standard": {"history_length": 10, "gradients.enabled": True, "gradients.layers": ["conv1", "conv2", "fc"],
                 "gradients.track_norm": True, "gradients.track_std": True, "gradients.detect_vanishing": True,
                 "gradients.detect_exploding": True, "per_class.enabled": False, "loss_landscape.enabled": False},
    "diagnostic": {"history_length": 20, "gradients.enabled": True, "gradients.layers": "all",
                   "gradients.percentiles": [1, 25, 50, 75, 99], "gradients.vanishing_threshold": 1e-7,
                   "gradients.exploding_threshold": 1000, "per_class.enabled": True,
                   "per_class.track_accuracy": True, "per_class.track_loss": True,
                   "loss_landscape.enabled": True, "loss_landscape.perturbation_samples": 5,
                   "loss_landscape.estimate_sharpness": True},
    "research": {"history_length": 50, "gradients.enabled": True, "gradients.layers": "all",
                 "gradients.percentiles": [1, 5, 25, 50, 75, 95, 99], "gradients.full_histogram": True,
                 "per_class.enabled": True, "per_class.track_accuracy": True, "per_class.track_loss": True,
                 "per_class.track_confusion": True, "loss_landscape.enabled": True,
                 "loss_landscape.perturbation_samples": 10, "track_weight_norms": True,
                 "track_activation_stats": True},
}


def _get(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", list(SEED))
def test_profile_matches_the_seed_or_explains(name: str) -> None:
    profile = load_profile(name)
    text = (resources.files("esper.nissa") / "profiles" / f"{name}.yaml").read_text()
    comments = [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]
    departures = []
    for key, want in SEED[name].items():
        have = _get(profile, key)
        if have == want or (isinstance(want, list) and list(have) == want):
            continue
        departures.append(key)
        words = {key.split(".")[-1], key.split(".")[0].replace("loss_", "")}
        assert any("seed 003" in c and any(w in c for w in words) for c in comments), (
            f"{name}.{key} is {have!r}, seed 003 says {want!r}, and no comment explains it")
    # The departures are exactly the ones this build makes on purpose (a changed profile
    # must update its comment and this list).
    assert departures == {
        "minimal": [], "standard": ["gradients.layers"],
        "diagnostic": ["loss_landscape.enabled", "loss_landscape.perturbation_samples"],
        "research": ["loss_landscape.perturbation_samples"],
    }[name]
