"""Simic: config validation, rewards, masks vs Kasmina's lifecycle, the torchrl env."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
from tensordict import TensorDict
from tiny_config import TINY
from torchrl.envs.utils import check_env_specs

from esper.kasmina.gates import GateConfig
from esper.kasmina.slots import Lifecycle, new_slot_state
from esper.leyline import NUM_GATES, NUM_STAGES, GateId, Op, SeedStage
from esper.simic.config import RewardConfig, TrainingConfig
from esper.simic.env import MorphogeneticEnv, load_config_task
from esper.simic.errors import ConfigError
from esper.simic.rewards import RewardComponents, ShapedReward
from esper.simic.runner import EpisodeRunner
from esper.tamiyo.baselines import RandomPolicy
from esper.tamiyo.masks import action_masks

S = SeedStage


@pytest.fixture(scope="module")
def tiny_cfg() -> TrainingConfig:
    return TrainingConfig.from_dict(TINY)


@pytest.fixture(scope="module")
def tiny_task(tiny_cfg: TrainingConfig):
    return load_config_task(tiny_cfg)


# ----------------------------------------------------------------------------- config
def test_config_round_trip_and_presets(tmp_path) -> None:
    for name in ("default", "cifar10", "cifar10_deep"):
        cfg = TrainingConfig.preset(name)
        assert TrainingConfig.from_dict(cfg.model_dump()) == cfg
    cfg = TrainingConfig.from_dict(TINY)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert TrainingConfig.load(path) == cfg
    ypath = tmp_path / "c.yaml"
    ypath.write_text("episode:\n  length: 7\n")
    assert TrainingConfig.load(ypath).episode.length == 7
    # The default fixed schedule's later epochs just do not fire in a short episode.
    assert TrainingConfig.load(ypath).fixed.epochs[-1] >= 7


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"episode": {"lenght": 3}}, "episode.lenght: unknown key"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"ppo": {"gamma": 1.5}}, "ppo.gamma"),
        ({"episode": {"envs": 0}}, "episode.envs"),
        ({"kasmina": {"host": "huge"}}, "unknown host"),
        ({"kasmina": {"slots": ["middle"]}}, "slots"),
        ({"ppo": {"entropy_coef": {"colour": 0.1}}}, "unknown heads"),
        ({"heuristic": {"wait_for": "forever"}}, "heuristic.wait_for"),
    ],
)
def test_config_rejects(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainingConfig.from_dict(data)


@pytest.mark.parametrize(
    ("data", "policy", "match"),
    [
        ({"episode": {"length": 3}, "heuristic": {"warmup_epochs": 5}}, "heuristic", "warmup_epochs .* must be below"),
        ({"episode": {"length": 8}, "fixed": {"epochs": [2, 9]}}, "fixed",
         r"fixed.epochs \[9\] are not below episode.length \(8\)"),
        ({"heuristic": {"plateau_epochs": 4}}, "heuristic", r"plateau_epochs \(4\) must be below history_length \(4\)"),
        ({"episode": {"envs": 2}, "ppo": {"minibatch_envs": 4}}, "ppo", r"minibatch_envs \(4\) exceeds episode.envs \(2\)"),
    ],
)
def test_config_rejects_for_the_policy_that_runs(data: dict, policy: str, match: str) -> None:
    cfg = TrainingConfig.from_dict(data)  # valid as a config: only that policy cannot run it
    with pytest.raises(ConfigError, match=match):
        cfg.check_for(policy)
    others = {"heuristic", "fixed", "ppo", "static", "random"} - {policy}
    assert all(cfg.check_for(p) is cfg for p in others)


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        TrainingConfig.preset("nope")


# ----------------------------------------------------------------------------- rewards
def _signals(n: int = 2, s: int = 3, **over: torch.Tensor) -> TensorDict:
    base = {
        "stage": torch.full((n, s), int(S.DORMANT)),
        "stage_before": torch.full((n, s), int(S.DORMANT)),
        "alpha": torch.zeros(n, s),
        "contribution": torch.zeros(n, s),
        "params_added": torch.zeros(n),
        "val_acc": torch.full((n,), 80.0),
    }
    base.update(over)
    return TensorDict(base, batch_size=[n])


def test_reward_components_on_crafted_signals() -> None:
    cfg = RewardConfig(contribution=1.0, shaping=0.1, rent=0.5, germinate_cost=0.02, fossilize_bonus=0.3,
                       terminal=2.0)
    fn = ShapedReward(cfg, host_params=1000.0, device="cpu", gamma=0.9)
    stage = torch.tensor([[S.BLENDING, S.DORMANT, S.DORMANT], [S.FOSSILIZED, S.DORMANT, S.DORMANT]])
    before = torch.tensor([[S.TRAINING, S.DORMANT, S.DORMANT], [S.PROBATIONARY, S.DORMANT, S.DORMANT]])
    sig = _signals(stage=stage, stage_before=before,
                   alpha=torch.tensor([[0.5, 0, 0], [1.0, 0, 0]]),
                   contribution=torch.tensor([[4.0, 9.0, 0], [2.0, 0, 0]]),
                   params_added=torch.tensor([0.0, 1000.0]))
    r = fn(sig, torch.tensor([Op.GERMINATE, Op.FOSSILIZE]), torch.tensor([False, True]))
    assert r.contribution.tolist() == pytest.approx([0.04, 0.02])  # fossilized seeds still pay
    # env 1's episode ends here: the final state's potential counts as 0
    assert r.shaping.tolist() == pytest.approx([0.9 * 0.3 - 0.2, 0.9 * 0.0 - 0.5])
    assert r.rent.tolist() == pytest.approx([0.0, -0.5 * torch.log1p(torch.tensor(1.0)).item()])
    assert r.action_cost.tolist() == pytest.approx([-0.02, -cfg.fossilize_cost])
    assert r.fossilize.tolist() == pytest.approx([0.0, 0.3])
    assert r.terminal.tolist() == pytest.approx([0.0, 1.6])
    parts = sum(v for k, v in r.to_dict().items() if k != "total")
    assert torch.allclose(r.total, parts)


def test_fossilizing_does_not_cost_the_contribution_reward() -> None:
    """The same seed contributing the same points pays the same whether it stays in probation or
    is fossilized: no reward for keeping seeds in limbo (a 20-round PPO run learned that)."""
    fn = ShapedReward(RewardConfig(contribution=1.0), 1000.0, "cpu", gamma=0.99)
    paid = []
    for stage in (S.PROBATIONARY, S.FOSSILIZED):
        sig = _signals(n=1, s=1, stage=torch.tensor([[stage]]), stage_before=torch.tensor([[stage]]),
                       alpha=torch.tensor([[1.0]]), contribution=torch.tensor([[3.0]]))
        paid.append(float(fn(sig, torch.tensor([0]), torch.tensor([False])).contribution[0]))
    assert paid == pytest.approx([0.03, 0.03])


def test_reward_to_dict_is_complete() -> None:
    z = torch.zeros(2)
    r = RewardComponents(*[z] * len(dataclasses.fields(RewardComponents)))
    assert set(r.to_dict()) == {f.name for f in dataclasses.fields(RewardComponents)}
    assert set(r.to_tensordict().keys()) == set(RewardComponents.names())


@pytest.mark.parametrize(
    "path",
    [
        [S.DORMANT, S.GERMINATED, S.TRAINING, S.BLENDING, S.CULLED, S.EMBARGOED],
        # ends with a fossilized seed: Phi(s_T) != 0, which an invariant shaping must not pay
        [S.DORMANT, S.GERMINATED, S.TRAINING, S.BLENDING, S.SHADOWING, S.PROBATIONARY, S.FOSSILIZED],
        # starts mid-life (Phi(s_0) != 0) and ends fossilized
        [S.TRAINING, S.BLENDING, S.SHADOWING, S.PROBATIONARY, S.FOSSILIZED, S.FOSSILIZED],
    ],
)
def test_shaping_sums_to_minus_initial_potential(path: list[SeedStage]) -> None:
    """Discounted with the learner's gamma, an episode's shaping terms sum to -Phi(s_0) whatever
    the path, because the final state's potential is 0: shaping cannot change which policy is
    optimal (Ng et al. 1999)."""
    gamma = 0.9
    fn = ShapedReward(RewardConfig(shaping=1.0), 1000.0, "cpu", gamma=gamma)
    steps = list(itertools.pairwise(path))
    total = 0.0
    for t, (a, b) in enumerate(steps):
        sig = _signals(n=1, s=1, stage=torch.tensor([[b]]), stage_before=torch.tensor([[a]]))
        end = torch.tensor([t == len(steps) - 1])
        total += gamma**t * float(fn(sig, torch.tensor([0]), end).shaping[0])
    assert total == pytest.approx(-float(fn.phi(torch.tensor([[path[0]]]))[0]), abs=1e-6)


def test_env_discounts_shaping_with_the_ppo_gamma(tiny_cfg, tiny_task) -> None:
    """One discount: the env's shaping uses ``ppo.gamma`` (there is no second one)."""
    cfg = tiny_cfg.updated(ppo={"gamma": 0.8})
    env = MorphogeneticEnv(cfg, task=tiny_task)
    assert env.reward_fn.gamma == 0.8
    assert "gamma" not in RewardConfig.model_fields


