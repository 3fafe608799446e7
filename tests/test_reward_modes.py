"""Reward families (``reward.mode``): what each pays, summed over a real heuristic episode."""

from __future__ import annotations

import pytest
import torch
from tiny_config import TINY

from esper import train
from esper.leyline import SeedStage
from esper.simic.config import TrainingConfig, merge_config
from esper.simic.env import MorphogeneticEnv, load_config_task
from esper.simic.rewards import MODE_TERMS, RewardComponents
from esper.simic.runner import collector_for
from esper.tamiyo.policies import make_policy

LENGTH = 8
COMPONENTS = [c for c in RewardComponents.names() if c != "total"]


@pytest.fixture(scope="module")
def episodes() -> dict[str, tuple[TrainingConfig, object]]:
    """One heuristic episode of 2 envs per mode, same hosts and task (the heuristic ignores the
    reward, so all three play the same episode)."""
    base = TrainingConfig.from_dict(merge_config(TINY, {"episode": {"length": LENGTH, "envs": 2}}))
    task = load_config_task(base)
    out = {}
    for mode in MODE_TERMS:
        cfg = base.updated(reward={"mode": mode})
        env = MorphogeneticEnv(cfg, task=task)
        batch = next(iter(collector_for(env, make_policy("heuristic", env, cfg), 1)))
        out[mode] = (cfg, batch, env)
    return out


def _parts(batch) -> dict[str, torch.Tensor]:
    rc = batch.get(("next", "reward_components"))
    return {k: rc.get(k).double() for k in RewardComponents.names()}


def test_modes_play_the_same_episode(episodes) -> None:
    ops = [episodes[m][1]["op"] for m in MODE_TERMS]
    assert all(torch.equal(ops[0], o) for o in ops[1:])
    acc = [episodes[m][1]["next", "signals", "val_acc"] for m in MODE_TERMS]
    assert all(torch.equal(acc[0], a) for a in acc[1:])


@pytest.mark.parametrize("mode", list(MODE_TERMS))
def test_total_is_the_sum_of_the_paid_components(episodes, mode: str) -> None:
    _, batch, _ = episodes[mode]
    parts = _parts(batch)
    for k in COMPONENTS:
        if k not in MODE_TERMS[mode]:
            assert (parts[k] == 0).all(), k
    torch.testing.assert_close(sum(parts[k] for k in COMPONENTS), parts["total"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batch["next", "reward"].squeeze(-1).double(), parts["total"], rtol=1e-6, atol=1e-6)


def test_sparse_pays_only_the_final_accuracy(episodes) -> None:
    cfg, batch, _ = episodes["sparse"]
    reward = batch["next", "reward"].squeeze(-1)
    assert (reward[:, :-1] == 0).all()
    final_acc = batch["next", "signals", "val_acc"][:, -1]
    torch.testing.assert_close(reward.sum(1), cfg.reward.terminal * 0.01 * final_acc)
    assert (reward[:, -1] > 0).all()


def test_shaped_shaping_telescopes_to_minus_initial_potential(episodes) -> None:
    cfg, batch, env = episodes["shaped"]
    gamma = cfg.ppo.gamma
    shaping = _parts(batch)["shaping"]
    assert (shaping != 0).any()  # the heuristic grew seeds: shaping moved along the way
    discount = gamma ** torch.arange(LENGTH, dtype=torch.float64)
    s0 = batch["signals", "stage"][:, 0]  # the stages the episode started from
    assert (s0 == SeedStage.DORMANT).all()
    phi0 = env.reward_fn.phi(s0).double()
    torch.testing.assert_close((discount * shaping).sum(1), -phi0, rtol=0, atol=1e-6)
    # Shaped pays more than its shaping: contribution and rent move once seeds are live.
    parts = _parts(batch)
    assert (parts["rent"] < 0).any() and (parts["action_cost"] < 0).any()


def test_simplified_is_shaped_without_the_farmable_terms(episodes) -> None:
    shaped, simple = _parts(episodes["shaped"][1]), _parts(episodes["simplified"][1])
    for k in ("shaping", "action_cost", "terminal"):
        torch.testing.assert_close(simple[k], shaped[k])
    torch.testing.assert_close(simple["total"].sum(1),
                               (shaped["shaping"] + shaped["action_cost"] + shaped["terminal"]).sum(1))
    assert not torch.allclose(simple["total"].sum(1), shaped["total"].sum(1))


def test_unknown_reward_mode_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    rc = train.main(["--policy", "heuristic", "--reward-mode", "dense", "--envs", "2", "--episode-length", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "mode" in err[0]
