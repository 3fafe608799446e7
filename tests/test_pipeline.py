"""One epoch pipeline for every controller, scored on data no decision saw (issue 12)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_config import TINY

from esper import evaluate, train
from esper.leyline import SCORE_KEYS, SIGNAL_KEYS
from esper.nissa import TRANSFERS, load_profile
from esper.nissa.syncs import count_host_syncs
from esper.simic.config import TrainingConfig
from esper.simic.env import MorphogeneticEnv
from esper.simic.ppo import PPOTrainer
from esper.simic.ppo_round import collect
from esper.simic.runner import EpisodeRunner
from esper.tamiyo.policies import make_policy
from esper.tasks import TaskData, load_task


def _cfg(**over: dict) -> TrainingConfig:
    base = TrainingConfig.from_dict(TINY).updated(
        task={"train_size": 64, "val_size": 32, "test_size": 48, "image_size": 8},
        kasmina={"batch_size": 32, "val_batch_size": 32},
        episode={"envs": 3, "length": 3},
        ppo={"minibatch_envs": 3, "epochs": 1, "hidden_size": 16, "lstm_hidden_size": 16},
    )
    return base.updated(**over) if over else base


# ----------------------------------------------------------------------------- transfers
def test_ppo_collection_makes_one_transfer_per_epoch() -> None:
    """torchrl's Collector drives the env; each epoch leaves the device exactly once."""
    cfg = _cfg()
    trainer = PPOTrainer(cfg)
    collect(trainer)  # first batch: lazy set-up is not the loop
    before = TRANSFERS.count
    with count_host_syncs() as syncs:
        batch = collect(trainer)
    epochs = cfg.episode.length
    assert batch.batch_size == torch.Size([cfg.episode.envs, epochs])
    assert TRANSFERS.count - before == epochs
    assert syncs.calls == ["numpy"] * epochs, Counter(syncs.calls)


def test_runner_makes_one_transfer_per_epoch_over_episodes() -> None:
    cfg = _cfg()
    env = MorphogeneticEnv(cfg)
    runner = EpisodeRunner(env, make_policy("heuristic", env, cfg))
    with count_host_syncs() as syncs:
        summaries = runner.run(2)
    assert len(summaries) == 2 * cfg.episode.envs
    assert runner.transfers == runner.epochs == 2 * cfg.episode.length
    assert syncs.calls == ["numpy"] * runner.epochs, Counter(syncs.calls)


# ----------------------------------------------------------------------------- telemetry while PPO trains
def _epoch_events(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "telemetry.jsonl").read_text().splitlines() if x.strip()]
    return [e for e in lines if e["kind"] == "epoch"]


@pytest.mark.parametrize("profile", ["diagnostic", "minimal"])
def test_ppo_training_emits_the_profiles_epoch_telemetry(tmp_path: Path, profile: str) -> None:
    run_dir = tmp_path / profile
    code = train.main(["--envs", "4", "--rounds", "1", "--episode-length", "4", "--telemetry", profile,
                       "--backends", "jsonl", "--run-dir", str(run_dir)])
    assert code == 0
    epochs = _epoch_events(run_dir)
    assert len(epochs) == 4  # one per epoch of the round
    keys = set(epochs[-1]["payload"])
    diag = {"diag.per_class.accuracy", "diag.gradients.total_norm"}
    if profile == "diagnostic":
        assert diag <= keys, sorted(k for k in keys if k.startswith("diag."))
    else:
        assert not any(k.startswith(("diag.per_class", "diag.gradients")) for k in keys)


# ----------------------------------------------------------------------------- test split
def test_every_task_has_three_disjoint_splits() -> None:
    task = load_task("synthetic", train_size=40, val_size=20, test_size=30, seed=4)
    assert (task.train_size, task.val_size, task.test_size) == (40, 20, 30)
    flat = [x.reshape(x.shape[0], -1) for _, x, _ in task.splits()]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert torch.cdist(flat[a], flat[b]).min() > 0  # no image shared between splits


def test_test_split_leaves_train_and_val_unchanged() -> None:
    """Adding the split did not move the data every earlier number was measured on."""
    a = load_task("synthetic", train_size=40, val_size=20, test_size=5, seed=4)
    b = load_task("synthetic", train_size=40, val_size=20, test_size=50, seed=4)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_x, b.val_x)
    assert torch.equal(a.train_y, b.train_y) and torch.equal(a.val_y, b.val_y)


def test_test_score_equals_validation_on_the_same_images() -> None:
    """The test pass is the validation pass's actual-model row, on another split."""
    base = load_task("synthetic", train_size=64, val_size=32, test_size=8, seed=6)
    same = TaskData(name="twin", train_x=base.train_x, train_y=base.train_y, val_x=base.val_x,
                    val_y=base.val_y, test_x=base.val_x, test_y=base.val_y, num_classes=base.num_classes)
    cfg = _cfg(kasmina={"blueprints": ["norm", "conv_small"]})
    env = MorphogeneticEnv(cfg, task=same)
    env.reset()
    kas = env.kasmina
    for _ in range(2):  # germinate a seed so the models differ from the bare host
        from tensordict import TensorDict

        td = TensorDict({"op": torch.ones(3, dtype=torch.long), "slot": torch.zeros(3, dtype=torch.long),
                         "blueprint": torch.ones(3, dtype=torch.long), "tempo": torch.zeros(3, dtype=torch.long)},
                        batch_size=[3])
        kas.run_epoch(td)
    val, test = kas.validate(), kas.test()
    torch.testing.assert_close(test["test_acc"], val["val_acc"])
    torch.testing.assert_close(test["test_loss"], val["val_loss"])