# ----------------------------------------------------------------------------- masks
def test_masked_actions_are_accepted_by_lifecycle_exhaustively() -> None:
    """Every stage x every G2/G5 outcome: whatever the mask allows, Lifecycle accepts."""
    combos = list(itertools.product(range(1, NUM_STAGES), (False, True), (False, True)))
    n = len(combos)
    stage = torch.tensor([c[0] for c in combos])
    gates = torch.zeros(n, NUM_GATES, dtype=torch.bool)
    gates[:, GateId.G2_BLENDING] = torch.tensor([c[1] for c in combos])
    gates[:, GateId.G5_FOSSILIZE] = torch.tensor([c[2] for c in combos])
    masks = action_masks(stage[:, None], gates[:, None, :], num_blueprints=3)
    lc = Lifecycle(GateConfig(), "cpu")
    for op in (Op.GERMINATE, Op.ADVANCE, Op.CULL, Op.FOSSILIZE):
        legal = masks["slot_mask"][:, op, 0]
        for bp, tempo in itertools.product(range(3), range(3)):
            slot = new_slot_state(n, "cpu")
            slot["stage"] = stage.clone()
            if op is Op.GERMINATE:
                ok = lc.germinate(slot, legal, torch.full((n,), bp), torch.full((n,), tempo), 3, torch.zeros(n))
            elif op is Op.ADVANCE:
                ok = lc.advance(slot, legal, gates)
            elif op is Op.CULL:
                ok = lc.cull(slot, legal)
            else:
                ok = lc.fossilize(slot, legal, gates[:, GateId.G5_FOSSILIZE])
            assert torch.equal(ok, legal), (op, stage[legal & ~ok])
    assert masks["op_mask"][:, Op.WAIT].all()


