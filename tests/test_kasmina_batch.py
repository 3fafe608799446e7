"""Kasmina as a batch: env i alone equals env i among others; lifecycles run end to end."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from esper.kasmina.blueprints import BLUEPRINTS, family_blueprints
from esper.kasmina.epoch import KasminaConfig, MorphogeneticBatch
from esper.kasmina.gates import GateConfig
from esper.kasmina.hosts import host_spec
from esper.leyline import Op, SeedStage
from esper.tasks import load_task

S = SeedStage


@pytest.fixture(scope="module")
def task():
    return load_task("synthetic", train_size=256, val_size=128, seed=3)


def _cfg(**kw) -> KasminaConfig:
    kw.setdefault("batch_size", 64)
    kw.setdefault("val_batch_size", 128)
    return KasminaConfig(**kw)


def _actions(op, slot, blueprint, tempo=None) -> TensorDict:
    n = len(op)
    t = torch.tensor
    return TensorDict(
        {
            "op": t(op),
            "slot": t(slot),
            "blueprint": t(blueprint),
            "tempo": t(tempo if tempo is not None else [0] * n),
        },
        batch_size=[n],
    )


def test_env_alone_equals_env_in_batch(task) -> None:
    """Batching changes nothing for any env: same losses and parameters, several epochs."""
    gates = GateConfig(min_training_epochs=0, grad_ratio_floor=0.0)
    plan = [  # per epoch: ops, slots, blueprints for the 4 envs
        ([Op.GERMINATE, Op.WAIT, Op.GERMINATE, Op.GERMINATE], [1, 0, 0, 2], [6, 0, 2, 7]),
        ([Op.WAIT, Op.GERMINATE, Op.ADVANCE, Op.WAIT], [0, 1, 0, 0], [0, 4, 0, 0]),
        ([Op.ADVANCE, Op.WAIT, Op.WAIT, Op.CULL], [1, 0, 0, 2], [0, 0, 0, 0]),
    ]
    batch = MorphogeneticBatch(task, 4, _cfg(gates=gates), base_seed=11)
    batch_sigs = [batch.run_epoch(_actions(*[list(map(int, v)) for v in step])) for step in plan]
    for i in (0, 2, 3):
        alone = MorphogeneticBatch(task, 1, _cfg(gates=gates), base_seed=11, env_offset=i)
        for e, step in enumerate(plan):
            sig = alone.run_epoch(_actions(*[[int(v[i])] for v in step]))
            torch.testing.assert_close(sig["train_loss"][0], batch_sigs[e]["train_loss"][i], rtol=1e-4, atol=1e-5)
            assert torch.equal(sig["stage"][0], batch_sigs[e]["stage"][i])
        for key, value in alone.state["host"].items():
            torch.testing.assert_close(value[0], batch.state["host", key][i], rtol=1e-3, atol=1e-4)
        for key, value in alone.state["seeds"].items(include_nested=True, leaves_only=True):
            torch.testing.assert_close(value[0], batch.state["seeds"].get(key)[i], rtol=1e-3, atol=1e-4)
    stages = batch_sigs[-1]["stage"]
    assert stages[0, 1] == S.BLENDING and stages[3, 2] == S.EMBARGOED and stages[2, 0] == S.BLENDING


@pytest.fixture(scope="module")
def grammar():
    return load_task("grammar", seq_len=8, train_size=64, val_size=32, test_size=32, seed=3)


@pytest.mark.parametrize("host", ["impaired", "lm_small"])
@pytest.mark.parametrize("slot", [0, 1, 2])
def test_every_blueprint_trains_blends_fossilizes_and_culls(task, grammar, slot: int, host: str) -> None:
    """One env per blueprint of the host's family, all driven through the success path; then
    each is culled."""
    gates = GateConfig(min_training_epochs=1, grad_ratio_floor=0.0, shadow_epochs=0, regression_tolerance=100.0,
                       min_probation_epochs=0, fossilize_threshold=-100.0)
    family = host_spec(host).family
    n = len(family_blueprints(family))
    batch = MorphogeneticBatch(task if family == "cnn" else grammar, n, _cfg(gates=gates, host=host))
    names = list(batch.blueprint_names)
    everyone = list(range(n))
    sig = batch.run_epoch(_actions([Op.GERMINATE] * n, [slot] * n, everyone))
    assert sig["germinated"][:, slot].all()
    assert (sig["stage"][:, slot] == S.TRAINING).all()  # G1 is automatic
    sig = batch.run_epoch(_actions([Op.WAIT] * n, [slot] * n, everyone))
    trainable = torch.tensor([not BLUEPRINTS[b].identity for b in names])
    assert (sig["seed_grad_norm"][trainable, slot] > 0).all(), "seeds in TRAINING must learn"
    sig = batch.run_epoch(_actions([Op.ADVANCE] * n, [slot] * n, everyone, [0] * n))  # tempo 3
    assert sig["action_accepted"].all()
    assert (sig["alpha"][:, slot] > 0).all()
    for _ in range(4):  # ramp, then SHADOWING and PROBATIONARY automatically
        sig = batch.run_epoch(_actions([Op.WAIT] * n, [slot] * n, everyone))
    assert (sig["stage"][:, slot] == S.PROBATIONARY).all(), sig["stage"][:, slot]
    assert (sig["params_added"] == torch.tensor([
        float(BLUEPRINTS[b].param_count(batch.arch.spec.slot_channels(batch.arch.slots[slot]))) for b in names
    ])).all()
    half = n // 2
    ops = [Op.FOSSILIZE] * half + [Op.CULL] * (n - half)
    sig = batch.run_epoch(_actions(ops, [slot] * n, everyone))
    assert sig["action_accepted"].all()
    assert (sig["stage"][:half, slot] == S.FOSSILIZED).all()
    assert (sig["stage"][half:, slot] == S.EMBARGOED).all()  # culled, then embargoed at epoch end
    assert torch.isfinite(sig["val_loss"]).all()


def test_partial_reset_touches_only_masked_envs(task) -> None:
    batch = MorphogeneticBatch(task, 3, _cfg())
    batch.run_epoch(_actions([Op.GERMINATE] * 3, [0, 1, 2], [6, 6, 6]))
    before = batch.state.clone()
    batch.reset_envs(torch.tensor([False, True, False]))
    for key, value in batch.state.items(include_nested=True, leaves_only=True):
        old = before.get(key)
        assert torch.equal(value[0], old[0]) and torch.equal(value[2], old[2]), key
    assert batch.state["slots", "mid", "stage"][1] == S.DORMANT
    assert not torch.equal(batch.state["host", "block0.conv"][1], before["host", "block0.conv"][1])
    assert batch.epoch.tolist() == [1, 0, 1]


def test_group_by_blueprint_plan_matches_masked_path(task) -> None:
    """Running each blueprint only for its envs (plan from the per-epoch snapshot) changes
    nothing: same losses, stages and parameters as computing every blueprint masked."""
    gates = GateConfig(min_training_epochs=0, grad_ratio_floor=0.0)
    plan = [
        ([Op.GERMINATE, Op.GERMINATE, Op.GERMINATE, Op.WAIT], [0, 1, 2, 0], [6, 2, 4, 0]),
        ([Op.ADVANCE, Op.GERMINATE, Op.WAIT, Op.GERMINATE], [0, 0, 0, 1], [0, 7, 0, 1]),
        ([Op.WAIT, Op.CULL, Op.ADVANCE, Op.WAIT], [0, 1, 2, 0], [0, 0, 0, 0]),
        ([Op.WAIT, Op.WAIT, Op.WAIT, Op.ADVANCE], [0, 0, 0, 1], [0, 0, 0, 0]),
    ]
    masked = MorphogeneticBatch(task, 4, _cfg(gates=gates), base_seed=5)
    planned = MorphogeneticBatch(task, 4, _cfg(gates=gates), base_seed=5)
    for step in plan:
        actions = _actions(*[list(map(int, v)) for v in step])
        want = masked.run_epoch(actions)
        got = planned.run_epoch(actions.clone())
        torch.testing.assert_close(got["train_loss"], want["train_loss"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["val_acc"], want["val_acc"], rtol=0, atol=1.0)
        assert torch.equal(got["stage"], want["stage"])
        planned.set_plan(got["stage"].numpy(), got["blueprint"].numpy(), got["germinated"].numpy())
    assert planned._plans is not None and sum(len(p) for p in planned._plans.values()) >= 3
    # Every computing seed's own blueprint parameters agree (unused blueprints are not kept).
    names = [bp.name for bp in planned.arch.blueprints]
    for k, slot in enumerate(planned.arch.slots):
        for i in range(4):
            if int(got["stage"][i, k]) in (S.TRAINING, S.BLENDING, S.SHADOWING, S.PROBATIONARY, S.FOSSILIZED):
                bp = names[int(got["blueprint"][i, k])]
                for key, value in planned.state["seeds", slot, bp].items():
                    torch.testing.assert_close(value[i], masked.state["seeds", slot, bp, key][i], rtol=1e-3, atol=1e-4)
    for key, value in planned.state["host"].items():
        torch.testing.assert_close(value, masked.state["host", key], rtol=1e-3, atol=1e-4)
