"""Principle 4: one device-to-host sync per epoch, counted.

A full epoch of the batched engine (actions, training, counterfactual validation, gates) plus
the telemetry materialization performs exactly one host conversion: the materialize transfer.
The same holds for a torchrl env step driven by the heuristic policy.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from esper.kasmina.epoch import KasminaConfig, MorphogeneticBatch
from esper.kasmina.gates import GateConfig
from esper.leyline import Op
from esper.nissa import DiagnosticTracker, load_profile, materialize
from esper.nissa.syncs import count_host_syncs
from esper.tasks import load_task


@pytest.fixture(scope="module")
def task():
    return load_task("synthetic", train_size=32, val_size=32, seed=2)


def _actions(n: int, op: int) -> TensorDict:
    idx = torch.arange(n)
    return TensorDict(
        {"op": torch.full((n,), int(op)), "slot": idx % 3, "blueprint": idx % 8,
         "tempo": torch.zeros(n, dtype=torch.long)},
        batch_size=[n],
    )  # fmt: skip


def test_engine_epoch_and_materialize_sync_once(task) -> None:
    cfg = KasminaConfig(batch_size=16, val_batch_size=32, gates=GateConfig(min_training_epochs=0))
    mb = MorphogeneticBatch(task, 4, cfg, base_seed=3)
    mb.run_epoch(_actions(4, Op.GERMINATE))  # first epoch outside: lazy setup is not the loop
    with count_host_syncs() as syncs:
        signals = mb.run_epoch(_actions(4, Op.ADVANCE))
        snap = materialize(signals)
    assert syncs.count == 1, syncs.calls
    assert syncs.calls == ["numpy"]
    assert snap["val_acc"].shape == (4,)


def test_epoch_with_standard_telemetry_syncs_once(task) -> None:
    """The standard profile's diagnostics (gradients, per-class) stay on the device too."""
    cfg = KasminaConfig(batch_size=16, val_batch_size=32)
    mb = MorphogeneticBatch(task, 2, cfg, base_seed=4)
    tracker = DiagnosticTracker(load_profile("standard"))
    capture = frozenset({"grads", "logits"})
    mb.run_epoch(_actions(2, Op.GERMINATE), capture=capture)
    with count_host_syncs() as syncs:
        signals = mb.run_epoch(_actions(2, Op.WAIT), capture=capture)
        captured = signals.pop("captured")  # returned by the epoch, not left in an attribute
        grads = {k: captured[k] for k in captured.keys() if k.startswith("grad.")}  # noqa: SIM118
        signals["telemetry"] = tracker.collect(
            metrics={"val_acc": signals["val_acc"]},
            grads=grads,
            logits=captured["val_logits"],
            labels=task.val_y,
        )
        snap = materialize(signals)
    assert syncs.count == 1, syncs.calls
    assert "telemetry.gradients.total_norm" in snap


def test_env_step_with_heuristic_policy_syncs_once(task) -> None:
    from esper.simic.config import TrainingConfig
    from esper.simic.env import MorphogeneticEnv
    from esper.tamiyo.heuristic import HeuristicPolicy

    cfg = TrainingConfig.model_validate(
        {"task": {"train_size": 32, "val_size": 32}, "kasmina": {"batch_size": 16, "val_batch_size": 32},
         "episode": {"envs": 3, "length": 4}, "ppo": {"minibatch_envs": 1},
         "heuristic": {"warmup_epochs": 0}}
    )  # fmt: skip
    env = MorphogeneticEnv(cfg, task=task)
    policy = HeuristicPolicy(cfg.heuristic, env.blueprint_names, env.n, env.device)
    td = env.reset()
    td = env.step(policy(td))["next"]  # warm-up epoch
    with count_host_syncs() as syncs:
        env.step(policy(td))  # the whole pipeline: train, validate, reward, materialize, telemetry
    assert syncs.calls == ["numpy"], syncs.calls
    assert env.pipeline.last["reward"].shape == (3,)
