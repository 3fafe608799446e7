"""One controller trained over several settings: shared networks, each setting's blueprints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esper.kasmina.blueprints import blueprint_catalogue
from esper.simic.checkpoint import load_checkpoint
from esper.simic.config import TrainingConfig
from esper.simic.errors import ConfigError
from esper.simic.mix import MixedTrainer, read_mix
from esper.train import main as train_main

SMALL = {"kasmina": {"batch_size": 32, "val_batch_size": 32},
         "episode": {"envs": 2, "length": 3},
         "ppo": {"minibatch_envs": 2, "epochs": 1, "hidden_size": 8, "lstm_hidden_size": 8}}


def image_cfg() -> TrainingConfig:
    return TrainingConfig().updated(task={"train_size": 64, "val_size": 32, "test_size": 32, "image_size": 8},
                                    kasmina={**SMALL["kasmina"], "blueprints": ["norm", "conv_small"]},
                                    episode=SMALL["episode"], ppo=SMALL["ppo"])


def lm_cfg() -> TrainingConfig:
    return TrainingConfig().updated(
        task={"name": "grammar", "train_size": 64, "val_size": 32, "test_size": 32, "seq_len": 8},
        kasmina={**SMALL["kasmina"], "host": "lm_small", "blueprints": ["mlp", "block", "lora"],
                 "optimizer": "adamw", "host_lr": 0.003},
        episode=SMALL["episode"], ppo=SMALL["ppo"])


def test_settings_share_one_controller_and_take_turns(tmp_path: Path) -> None:
    mix = MixedTrainer([image_cfg(), lm_cfg()], rounds=2)
    a, b = mix.trainers
    assert a.modules is b.modules and a.optimizer is b.optimizer and a.value_norm is b.value_norm
    assert a.base_env.features.norm is b.base_env.features.norm
    assert a.cfg.ppo.rounds == b.cfg.ppo.rounds == 1  # each setting's schedule spans its share
    before = {k: v.clone() for k, v in a.modules.state_dict().items()}
    mix.train_round()
    cat = blueprint_catalogue()
    assert a.modules.heads.bp_index.tolist() == [cat.index("norm"), cat.index("conv_small")]
    after_image = {k: v.clone() for k, v in a.modules.state_dict().items()}
    assert any(not torch.equal(before[k], after_image[k]) for k in before)
    mix.train_round()  # the language-model setting, with its own blueprint set
    assert b.modules.heads.bp_index.tolist() == [cat.index(n) for n in ("mlp", "block", "lora")]
    assert any(not torch.equal(after_image[k], v) for k, v in a.modules.state_dict().items())
    assert [h["task"] for h in mix.history] == ["synthetic", "grammar"]
    ckpt = load_checkpoint(mix.save(tmp_path / "mix.pt"))
    assert ckpt["round"] == 2 and [c["task"]["name"] for c in ckpt["mix"]] == ["synthetic", "grammar"]


def test_mix_file_is_checked(tmp_path: Path) -> None:
    one = tmp_path / "one.yaml"
    one.write_text("settings:\n  - {preset: ppo}\n")
    with pytest.raises(ConfigError, match="at least 2 settings"):
        read_mix(one)
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("settings:\n  - {preset: ppo}\n  - {task: {seed: 1}}\n")
    with pytest.raises(ConfigError, match=r"settings\[1\] needs a preset"):
        read_mix(nameless)


def test_train_cli_mix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mix = tmp_path / "mix.yaml"
    mix.write_text(
        "settings:\n"
        "  - {preset: default, task: {train_size: 64, val_size: 32, test_size: 32, image_size: 8},"
        " kasmina: {blueprints: [norm, conv_small], batch_size: 32, val_batch_size: 32},"
        " ppo: {hidden_size: 64, lstm_hidden_size: 64}}\n"
        "  - {preset: lm, task: {train_size: 64, val_size: 32, test_size: 32, seq_len: 8},"
        " kasmina: {batch_size: 32, val_batch_size: 32}, ppo: {hidden_size: 64, lstm_hidden_size: 64}}\n")
    differ = tmp_path / "differ.yaml"
    differ.write_text("settings:\n  - {preset: default}\n  - {preset: lm}\n")
    assert train_main(["--mix", str(differ), "--backends", "none"]) == 2
    assert "network widths" in capsys.readouterr().err
    code = train_main(["--mix", str(mix), "--envs", "2", "--episode-length", "3", "--rounds", "2",
                       "--backends", "none", "--run-dir", str(tmp_path / "run"),
                       "--save", str(tmp_path / "c.pt")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "setting 0: task synthetic" in out and "setting 1: task grammar" in out
    assert "no held-out check: a mixed run" in out and "held-out (" not in out and "starting from" not in out
    assert load_checkpoint(tmp_path / "c.pt")["round"] == 2