def test_controllers_never_see_test_scores() -> None:
    cfg = _cfg()
    env = MorphogeneticEnv(cfg)
    seen: list[set[str]] = []

    class Spy:
        def __init__(self) -> None:
            self.inner = make_policy("heuristic", env, cfg)

        def __call__(self, td):
            seen.append({k if isinstance(k, str) else ".".join(k) for k in td.keys(True, True)})
            return self.inner(td)

    summaries = EpisodeRunner(env, Spy()).run(1)
    assert set(SIGNAL_KEYS).isdisjoint(SCORE_KEYS)
    assert seen and not any("test" in k for keys in seen for k in keys)
    # ...yet every episode is scored on the test split, and it is not the validation score
    test = np.array([s.test_acc for s in summaries])
    val = np.array([s.final_val_acc for s in summaries])
    assert np.isfinite(test).all() and not np.array_equal(test, val)


def test_policies_restart_on_a_fresh_host_without_a_reset_call() -> None:
    """Any driver may reset the env: a stateful policy restarts from ``signals.epoch == 0``."""
    cfg = _cfg()
    env = MorphogeneticEnv(cfg)
    policy = make_policy("random", env, cfg, seed=3)
    td = policy(env.reset())
    assert policy.episode.tolist() == [1, 1, 1] and policy.calls.tolist() == [1, 1, 1]
    td = policy(env.step(td)["next"])  # epoch 1: same episode, next draw
    assert policy.episode.tolist() == [1, 1, 1] and policy.calls.tolist() == [2, 2, 2]
    policy(env.reset())  # fresh hosts, nobody told the policy
    assert policy.episode.tolist() == [2, 2, 2] and policy.calls.tolist() == [1, 1, 1]


# ----------------------------------------------------------------------------- held-out tasks
def test_task_seed_flag_changes_the_data_and_is_recorded(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(_cfg().user_set()))
    code = evaluate.main(["--config", str(cfg_file), "--policies", "static", "--envs", "2",
                          "--task-seed", "11", "--seed", "5", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["task_seed"] == 11 and data["host_seed"] == 5
    assert data["config"]["task"]["seed"] == 11
    r = data["results"]["static"]
    assert set(r["test_acc"]) == {"mean", "std"} and 0.0 <= r["test_acc"]["mean"] <= 100.0
    a = load_task("synthetic", train_size=16, val_size=8, test_size=8, seed=11)
    b = load_task("synthetic", train_size=16, val_size=8, test_size=8, seed=0)
    assert not torch.equal(a.test_x, b.test_x)


def test_profile_escalation_does_not_leak_into_the_default(tmp_path: Path) -> None:
    """The pipeline the runner configures is the env's own: a second runner starts clean."""
    cfg = _cfg()
    env = MorphogeneticEnv(cfg)
    EpisodeRunner(env, make_policy("static", env, cfg), profile=load_profile("diagnostic")).run(1)
    runner = EpisodeRunner(env, make_policy("static", env, cfg))
    assert runner.env.pipeline.profile.name == "minimal" and runner.transfers == 0


def test_culls_are_counted_in_the_episode_summary() -> None:
    """A cull passes CULLED -> EMBARGOED in one epoch; the tracker and summary still count it."""
    from tensordict import TensorDict

    from esper.leyline import Op

    cfg = _cfg(episode={"envs": 2, "length": 3})
    env = MorphogeneticEnv(cfg)
    td = env.reset()
    plan = [Op.GERMINATE, Op.CULL, Op.WAIT]
    for op in plan:
        td.update(TensorDict({"op": torch.full((2,), int(op)), "slot": torch.zeros(2, dtype=torch.long),
                              "blueprint": torch.zeros(2, dtype=torch.long),
                              "tempo": torch.zeros(2, dtype=torch.long)}, batch_size=[2]))
        td = env.step(td)["next"]
    summaries = env.pipeline.take_summaries()
    assert [s.culled for s in summaries] == [1, 1]
    assert all("cull(" in s.trajectory for s in summaries)


def test_captures_are_requested_by_argument_and_returned_by_the_epoch() -> None:
    from tensordict import TensorDict

    from esper.kasmina.epoch import KasminaConfig, MorphogeneticBatch

    task = load_task("synthetic", train_size=32, val_size=16, test_size=8, seed=2)
    mb = MorphogeneticBatch(task, 3, KasminaConfig(batch_size=16, val_batch_size=16), base_seed=1)
    wait = TensorDict({k: torch.zeros(3, dtype=torch.long) for k in ("op", "slot", "blueprint", "tempo")},
                      batch_size=[3])
    signals = mb.run_epoch(wait, capture=frozenset({"grads", "activations", "logits"}))
    cap = signals["captured"]
    keys = set(cap.keys())
    assert "val_logits" in keys and any(k.startswith("grad.") for k in keys) and any(k.startswith("act.") for k in keys)
    assert cap["val_logits"].shape == (3, task.val_size, task.num_classes)
    assert all(cap[k].shape[0] == 3 for k in keys)  # env-first, like every signal
    assert not hasattr(mb, "captured") and "captured" not in mb.last.keys()  # noqa: SIM118 (TensorDict iterates rows)
    assert "captured" not in mb.run_epoch(wait).keys()  # nothing asked, nothing returned  # noqa: SIM118
