"""Issue 27: the glue around PPO (rollback judgment, plans after a rollback, masked steps,
schedules across resumes, one reset per episode, resumability, shaping under rollback)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from tiny_config import TINY
from torchrl.modules import set_recurrent_mode

from esper.leyline import Op, SeedStage
from esper.simic import ppo_round
from esper.simic.checkpoint import check_resumable, load_checkpoint
from esper.simic.config import TrainingConfig, merge_config
from esper.simic.env import MorphogeneticEnv
from esper.simic.errors import CheckpointError
from esper.simic.ppo import PPOTrainer
from esper.simic.ppo_round import RoundParts, RoundResult, advantages, collect
from esper.simic.rewards import STAGE_POTENTIAL


def _cfg(**over: dict) -> TrainingConfig:
    return TrainingConfig.from_dict(merge_config(TINY, merge_config({"episode": {"envs": 2, "length": 3}}, over)))


def _state(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.modules.state_dict().items()}


def test_collapsing_update_is_judged_after_it_and_rolled_back_to_the_policy_before_it() -> None:
    """An update that collapses the policy (one op certain, critic far off) is undone in the
    round it happens: the judged policy is the updated one, the restored one is what collected."""
    trainer = PPOTrainer(_cfg())
    before = _state(trainer)

    class CollapsingUpdate:  # a fault drill hook: what a broken update leaves behind
        def after_update(self, parts: RoundParts, number: int) -> None:
            with torch.no_grad():
                parts.modules.actor.module[0].module[2].module.op.bias[Op.WAIT] += 1e4
                head = parts.modules.critic.module[2].module.head
                head.weight.mul_(1e4)
                head.bias.add_(1e3)

        def after_round(self, result: RoundResult) -> None:
            pass

    drill = CollapsingUpdate()
    trainer.hooks.append(drill)
    stats = trainer.train_round()
    assert stats.rolled_back is not None and stats.rolled_back.startswith("collapsed"), stats.rolled_back
    after = trainer.modules.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    # a healthy update is kept
    trainer.hooks.remove(drill)
    kept = trainer.train_round()
    assert kept.rolled_back is None
    assert any(not torch.equal(trainer.modules.state_dict()[k], v) for k, v in before.items())


def _act(n: int, op: list[int], slot: int, bp: int) -> TensorDict:
    return TensorDict({"op": torch.tensor(op), "slot": torch.full((n,), slot), "blueprint": torch.full((n,), bp),
                       "tempo": torch.zeros(n, dtype=torch.long)}, batch_size=[n])


def test_plan_after_a_rollback_keeps_every_computing_seed() -> None:
    """Envs 0 and 2 grow the same seed; env 0 culls it and its loss turns NaN in the same epoch.
    The rollback restores env 0's seed: the next epoch's plan must hold both seeds, and env 2's
    seed must train in that epoch (issue 27: the plan was sized from the pre-rollback snapshot)."""
    cfg = _cfg(episode={"envs": 3, "length": 5}, faults={"nan_loss_envs": [0], "at_epoch": 2})
    env = MorphogeneticEnv(cfg)
    bp = env.blueprint_names.index("conv_small")
    g, w, c = int(Op.GERMINATE), int(Op.WAIT), int(Op.CULL)
    td = env.reset()
    td = env.step(td.update(_act(3, [g, w, g], 0, bp)))["next"]
    td = env.step(td.update(_act(3, [c, w, w], 0, bp)))["next"]  # env 0: cull + NaN -> rolled back
    assert env.pipeline.governor.rollbacks.tolist() == [1, 0, 0]
    stage = env.kasmina.state["slots", env.slots[0], "stage"]
    assert stage.tolist()[0] == stage.tolist()[2] == int(SeedStage.TRAINING)
    envs, valid = env.kasmina._plans[env.slots[0]]["conv_small"]
    assert sorted(envs[valid].tolist()) == [0, 2]
    seed = env.kasmina.state["seeds", env.slots[0], "conv_small"]
    was = {k: v[2].clone() for k, v in seed.items()}
    env.step(td.update(_act(3, [w, w, w], 0, bp)))
    assert any(not torch.equal(seed[k][2], v) for k, v in was.items())  # env 2's seed trained


def test_rolled_back_steps_are_masked_out_of_gae_and_the_loss() -> None:
    """Env 1 is rolled back at epoch 2 (step 1): that step is invalid, the chain before it
    bootstraps from the value of the state it started in, and its data changes no loss."""
    gamma = TrainingConfig().ppo.gamma
    trainer = PPOTrainer(_cfg(faults={"nan_loss_envs": [1], "at_epoch": 2}))
    batch = collect(trainer)
    assert batch.get(("next", "rolled_back")).tolist() == [[False] * 3, [False, True, False]]
    advantages(trainer, batch)
    valid = batch.get("shifted_valid").reshape(2, 3)
    assert valid.tolist() == [[True] * 3, [True, False, True]]
    v, adv = batch.get("state_value"), batch.get("advantage")
    r = batch.get(("next", "reward"))
    assert adv[1, 0].item() == pytest.approx((r[1, 0] + gamma * v[1, 1] - v[1, 0]).item(), rel=1e-5, abs=1e-6)
    assert adv[1, 1].item() == 0.0
    trainer.learner.gather(batch)
    mb = batch.clone()
    mb.set("advantage", trainer.loss._standardize_advantage(batch.get("advantage"), batch))
    with set_recurrent_mode(True), torch.no_grad():
        ref = trainer.loss(mb.clone())
        bad = mb.clone()
        bad["op_log_prob"][1, 1] = -50.0  # garbage at the invalid step
        bad["value_target"][1, 1] = 1e6
        bad["advantage"][1, 1] = 1e6
        out = trainer.loss(bad)
    for key in ("loss_objective", "loss_critic", "loss_entropy"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0, msg=key)
    stats = trainer.train_round()
    assert np.isfinite(stats.explained_variance)


def test_resume_with_more_rounds_keeps_the_schedule(tmp_path: Path) -> None:
    """The lr/entropy schedules decay over the horizon the run started with: resuming with a
    larger --rounds continues at the final fraction instead of jumping back up."""
    cfg = _cfg(ppo={"rounds": 2, "minibatch_envs": 2})
    a = PPOTrainer(cfg)
    a.train_round()
    path = a.save(tmp_path / "ckpt.pt")
    assert load_checkpoint(path)["schedule_rounds"] == 2
    p = cfg.ppo
    assert a.schedule() == pytest.approx({"lr": p.lr * p.lr_final_frac, "entropy_scale": p.entropy_final_frac})
    b = PPOTrainer(cfg.updated(ppo={"rounds": 5}))
    b.resume(path)
    assert b.schedule() == pytest.approx(a.schedule())
    b.save(tmp_path / "again.pt")
    assert load_checkpoint(tmp_path / "again.pt")["schedule_rounds"] == 2


def test_each_episode_resets_each_env_once() -> None:
    """One collected episode advances every env's episode counter (and its keys) by one."""
    trainer = PPOTrainer(_cfg())
    counters = []
    for _ in range(3):
        collect(trainer)
        counters.append(trainer.base_env.kasmina.episode.tolist())
    assert np.diff(np.array(counters), axis=0).tolist() == [[1, 1], [1, 1]]


