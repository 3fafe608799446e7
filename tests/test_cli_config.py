"""Building the run config from preset, file and flags: only user-set values count as set;
a policy's settings are checked only when that policy runs."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from esper.simic.cli import add_common_args, build_config
from esper.simic.config import TrainingConfig
from esper.simic.errors import ConfigError
from esper.simic.presets import PRESETS
from esper.tamiyo.baselines import StaticPolicy
from esper.tamiyo.policies import make_policy


def args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_common_args(p)
    return p.parse_args(list(argv))


def test_short_episode_with_the_default_preset_is_accepted() -> None:
    for length in (1, 4, 16):
        cfg = build_config(args("--episode-length", str(length)))
        assert cfg.episode.length == length
        assert cfg.fixed.epochs == (4, 10, 16)  # the default schedule, unset: not checked
        assert "epochs" not in cfg.fixed.model_fields_set
        assert cfg.check_for("fixed") is cfg


def test_a_schedule_the_user_wrote_is_still_checked(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"fixed": {"epochs": [2, 9]}}))
    cfg = build_config(args("--config", str(path), "--episode-length", "8"))
    assert cfg.fixed.epochs == (2, 9) and cfg.episode.length == 8
    with pytest.raises(ConfigError, match=r"fixed.epochs \[9\] are not below episode.length \(8\)"):
        cfg.check_for("fixed")


def test_ppo_run_is_not_refused_for_a_heuristic_setting() -> None:
    # The ppo preset's heuristic.warmup_epochs is 1: a 1-epoch PPO episode is fine.
    cfg = build_config(args("--preset", "ppo", "--episode-length", "1"))
    assert cfg.episode.length == 1 and cfg.heuristic.warmup_epochs == 1
    assert cfg.check_for("ppo") is cfg
    with pytest.raises(ConfigError, match=r"heuristic.warmup_epochs \(1\) must be below episode.length \(1\)"):
        cfg.check_for("heuristic")
    env = SimpleNamespace(n=2, blueprint_names=("norm", "conv_small"), device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="warmup_epochs"):  # the factory checks the policy it builds
        make_policy("heuristic", env, cfg)
    assert isinstance(make_policy("static", env, cfg), StaticPolicy)


def test_preset_applies_under_the_config_file(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("episode:\n  length: 5\nkasmina:\n  batch_size: 32\n")
    cfg = build_config(args("--preset", "ppo", "--config", str(path)))
    ppo = PRESETS["ppo"]
    assert cfg.episode.length == 5 and cfg.kasmina.batch_size == 32  # the file wins
    assert cfg.episode.envs == ppo["episode"]["envs"] == 16  # the preset fills in the rest
    assert cfg.task.image_size == ppo["task"]["image_size"] == 12
    assert list(cfg.kasmina.blueprints) == ppo["kasmina"]["blueprints"]
    plain = build_config(args("--config", str(path)))  # default preset: the file alone
    assert plain.task.image_size == 16 and plain.episode.envs == 8


def test_updated_keeps_defaults_unset() -> None:
    cfg = TrainingConfig().updated(episode={"length": 3})
    assert cfg.episode.length == 3 and "epochs" not in cfg.fixed.model_fields_set
    assert cfg.check_for("fixed") is cfg
    again = cfg.updated(ppo={"rounds": 2})
    assert again.episode.length == 3 and again.ppo.rounds == 2 and again.ppo.lr == 3e-4
    with pytest.raises(ConfigError, match="unknown config section"):
        cfg.updated(bogus={"x": 1})


def test_minibatch_envs_follows_fewer_envs() -> None:
    cfg = build_config(args("--preset", "ppo", "--envs", "2"))
    assert cfg.episode.envs == 2 and cfg.ppo.minibatch_envs == 2
    assert cfg.check_for("ppo") is cfg
