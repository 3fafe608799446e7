"""The main command end to end on CUDA (skipped without a GPU): PPO rollouts, the update and
evaluation all on the device. The first GPU run found the policy's head-relevance table left
on the CPU while the actions were on CUDA; only a device run catches that class of bug."""

from __future__ import annotations

import json

import pytest
import torch

from esper import train

TINY = {
    "task": {"train_size": 64, "val_size": 32, "test_size": 32, "image_size": 8},
    "kasmina": {"batch_size": 32, "val_batch_size": 32},
    "ppo": {"minibatch_envs": 2, "epochs": 1, "hidden_size": 16, "lstm_hidden_size": 16},
}


@pytest.mark.cuda
def test_main_command_trains_on_cuda(tmp_path, capsys) -> None:
    """Eager here; gpu_check's main_command stage runs the full-size command with --compile."""
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    rc = train.main(["--envs", "2", "--rounds", "2", "--episode-length", "3", "--device", "cuda",
                     "--config", str(cfg), "--backends", "none", "--run-dir", str(tmp_path / "run")])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("round") >= 2 and "test" in out
    ckpt = torch.load(tmp_path / "run" / "ppo.pt", map_location="cpu", weights_only=False)
    assert isinstance(ckpt, dict) and ckpt