def test_random_legal_actions_are_always_accepted_by_kasmina(tiny_cfg, tiny_task) -> None:
    env = MorphogeneticEnv(tiny_cfg.updated(episode={"length": 8}), task=tiny_task)
    policy = RandomPolicy(env.n, seed=5)
    td = env.reset()
    for _ in range(8):
        td = env.step(policy(td))
        assert td["next", "signals", "action_accepted"].all()
        td = td["next"]


# ----------------------------------------------------------------------------- env
def test_check_env_specs(tiny_cfg, tiny_task) -> None:
    env = MorphogeneticEnv(tiny_cfg, task=tiny_task)
    check_env_specs(env)
    assert env.observation_spec["observation"].shape == (2, env.schema.size)


def test_partial_reset_only_touches_masked_envs(tiny_cfg, tiny_task) -> None:
    env = MorphogeneticEnv(tiny_cfg, task=tiny_task)
    td = env.reset()
    for _ in range(2):
        td["op"] = torch.zeros(2, dtype=torch.long)
        for k in ("slot", "blueprint", "tempo"):
            td[k] = torch.zeros(2, dtype=torch.long)
        td = env.step(td)["next"]
    host_before = env.kasmina.state["host"].clone()
    epoch_before = env.kasmina.epoch.clone()
    td["_reset"] = torch.tensor([[True], [False]])
    out = env.reset(td)
    assert env.kasmina.epoch.tolist() == [0, int(epoch_before[1])]
    changed = [not torch.equal(v[0], host_before.get(k)[0]) for k, v in env.kasmina.state["host"].items(True, True)]
    same = [torch.equal(v[1], host_before.get(k)[1]) for k, v in env.kasmina.state["host"].items(True, True)]
    assert any(changed) and all(same)
    assert out["tracker", "val_acc_hist"][0].eq(0).all() and out["tracker", "val_acc_hist"][1].ne(0).any()
    assert not out["done"].any()


def test_episode_truncates_and_runner_summarizes(tiny_cfg, tiny_task) -> None:
    from esper.tamiyo.policies import make_policy

    env = MorphogeneticEnv(tiny_cfg, task=tiny_task)
    runner = EpisodeRunner(env, make_policy("fixed", env, tiny_cfg))
    summaries = runner.run(1)
    assert len(summaries) == 2
    assert runner.transfers == runner.epochs == tiny_cfg.episode.length
    assert all(0.0 <= s.test_acc <= 100.0 for s in summaries)
    assert all(s.trajectory.startswith("germinate(conv_small@late)") for s in summaries)
    assert all(s.params_added > 0 for s in summaries)