def test_resume_refuses_another_episode_or_feature_setting(tmp_path: Path) -> None:
    """Observations are scaled by the episode length and built by the features section: a
    checkpoint cannot go on under others."""
    cfg = _cfg()
    ckpt = {"config": cfg.model_dump(mode="json"), "env_episode": torch.zeros(2, dtype=torch.long)}
    check_resumable("c.pt", ckpt, cfg.updated(ppo={"rounds": 99}), 2)  # more rounds: fine
    for over in ({"episode": {"length": 4}}, {"episode": {"seed": 5}},
                 {"features": {"observe": "diagnostic"}}):
        with pytest.raises(CheckpointError, match=r"c\.pt"):
            check_resumable("c.pt", ckpt, cfg.updated(**over), 2)


def test_shaping_telescopes_under_rollback_and_the_discounted_return_is_reported() -> None:
    """Potential-based shaping sums (discounted) to -Phi(s0) = 0 per episode, also for an env
    the governor rolled back while it held a seed; summaries report that discounted return."""
    cfg = _cfg(episode={"envs": 2, "length": 4}, faults={"nan_loss_envs": [1], "at_epoch": 3})
    env = MorphogeneticEnv(cfg)
    gamma = cfg.ppo.gamma
    snaps: list[dict] = []
    env.pipeline.callbacks.append(lambda epoch, snap: snaps.append({k: v.copy() for k, v in snap.items()}))
    bp = env.blueprint_names.index("conv_small")
    g, w = int(Op.GERMINATE), int(Op.WAIT)
    td = env.reset()
    for op in ([g, g], [w, w], [w, w], [w, w]):
        td = env.step(td.update(_act(2, op, 0, bp)))["next"]
    assert env.pipeline.governor.rollbacks.tolist() == [0, 1]
    shaping = np.stack([s["reward_components.shaping"] for s in snaps])  # [T, N]
    disc = gamma ** np.arange(len(snaps))[:, None]
    assert np.abs(shaping).max() > 0.01 * STAGE_POTENTIAL[SeedStage.TRAINING] * cfg.reward.shaping
    np.testing.assert_allclose((disc * shaping).sum(0), [0.0, 0.0], atol=1e-6)
    total = np.stack([s["reward"] for s in snaps])
    summaries = {s.env: s for s in env.pipeline.take_summaries()}
    for i in (0, 1):
        assert summaries[i].discounted_return == pytest.approx(float((disc[:, 0] * total[:, i]).sum()), abs=1e-6)
        assert summaries[i].total_reward == pytest.approx(float(total[:, i].sum()), abs=1e-6)


def test_accepted_is_the_rate_over_the_whole_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """``RoundStats.accepted`` counts every decision of the round, not the last epoch's only:
    one refused decision at the first epoch shows (the last epoch all applied)."""
    trainer = PPOTrainer(_cfg())

    def with_one_refusal(parts: RoundParts) -> TensorDict:
        batch = collect(parts)
        batch["next", "signals", "action_accepted"][0, 0] = False  # as the env reports a refused op
        return batch

    monkeypatch.setattr(ppo_round, "collect", with_one_refusal)
    stats = trainer.train_round()
    assert trainer.base_env.pipeline.last["signals.action_accepted"].all()
    assert stats.accepted == pytest.approx(1.0 - 1.0 / 6.0)
    assert np.isfinite(stats.discounted_return) and stats.discounted_return != stats.mean_return
