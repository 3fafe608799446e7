"""The batched engine's step for env i equals a plain nn.Module host trained with torch.optim.SGD."""

from __future__ import annotations

import pytest
import torch
from reference_host import ReferenceHost
from tensordict import TensorDict

from esper.kasmina.blueprints import family_blueprints
from esper.kasmina.epoch import KasminaConfig, MorphogeneticBatch
from esper.kasmina.gates import GateConfig
from esper.kasmina.state import as_dicts
from esper.kasmina.step import train_step
from esper.leyline import Op, SeedStage

S = SeedStage
BP_NAMES = family_blueprints("cnn")


@pytest.fixture(scope="module")
def task():
    from esper.tasks import load_task

    return load_task("synthetic", train_size=64, val_size=32, seed=5)


def _actions(op: list[int], slot: list[int], blueprint: list[int]) -> TensorDict:
    t = lambda v: torch.tensor([int(u) for u in v], dtype=torch.long)  # noqa: E731
    return TensorDict(
        {"op": t(op), "slot": t(slot), "blueprint": t(blueprint), "tempo": t([0] * len(op))},
        batch_size=[len(op)],
    )


def _batch(task, plan: list[tuple[list[int], list[int], list[int]]], host: str = "impaired") -> MorphogeneticBatch:
    """A batch of ``len(plan[0][0])`` envs after running one epoch per plan entry (per-env actions)."""
    cfg = KasminaConfig(
        host=host,
        batch_size=32,
        val_batch_size=32,
        gates=GateConfig(min_training_epochs=0, grad_ratio_floor=0.0),
    )
    mb = MorphogeneticBatch(task, len(plan[0][0]), cfg, base_seed=21)
    for step in plan:
        mb.run_epoch(_actions(*step))
    return mb


def _check_step(mb: MorphogeneticBatch) -> None:
    """One batched step vs each env's nn.Module copy on the same minibatch: loss and parameters."""
    refs = [ReferenceHost.from_batch(mb, env) for env in range(mb.n)]
    x, y = next(iter(mb.sampler.epoch(mb.keys, mb.epoch)))
    st = as_dicts(mb.state)
    out = train_step(
        mb.arch,
        mb.cfg.step,
        st["host"],
        st["buffers"],
        st["seeds"],
        st["host_mom"],
        st["seed_mom"],
        mb.controls(),
        x,
        y,
    )
    for env, ref in enumerate(refs):
        loss = ref.train_step(
            ref.make_optimizers(mb.cfg.step), x[env], y[env], mb.cfg.step.max_grad_norm
        )
        torch.testing.assert_close(loss, out["loss"][env], rtol=1e-5, atol=1e-6)
        _check_env(mb, ref, env)


def _check_env(mb: MorphogeneticBatch, ref: ReferenceHost, env: int) -> None:
    tol = {"rtol": 1e-4, "atol": 1e-6}
    for i, block in enumerate(ref.blocks):
        torch.testing.assert_close(
            block["conv"].weight, mb.state["host", f"block{i}.conv"][env], **tol
        )
        torch.testing.assert_close(
            block["bn"].weight, mb.state["host", f"block{i}.bn_w"][env], **tol
        )
        torch.testing.assert_close(block["bn"].bias, mb.state["host", f"block{i}.bn_b"][env], **tol)
        torch.testing.assert_close(
            block["bn"].running_mean, mb.state["buffers", f"block{i}.bn_mean"][env], **tol
        )
        torch.testing.assert_close(
            block["bn"].running_var, mb.state["buffers", f"block{i}.bn_var"][env], **tol
        )
    torch.testing.assert_close(ref.head.weight, mb.state["host", "head.w"][env], **tol)
    torch.testing.assert_close(ref.head.bias, mb.state["host", "head.b"][env], **tol)
    for slot, seed in ref.seeds.items():
        batched = mb.state["seeds", slot, seed.blueprint.name]
        for k, p in seed.weights.items():
            torch.testing.assert_close(p[0], batched[k][env], **tol)


def test_host_without_seed(task) -> None:
    mb = _batch(task, [([Op.WAIT] * 2, [0, 0], [0, 0])])
    assert len(ReferenceHost.from_batch(mb, 1).seeds) == 0
    _check_step(mb)


def test_seeds_in_training_and_blending(task) -> None:
    """Env i holds blueprint i: BLENDING (alpha strictly between 0 and 1) for every blueprint,
    plus one env whose seed is still in TRAINING (isolated). Host and seeds match."""
    nb = len(BP_NAMES)
    slots = [0 if name in ("conv_heavy", "conv_light") else 2 for name in BP_NAMES] + [1]
    bps = [*range(nb), BP_NAMES.index("conv_light")]
    advance = [Op.ADVANCE] * nb + [Op.WAIT]
    mb = _batch(task, [([Op.GERMINATE] * (nb + 1), slots, bps), (advance, slots, [0] * (nb + 1))])
    for env, slot in enumerate(slots):
        name = mb.arch.slots[slot]
        ref = ReferenceHost.from_batch(mb, env)
        assert list(ref.seeds) == [name]
        stage = int(mb.state["slots", name, "stage"][env])
        if env < nb:
            alpha = float(mb.state["slots", name, "alpha"][env])
            assert stage == S.BLENDING and 0 < alpha < 1 and not ref.controls[name].isolated
        else:
            assert stage == S.TRAINING and ref.controls[name].isolated
    _check_step(mb)


def test_counterfactual_validation_matches(task) -> None:
    """The reference's counterfactual rows equal the batched validation (alpha forced to 0)."""
    bp = BP_NAMES.index("conv_light")
    mb = _batch(task, [([Op.GERMINATE] * 2, [0, 1], [bp, bp]), ([Op.ADVANCE] * 2, [0, 1], [0, 0])])
    val = mb.validate()
    for env in range(mb.n):
        ref = ReferenceHost.from_batch(mb, env)
        loss, correct = ref.validate(
            task.prepare(task.val_x), task.val_y, chunk=mb.cfg.val_batch_size
        )
        acc = 100.0 * correct / task.val_size
        torch.testing.assert_close(loss / task.val_size, val["val_loss"][env], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(acc[0], val["val_acc"][env])
        torch.testing.assert_close(acc[1:], val["val_acc_without"][env])


def test_stacked_slots_on_the_shallow_host(task) -> None:
    """All three slots after the shallow host's one block: two blended seeds stacked in env 0,
    one in env 1. Validation (with every per-slot counterfactual) and a step match the reference."""
    lt, hv = BP_NAMES.index("conv_light"), BP_NAMES.index("conv_heavy")
    g, a, w = Op.GERMINATE, Op.ADVANCE, Op.WAIT
    mb = _batch(task, [([g, g], [0, 2], [lt, hv]), ([g, a], [1, 2], [hv, 0]), ([a, w], [0, 0], [0, 0]),
                       ([a, w], [1, 0], [0, 0])], host="shallow")
    assert set(mb.arch.spec.slot_after) == {0}
    stages = mb._stacked("stage")
    assert stages[0].tolist() == [S.BLENDING, S.BLENDING, S.DORMANT] and mb._stacked("alpha")[1, 2] > 0
    val = mb.validate()
    for env in range(mb.n):
        ref = ReferenceHost.from_batch(mb, env)
        _, correct = ref.validate(task.prepare(task.val_x), task.val_y, chunk=mb.cfg.val_batch_size)
        acc = 100.0 * correct / task.val_size
        torch.testing.assert_close(acc[0], val["val_acc"][env])
        torch.testing.assert_close(acc[1:], val["val_acc_without"][env])
    _check_step(mb)
