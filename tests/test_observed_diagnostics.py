"""Observations that grow with the profile: base features always, diagnostics appended."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_config import TINY

from esper.evaluate import observed_by
from esper.leyline import ObservationSchema
from esper.nissa import load_profile
from esper.simic.checkpoint import load_policy
from esper.simic.config import TrainingConfig, merge_config
from esper.simic.env import MorphogeneticEnv, load_config_task
from esper.simic.ppo import PPOTrainer


def _cfg(observe: str, **extra: dict) -> TrainingConfig:
    return TrainingConfig.from_dict(merge_config(TINY, {"features": {"observe": observe}, **extra}), "test")


@pytest.fixture(scope="module")
def task():
    return load_config_task(TrainingConfig.from_dict(TINY))


def _step(env: MorphogeneticEnv):
    td = env.reset()
    torch.manual_seed(0)
    return env.step(env.rand_action(td))


def test_richer_profiles_append_columns_to_the_minimal_layout(task) -> None:
    envs = {o: MorphogeneticEnv(_cfg(o), task=task) for o in ("minimal", "standard", "diagnostic")}
    base = envs["minimal"].schema
    assert base.extras == ()
    layers = list(envs["minimal"].kasmina.state["host"].keys())
    k = task.num_classes
    grads = tuple(f"grad_log_norm.{x}" for x in layers) + tuple(f"grad_log_std.{x}" for x in layers)
    assert envs["standard"].schema.extras == grads
    diag = envs["diagnostic"].schema.extras
    assert diag == grads + tuple(f"class_acc.{c}" for c in range(k)) + tuple(f"class_loss.{c}" for c in range(k))
    for env in envs.values():  # the minimal layout is a prefix of every richer one
        assert env.schema.names[: base.size] == base.names
        out = _step(env)
        assert out["next", "observation"].shape == (env.n, env.schema.size)


def test_observed_values_match_the_telemetry_diagnostics(task) -> None:
    """The extras are the same numbers Nissa reports for the same epoch (diagnostic profile)."""
    env = MorphogeneticEnv(_cfg("diagnostic"), task=task, profile=load_profile("diagnostic"))
    _step(env)
    snap, idx = env.pipeline.last, env.schema.index
    raw = env.features.raw(env.tracker, env.signals).numpy()
    layers = list(env.kasmina.state["host"].keys())
    norm = np.stack([raw[:, idx[f"grad_log_norm.{x}"]] for x in layers], axis=1)
    np.testing.assert_allclose(np.exp(norm), snap["diag.gradients.norm"], rtol=1e-4)
    acc = np.stack([raw[:, idx[f"class_acc.{c}"]] for c in range(task.num_classes)], axis=1)
    np.testing.assert_allclose(acc, np.nan_to_num(snap["diag.per_class.accuracy"]), atol=1e-6)
    # Per-class accuracies weighted by class counts are the validation accuracy.
    counts = np.bincount(task.val_y.numpy(), minlength=task.num_classes)
    np.testing.assert_allclose((acc * counts).sum(1) / counts.sum(), snap["signals.val_acc"] / 100, atol=1e-5)


def test_extras_are_zero_until_the_first_epoch_and_after_a_reset(task) -> None:
    env = MorphogeneticEnv(_cfg("standard"), task=task)
    e = len(env.schema.extras)
    td = env.reset()
    assert torch.equal(env.tracker["obs_extra"], torch.zeros(env.n, e))
    env.step(env.rand_action(td))
    assert env.tracker["obs_extra"].abs().sum() > 0
    env.reset()
    assert torch.equal(env.tracker["obs_extra"], torch.zeros(env.n, e))


def test_schema_extras_round_trip_and_version_2_reads_as_no_extras() -> None:
    s = ObservationSchema(history_length=2, blueprints=("norm",), extras=("class_acc.0", "class_acc.1"))
    assert ObservationSchema.from_dict(s.to_dict()) == s
    assert s.names[-2:] == ("class_acc.0", "class_acc.1")
    old = {k: v for k, v in ObservationSchema(history_length=2, blueprints=("norm",)).to_dict().items()
           if k not in ("extras", "names")}
    old["version"] = 2
    assert ObservationSchema.from_dict(old).extras == ()
    with pytest.raises(ValueError, match="repeat"):
        ObservationSchema(history_length=2, blueprints=("norm",), extras=("epoch_frac",))


def test_unknown_observe_profile_is_refused() -> None:
    with pytest.raises(Exception, match=r"features\.observe"):
        _cfg("everything")


def test_a_controller_is_evaluated_on_the_observation_it_was_trained_on(task, tmp_path) -> None:
    cfg = _cfg("standard")
    trainer = PPOTrainer(cfg, env=MorphogeneticEnv(cfg, task=task))
    path = trainer.save(tmp_path / "std.pt")
    assert observed_by(f"ppo={path}", _cfg("minimal")).features.observe == "standard"
    assert observed_by("heuristic", _cfg("minimal")).features.observe == "minimal"
    with pytest.raises(Exception, match=r"features.observe.*observe: checkpoint 'standard' != run 'minimal'"):
        load_policy(path, MorphogeneticEnv(_cfg("minimal"), task=task), deterministic=True)
    policy = load_policy(path, MorphogeneticEnv(cfg, task=task), deterministic=True)
    loaded = policy.modules.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trainer.modules.state_dict().items())
