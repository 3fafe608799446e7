"""Issue 14 item 6: CUDA by default when the machine has it, ``--device cpu`` to force the CPU.

The config keeps ``auto`` as written (so configs and checkpoints move between machines) and
the device is resolved where the run's tensors are made. Availability is patched here, so
both sides of each rule are checked on any machine.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from tiny_config import TINY

import esper.device
from esper import train
from esper.device import resolve_device
from esper.simic.cli import add_common_args, build_config
from esper.simic.config import TrainingConfig
from esper.simic.env import load_config_task
from esper.simic.errors import UsageError
from esper.simic.preflight import check_device


@pytest.fixture
def cuda_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(esper.device, "cuda_default", lambda: True)


def test_default_is_auto_and_resolves_to_cuda_when_present(cuda_present) -> None:
    cfg = TrainingConfig()
    assert cfg.device == "auto"
    assert resolve_device(cfg.device) == torch.device("cuda")
    assert resolve_device(None) == torch.device("cuda")


def test_auto_is_the_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(esper.device, "cuda_default", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    task = load_config_task(TrainingConfig.from_dict(TINY))
    assert task.device == torch.device("cpu")


def test_device_cpu_forces_the_cpu(cuda_present) -> None:
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    args = parser.parse_args(["--device", "cpu"])
    cfg = build_config(args)
    assert cfg.device == "cpu"
    assert resolve_device(cfg.device) == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # explicit names pass through


def test_saved_configs_keep_their_device() -> None:
    """A config saved with the default reloads as ``auto``; one saved before (``cpu``) as cpu."""
    saved = TrainingConfig.from_dict(TINY).model_dump(mode="json")
    assert saved["device"] == "auto"
    assert TrainingConfig.from_dict(saved).device == "auto"
    old = {**saved, "device": "cpu"}
    assert resolve_device(TrainingConfig.from_dict(old).device) == torch.device("cpu")


def test_preflight_refuses_cuda_without_it(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_device("auto")  # always available
    check_device("cpu")
    with pytest.raises(UsageError, match="CUDA is not available on this machine"):
        check_device("cuda")
    with pytest.raises(UsageError, match="unknown device 'gpu'"):
        check_device("gpu")
    code = train.main(["--policy", "heuristic", "--device", "cuda", "--envs", "2", "--backends", "none"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: CUDA is not available on this machine (--device); cpu" in err
