"""Issue 15: fail before the work, one error format, telemetry that survives, the governor."""

from __future__ import annotations

import json
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_config import TINY

from esper import evaluate, generate, train
from esper.nissa import NissaHub, make_backends
from esper.simic.checkpoint import load_checkpoint, save_checkpoint
from esper.simic.config import TrainingConfig, merge_config
from esper.simic.env import MorphogeneticEnv
from esper.simic.errors import ConfigError
from esper.simic.governor import policy_divergence
from esper.simic.runner import EpisodeRunner
from esper.tamiyo.features import RunningNorm
from esper.tamiyo.policies import make_policy


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture
def ckpt(tmp_path: Path, tiny: Path) -> Path:
    """A real one-round PPO checkpoint of the tiny config."""
    path = tmp_path / "ckpt" / "ppo.pt"
    assert train.main(["--config", str(tiny), "--preset", "default", "--rounds", "1", "--save", str(path),
                       "--backends", "jsonl", "--run-dir", str(tmp_path / "ckrun")]) == 0
    return path


def _bad_cifar(tmp_path: Path, kind: str) -> Path:
    root = tmp_path / f"cifar-{kind}"
    if kind == "missing":
        return root
    root.mkdir()
    if kind == "empty":
        return root
    good = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
    bad = {
        "truncated": None,
        "shape": {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]},
        "dtype": {b"data": np.zeros((4, 3072), np.float32), b"labels": [0, 1, 2, 3]},
        "labels": {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 12]},
    }[kind]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps(good))
    target = root / "data_batch_3"
    if bad is None:
        target.write_bytes(pickle.dumps(good)[:50])
    else:
        target.write_bytes(pickle.dumps(bad))
    return root


def _assert_usage_error(rc: int, err: str, where: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"({where}); " in lines[0], err
    assert "Traceback" not in err


CLI = {"train": train, "evaluate": evaluate, "generate": generate}
RUN = ["--config", "{tiny}", "--run-dir", "{tmp}/run"]
# Fault drills that cannot apply to the run they are given to (refused, never ignored).
BAD_FAULTS = {
    "env": {"faults": {"nan_loss_envs": [5]}},
    "epoch": {"faults": {"explode_loss_envs": [0], "at_epoch": 9}},
    "backend": {"faults": {"failing_backend": "tensorboard"}},  # the run writes console and jsonl
    "ppo_only": {"faults": {"policy_nan_at_round": 1}},
    "save_only": {"faults": {"checkpoint_fail_rounds": [1]}},
}
CIFAR_KINDS = ("missing", "empty", "truncated", "shape", "dtype", "labels")
# (id, command, argv, the "(where)" of the error); {tmp} {tiny} {blocker} {existing} {inf} are
# filled per test: every case of issue 15's list that must be one clear line, exit 2.
BAD_INPUTS: list[tuple[str, str, list[str], str]] = [
    ("unknown-backend", "train", ["--policy", "heuristic", "--backends", "console,nope", *RUN], "--backends"),
    ("no-such-gpu", "train", ["--policy", "heuristic", "--device", "cuda:99", *RUN], "--device"),
    ("empty-policies", "evaluate", ["--policies", "", *RUN], "--policies"),
    ("empty-policy-in-list", "evaluate", ["--policies", "static,,heuristic", *RUN], "--policies"),
    ("duplicate-policy", "evaluate", ["--policies", "static,static", *RUN], "--policies"),
    ("arg-on-argless-policy", "evaluate", ["--policies", "heuristic=3", *RUN], "--policies"),
    ("missing-checkpoint", "evaluate", ["--policies", "ppo={tmp}/missing.pt", *RUN], "--policies"),
    ("comma-backends", "evaluate", ["--policies", "static", "--backends", ",", *RUN], "--backends"),
    ("empty-backends", "evaluate", ["--policies", "static", "--backends", "", *RUN], "--backends"),
    ("rounds-with-heuristic", "train", ["--policy", "heuristic", "--rounds", "2", *RUN], "--rounds"),
    ("save-with-heuristic", "train", ["--policy", "heuristic", "--save", "{tmp}/x.pt", *RUN], "--save"),
    ("resume-with-static", "train", ["--policy", "static", "--resume", "{existing}", *RUN], "--resume"),
    ("infinite-lr", "train", ["--preset", "default", "--config", "{inf}", "--run-dir", "{tmp}/r"], "configuration"),
    ("run-dir-under-file", "train", ["--policy", "heuristic", "--backends", "jsonl", "--config", "{tiny}",
                                     "--run-dir", "{blocker}/run"], "--run-dir"),
    ("trace-is-file", "train", ["--policy", "heuristic", "--trace", "{blocker}", *RUN], "--trace"),
    ("json-under-file", "evaluate", ["--policies", "static", "--json", "{blocker}/out.json", *RUN], "--json"),
    ("json-is-dir", "evaluate", ["--policies", "static", "--json", "{tmp}", *RUN], "--json"),
    ("save-under-file", "train", ["--preset", "default", "--save", "{blocker}/ppo.pt", *RUN], "--save"),
    ("save-overwrites", "train", ["--preset", "default", "--save", "{existing}", *RUN], "--save"),
    ("generate-bad-backend", "generate", ["--policies", "heuristic", "--out", "{tmp}/p", "--backends", "bogus", *RUN],
     "--backends"),
    *[(f"cifar-{kind}", "train", ["--policy", "heuristic", "--config", f"{{tmp}}/cifar-{kind}.json",
                                  "--run-dir", "{tmp}/run"], "task.data_dir") for kind in CIFAR_KINDS],
    ("faults-env", "train", ["--policy", "heuristic", "--config", "{tmp}/faults-env.json", "--run-dir", "{tmp}/run"],
     "faults"),
    ("faults-epoch", "evaluate", ["--policies", "static", "--config", "{tmp}/faults-epoch.json",
                                  "--run-dir", "{tmp}/run"], "faults"),
    ("faults-backend", "train", ["--preset", "default", "--config", "{tmp}/faults-backend.json",
                                 "--run-dir", "{tmp}/run"], "faults"),
    ("faults-ppo-only", "train", ["--policy", "heuristic", "--config", "{tmp}/faults-ppo_only.json",
                                  "--run-dir", "{tmp}/run"], "faults"),
    ("faults-save-in-evaluate", "evaluate", ["--policies", "static", "--config", "{tmp}/faults-save_only.json",
                                             "--run-dir", "{tmp}/run"], "faults"),
    # Library messages that span lines (PyYAML's excerpt and caret, torch.load's advice) and
    # a random seed that is not one: still one line, naming the input.
    ("config-bad-yaml", "train", ["--policy", "heuristic", "--config", "{badyaml}", "--run-dir", "{tmp}/run"],
     "configuration"),
    ("profile-bad-yaml", "train", ["--policy", "heuristic", "--telemetry-file", "{badyaml}", *RUN], "configuration"),
    ("override-bad-yaml", "train", ["--policy", "heuristic", "--telemetry-set", "hindsight_epochs=[1", *RUN],
     "configuration"),
    ("resume-garbage", "train", ["--preset", "default", "--resume", "{garbage}", "--save", "{tmp}/new.pt", *RUN],
     "--resume"),
    ("init-garbage", "train", ["--preset", "default", "--init", "{garbage}", "--save", "{tmp}/new.pt", *RUN], "--init"),
    ("policies-garbage", "evaluate", ["--policies", "ppo={garbage}", *RUN], "--policies"),
    ("random-seed-not-int", "evaluate", ["--policies", "random=abc", *RUN], "--policies"),
    ("random-seed-negative", "train", ["--policy", "random=-1", *RUN], "--policy"),
    pytest.param("cuda-missing", "train", ["--policy", "heuristic", "--device", "cuda", *RUN], "--device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
]


@pytest.mark.parametrize(("case", "command", "argv", "where"), BAD_INPUTS,
                         ids=[c.values[0] if hasattr(c, "values") else c[0] for c in BAD_INPUTS])
def test_error_bad_input(case: str, command: str, argv: list[str], where: str, tmp_path: Path, tiny: Path,
                         capsys) -> None:
    """Every bad input of issue 15 is one stderr line, exit 2, no traceback, nothing run."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    existing = tmp_path / "existing.pt"
    existing.write_bytes(b"not overwritten")
    inf_cfg = tmp_path / "inf.json"
    inf_cfg.write_text(json.dumps(merge_config(TINY, {"ppo": {"lr": "inf"}})))
    if case.startswith("cifar-"):
        kind = case.removeprefix("cifar-")
        (tmp_path / f"{case}.json").write_text(json.dumps(merge_config(
            TINY, {"task": {"name": "cifar10", "data_dir": str(_bad_cifar(tmp_path, kind))}})))
    for name, over in BAD_FAULTS.items():
        (tmp_path / f"faults-{name}.json").write_text(json.dumps(merge_config(TINY, over)))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("task: [1\n")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(7, 107)))
    fill = {"tmp": tmp_path, "tiny": tiny, "blocker": blocker, "existing": existing, "inf": inf_cfg,
            "badyaml": bad_yaml, "garbage": garbage}
    rc = CLI[command].main([a.format(**fill) for a in argv])
    _assert_usage_error(rc, capsys.readouterr().err, where)
    assert existing.read_bytes() == b"not overwritten"
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_error_non_finite_config_values_are_refused() -> None:
    for section, key in (("ppo", "lr"), ("kasmina", "seed_lr"), ("reward", "terminal")):
        with pytest.raises(ConfigError, match=f"{section}.{key}"):
            TrainingConfig.from_dict(merge_config(TINY, {section: {key: float("inf")}}))
    with pytest.raises(ConfigError, match=r"non-finite values are not allowed: ppo\.lr"):
        TrainingConfig.from_dict(merge_config(TINY, {"ppo": {"lr": float("inf")}}))
    with pytest.raises(ConfigError, match=r"ppo\.target_kl"):
        TrainingConfig.from_dict(merge_config(TINY, {"ppo": {"target_kl": float("nan")}}))


def test_data_checkpoint_overwrite_and_resume_rounds(tmp_path: Path, tiny: Path, ckpt: Path, capsys) -> None:
    base = ["--config", str(tiny), "--preset", "default", "--backends", "jsonl", "--run-dir", str(tmp_path / "r")]
    before = ckpt.read_bytes()
    _assert_usage_error(train.main([*base, "--rounds", "1", "--save", str(ckpt)]), capsys.readouterr().err, "--save")
    assert ckpt.read_bytes() == before
    # Resuming at round 1 with --rounds 1 would train nothing and print a path never written.
    rc = train.main([*base, "--rounds", "1", "--resume", str(ckpt), "--save", str(ckpt)])
    err = capsys.readouterr().err
    _assert_usage_error(rc, err, "--rounds")
    assert "round 1" in err
    # --policies ppo=... with --resume-only checkpoint round: --force lets a fresh run overwrite.
    assert train.main([*base, "--rounds", "1", "--save", str(ckpt), "--force"]) == 0
    assert load_checkpoint(ckpt)["round"] == 1


def test_error_resume_of_another_config_is_refused_before_any_work(tmp_path: Path, tiny: Path, ckpt: Path,
                                                                     capsys) -> None:
    """A checkpoint of another env count or setting was refused only once the trainer was built
    and the run's telemetry opened; now before either (nothing in the run dir)."""
    run = tmp_path / "resumed"
    base = ["--config", str(tiny), "--preset", "default", "--rounds", "2", "--resume", str(ckpt),
            "--backends", "jsonl", "--run-dir", str(run), "--save", str(tmp_path / "r.pt")]
    for extra, words in ((["--envs", "3"], "envs: checkpoint 2 != run 3"),
                         (["--task-seed", "4"], "task.seed: checkpoint 0 != run 4")):
        rc = train.main([*base, *extra])
        err = capsys.readouterr().err
        _assert_usage_error(rc, err, "--resume")
        assert "cannot resume" in err and words in err, err
        assert not run.exists()
    assert not (tmp_path / "r.pt").exists()
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps(merge_config(TINY, {"ppo": {"hidden_size": 40}})))
    rc = train.main(["--config", str(wide), "--preset", "default", "--rounds", "1", "--init", str(ckpt),
                     "--backends", "jsonl", "--run-dir", str(run), "--save", str(tmp_path / "r.pt")])
    err = capsys.readouterr().err
    _assert_usage_error(rc, err, "--init")
    assert "hidden_size: checkpoint 128 != run 40" in err and not run.exists()


def test_data_sigterm_stops_ppo_after_round_with_checkpoint_and_telemetry(tmp_path: Path, tiny: Path, capsys,
                                                                     monkeypatch) -> None:
    from esper.simic.ppo import PPOTrainer

    original = PPOTrainer.train_round

    def round_then_sigterm(self):  # the signal arrives during round 1; the run ends after it
        stats = original(self)
        if self.round == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return stats

    monkeypatch.setattr(PPOTrainer, "train_round", round_then_sigterm)
    save = tmp_path / "ppo.pt"
    rc = train.main(["--config", str(tiny), "--preset", "default", "--rounds", "3", "--save", str(save),
                     "--backends", "jsonl", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 143, err
    assert err.strip() == f"interrupted; last checkpoint {save} at round 1"
    assert load_checkpoint(save)["round"] == 1
    lines = [json.loads(x) for x in (tmp_path / "run" / "telemetry.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "ppo_update" for e in lines)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_data_sigint_stops_heuristic_after_the_epoch(tmp_path: Path, tiny: Path, capsys, monkeypatch) -> None:
    from esper.simic import pipeline

    original = pipeline.EpochPipeline.end

    def end_then_sigint(self, *args):  # Ctrl-C during epoch 2: the run ends with that epoch
        if self.epochs == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args)

    monkeypatch.setattr(pipeline.EpochPipeline, "end", end_then_sigint)
    rc = train.main(["--policy", "heuristic", "--config", str(tiny), "--backends", "jsonl",
                     "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 130 and err.strip() == "interrupted; 2 epochs done, telemetry flushed", err
    epochs = [e for e in map(json.loads, (tmp_path / "run" / "telemetry.jsonl").read_text().splitlines())
              if e["kind"] == "epoch"]
    assert len(epochs) == 2


def test_data_jsonl_is_flushed_every_epoch(tmp_path: Path) -> None:
    """What a SIGKILL would leave: every finished epoch is in the file before the hub closes."""
    cfg = TrainingConfig.from_dict(TINY)
    env = MorphogeneticEnv(cfg)
    hub = NissaHub(make_backends(["jsonl"], run_dir=tmp_path))
    seen = []

    def on_epoch(step: int, snap: dict) -> None:
        text = (tmp_path / "telemetry.jsonl").read_text()
        seen.append(sum(json.loads(x)["kind"] == "epoch" for x in text.splitlines()))

    EpisodeRunner(env, make_policy("heuristic", env, cfg), hub=hub, on_epoch=on_epoch).run(1)
    assert seen == [1, 2, 3]
    hub.close()


def test_data_stale_temp_files_are_removed_on_the_next_save(tmp_path: Path) -> None:
    target = tmp_path / "ppo.pt"
    orphan = tmp_path / ".ppo.pt.abc123.tmp"
    orphan.write_bytes(b"half a checkpoint")
    other = tmp_path / ".other.pt.abc.tmp"
    other.write_bytes(b"not ours")
    payload = {k: 0 for k in ("version", "round", "config", "policy_shape", "modules", "optimizer", "obs_norm",
                              "env_episode", "rng", "history")}
    save_checkpoint(target, payload)
    assert not orphan.exists() and other.exists() and target.exists()
    json_orphan = tmp_path / ".res.json.x.tmp"
    json_orphan.write_text("{")
    evaluate.write_json_atomic(tmp_path / "res.json", {"a": 1})
    assert not json_orphan.exists()


# ----------------------------------------------------------------------------- governor
def test_fault_running_norm_ignores_non_finite_and_huge_rows() -> None:
    x = torch.randn(5, 4)
    clean, dirty = RunningNorm(4), RunningNorm(4)
    clean.update(x)
    poisoned = torch.cat([x, torch.full((1, 4), float("nan")), torch.full((1, 4), 1e30)])
    dirty.update(poisoned)
    assert torch.allclose(clean.mean, dirty.mean) and torch.allclose(clean.var, dirty.var)
    assert clean.count == 5 and dirty.count == 5
    plain = RunningNorm(4)
    plain.update(x)  # the healthy batch is exactly the old arithmetic
    assert torch.equal(plain.mean, x.mean(0))
    assert torch.isfinite(dirty(poisoned)).all()


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "telemetry.jsonl").read_text().splitlines()]


def _config(tmp_path: Path, name: str, over: dict) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(merge_config(TINY, over)))
    return path


@pytest.mark.parametrize(("drill", "cause"), [("nan_loss_envs", "(train_loss nan)"),
                                              ("explode_loss_envs", "e+11 > 10000)")], ids=["nan", "explode"])
def test_fault_governor_rolls_back_a_sick_env_and_leaves_the_others_identical(drill: str, cause: str) -> None:
    """The faults config poisons env 1 before epoch 2; the governor rolls it back; envs 0 and 2
    end exactly as without the drill."""
    base = merge_config(TINY, {"episode": {"envs": 3, "length": 4}})

    def run(faults: dict):
        cfg = TrainingConfig.from_dict(merge_config(base, {"faults": faults}))
        env = MorphogeneticEnv(cfg)
        hub = NissaHub(synchronous=True)
        events: list = []
        hub.emit = events.append  # type: ignore[method-assign]
        return EpisodeRunner(env, make_policy("heuristic", env, cfg), hub=hub).run(1), events, env

    clean, _, _ = run({})
    faulty, events, env = run({drill: [1], "at_epoch": 2})
    assert env.faults is not None and env.faults.hits == 1
    for a, b in zip(clean, faulty, strict=True):
        if a.env == 1:
            assert b.governed and "rollback@2" in b.trajectory
            assert np.isfinite(b.test_acc) and np.isfinite(b.total_reward)
        else:
            assert not b.governed
            assert (a.test_acc, a.final_val_acc, a.total_reward, a.trajectory) == \
                   (b.test_acc, b.final_val_acc, b.total_reward, b.trajectory)
    anomalies = [e for e in events if getattr(e, "detector", "") == "governor"]
    assert [(e.env, e.epoch) for e in anomalies] == [(1, 2)] and "rolled back" in anomalies[0].message
    assert cause in anomalies[0].message
    named = anomalies[0].payload["nonfinite_params"]  # debug telemetry names the parameters
    if drill == "nan_loss_envs":
        host = env.kasmina.state["host"]
        for key, value in host.items(include_nested=True, leaves_only=True):
            if value.is_floating_point():
                assert named[f"host.{key}"] == value[1].numel(), key
        assert "non-finite parameters: host." in anomalies[0].message
    else:
        assert isinstance(named, dict)
    assert MorphogeneticEnv(TrainingConfig.from_dict(base)).faults is None  # no drill: nothing runs


def test_fault_drill_epoch_keeps_one_host_transfer() -> None:
    """The epoch a drill poisons (and the governor rolls back) leaves the device once for the
    epoch and once more for the debug telemetry naming the non-finite parameters (issue 19);
    a healthy epoch, once."""
    from esper.nissa.syncs import count_host_syncs
    from esper.tamiyo.heuristic import HeuristicPolicy

    cfg = TrainingConfig.from_dict(merge_config(TINY, {"episode": {"envs": 3, "length": 3},
                                                       "faults": {"nan_loss_envs": [1], "at_epoch": 2}}))
    env = MorphogeneticEnv(cfg)
    policy = HeuristicPolicy(cfg.heuristic, env.blueprint_names, env.n, env.device)
    with count_host_syncs() as healthy:
        td = env.step(policy(env.reset()))["next"]  # epoch 1: healthy
    assert healthy.calls == ["numpy"], healthy.calls
    with count_host_syncs() as syncs:
        env.step(policy(td))  # epoch 2: poisoned, judged, rolled back
    assert syncs.calls == ["numpy", "numpy"], syncs.calls
    assert env.faults.hits == 1 and env.pipeline.governor.rollbacks.tolist() == [0, 1, 0]


def test_fault_nan_drill_heuristic_cli(tmp_path: Path, capsys) -> None:
    """Issue 15's done-when: faults.nan_loss_envs [1] at epoch 3, 4 envs, heuristic, 8 epochs."""
    over = {"episode": {"envs": 4, "length": 8}}
    finals = {}
    for name, faults in (("clean", {}), ("drill", {"nan_loss_envs": [1], "at_epoch": 3})):
        cfg = _config(tmp_path, name, merge_config(over, {"faults": faults}))
        assert train.main(["--policy", "heuristic", "--config", str(cfg), "--backends", "jsonl",
                           "--run-dir", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        assert "8 host transfers for 8 epochs" in out  # the drill adds no device-to-host transfer
        events = _events(tmp_path / name)
        finals[name] = {e["env"]: e["payload"] for e in events if e["kind"] == "episode"}
        rollbacks = [(e["env"], e["epoch"]) for e in events if e.get("detector") == "governor"]
        assert rollbacks == ([(1, 3)] if faults else [])
    assert finals["drill"][1]["governed"] and "rollback@3" in finals["drill"][1]["trajectory"]
    assert "1 governed episodes excluded" in out
    for i in (0, 2, 3):
        a, b = finals["clean"][i], finals["drill"][i]
        assert not b["governed"]
        assert (a["test_acc"], a["final_val_acc"], a["total_reward"]) == (b["test_acc"], b["final_val_acc"],
                                                                          b["total_reward"])


def _finite_checkpoint(path: Path, rounds: int) -> dict:
    ckpt = load_checkpoint(path)
    assert ckpt["round"] == rounds
    assert all(torch.isfinite(v).all() for v in ckpt["modules"].values() if v.is_floating_point())
    return ckpt


def test_fault_nan_drill_ppo_cli(tmp_path: Path) -> None:
    """The same drill under PPO: every round completes, the saved policy is finite."""
    cfg = _config(tmp_path, "drill", {"faults": {"nan_loss_envs": [1], "at_epoch": 2}})
    save = tmp_path / "ppo.pt"
    assert train.main(["--config", str(cfg), "--preset", "default", "--rounds", "2", "--save", str(save),
                       "--backends", "jsonl", "--run-dir", str(tmp_path / "run")]) == 0
    _finite_checkpoint(save, 2)
    events = _events(tmp_path / "run")
    assert [(e["env"], e["epoch"]) for e in events if e.get("detector") == "governor"] == [(1, 2), (1, 2)]
    updates = [e["payload"] for e in events if e["kind"] == "ppo_update"]
    assert [u["round"] for u in updates] == [1, 2] and all(np.isfinite(u["mean_return"]) for u in updates)


def test_fault_governor_keeps_ppo_alive_with_a_diverging_env() -> None:
    from esper.simic.ppo import PPOTrainer

    cfg = TrainingConfig.from_dict(merge_config(TINY, {"episode": {"envs": 3, "length": 3},
                                                       "faults": {"nan_loss_envs": [2], "at_epoch": 2}}))
    trainer = PPOTrainer(cfg)
    stats = trainer.train_round()  # before: "probability tensor contains either inf, nan"
    assert all(torch.isfinite(p).all() for p in trainer.params) and stats.rolled_back is None
    norm = trainer.base_env.features.norm
    assert torch.isfinite(norm.mean).all() and torch.isfinite(norm.var).all()
    assert np.isfinite(stats.mean_return) and np.isfinite(stats.test_acc)
    assert trainer.base_env.pipeline.governor.rollbacks.tolist() == [0, 0, 1]


def test_fault_policy_divergence_rule() -> None:
    assert policy_divergence(0.9, 0.1, 0) is None
    assert "3 non-finite" in policy_divergence(0.9, 0.1, 3)
    assert policy_divergence(0.0, -1011.0, 0) == "collapsed: op entropy 0 with explained variance -1.01e+03"
    # one sign alone is a converged policy or a critic catching up, not a divergence
    assert policy_divergence(0.0, 0.1, 0) is None
    assert policy_divergence(0.9, -1011.0, 0) is None
    assert "non-finite update" in policy_divergence(float("nan"), 0.1, 0)


def test_fault_diverged_policy_update_is_rolled_back() -> None:
    """faults.policy_nan_at_round: the update's NaN is undone (weights and Adam state of the
    previous round, bit for bit), an anomaly names it, and the next round trains on."""
    from esper.simic.ppo import PPOTrainer

    cfg = TrainingConfig.from_dict(merge_config(TINY, {"faults": {"policy_nan_at_round": 2}}))
    hub = NissaHub(synchronous=True)
    events: list = []
    hub.emit = events.append  # type: ignore[method-assign]
    trainer = PPOTrainer(cfg, hub=hub)
    assert trainer.train_round().rolled_back is None
    weights = {k: v.clone() for k, v in trainer.modules.state_dict().items()}
    adam = trainer.optimizer.state_dict()["state"]
    moments = {i: s["exp_avg"].clone() for i, s in adam.items()}
    stats = trainer.train_round()
    assert stats.round == 2 and stats.rolled_back == "1 non-finite policy parameters"
    assert all(torch.equal(v, weights[k]) for k, v in trainer.modules.state_dict().items())
    after = trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(after[i]["exp_avg"], m) for i, m in moments.items())
    rollbacks = [e for e in events if getattr(e, "detector", "") == "policy_governor"]
    assert [e.epoch for e in rollbacks] == [2] and "rolled back to the policy and optimizer state of round 1" \
        in rollbacks[0].message
    assert trainer.train_round().rolled_back is None and trainer.round == 3
    assert all(torch.isfinite(p).all() for p in trainer.params)
    assert [h["rolled_back"] is not None for h in trainer.history] == [False, True, False]


def test_fault_diverged_policy_cli_continues(tmp_path: Path, capsys) -> None:
    cfg = _config(tmp_path, "drill", {"faults": {"policy_nan_at_round": 1}})
    save = tmp_path / "ppo.pt"
    assert train.main(["--config", str(cfg), "--preset", "default", "--rounds", "2", "--save", str(save),
                       "--backends", "jsonl", "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "rolled back: 1 non-finite policy parameters" in out and "diverged policy updates rolled back: 1" in out
    ckpt = _finite_checkpoint(save, 2)
    assert [h["rolled_back"] for h in ckpt["history"]] == ["1 non-finite policy parameters", None]
    assert any(e.get("detector") == "policy_governor" for e in _events(tmp_path / "run"))


@pytest.mark.parametrize("fail_round", [1, 2])
def test_fault_checkpoint_write_fails(tmp_path: Path, capsys, fail_round: int) -> None:
    """A save that runs out of space half-way: the previous checkpoint and no temp file stay;
    the run goes on (and retries next round); a failed last save is an error, exit 1."""
    cfg = _config(tmp_path, "drill", {"faults": {"checkpoint_fail_rounds": [fail_round]}})
    save = tmp_path / "ckpt" / "ppo.pt"
    rc = train.main(["--config", str(cfg), "--preset", "default", "--rounds", "2", "--save", str(save),
                     "--backends", "jsonl", "--run-dir", str(tmp_path / "run")])
    captured = capsys.readouterr()
    kept = "no checkpoint yet" if fail_round == 1 else f"last checkpoint {save} at round 1 kept"
    assert f"warning: checkpoint {save} not written at round {fail_round} (No space left on device (fault " \
           f"drill)); {kept}" in captured.err
    assert sorted(x.name for x in save.parent.iterdir()) == ["ppo.pt"]  # no half-written temp file
    assert any(e.get("detector") == "checkpoint" for e in _events(tmp_path / "run"))
    if fail_round == 1:
        assert rc == 0 and f"checkpoint {save}" in captured.out
        _finite_checkpoint(save, 2)
    else:
        assert rc == 1 and "checkpoint" not in captured.out.splitlines()[-1]
        assert captured.err.strip().splitlines()[-1] == (
            f"error: the round 2 checkpoint was not written ({save}); last checkpoint {save} at round 1; "
            "free space or pick another --save, then --resume")
        _finite_checkpoint(save, 1)


# ----------------------------------------------------------------------------- lost telemetry
@pytest.mark.parametrize("synchronous", [True, False])
def test_fault_full_disk_backend_is_disabled_and_its_losses_counted(tmp_path: Path, synchronous: bool) -> None:
    """Buffered writes succeed while every flush fails: the backend is still disabled after
    three failed flushes, and every event is either in the file or counted lost."""
    from esper.leyline import EventKind, TelemetryEvent
    from esper.nissa import JsonlBackend
    from esper.simic.faults import FullDiskBackend

    jsonl = JsonlBackend(tmp_path / "t.jsonl")
    hub = NissaHub([FullDiskBackend(jsonl, fails_after=2)], synchronous=synchronous, max_failures=3)
    for epoch in range(10):  # 3 events and one flush per "epoch", as the pipeline does
        for _ in range(3):
            hub.emit(TelemetryEvent(kind=EventKind.EPOCH, epoch=epoch))
        hub.flush()
    hub.close()
    written = len((tmp_path / "t.jsonl").read_text().splitlines())
    assert written == 6 and hub.active_backends == []  # two good flushes, then three failures
    assert hub.losses() == {"jsonl": 24} and hub.emitted == 30
    assert hub.loss_report() == ["telemetry lost: jsonl dropped 24 of 30 events; disabled after repeated "
                                 "failures (OSError: [Errno 28] No space left on device (fault drill))"]


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_fault_failing_backend_drill_reports_what_was_dropped(tmp_path: Path, capsys, command: str) -> None:
    cfg = _config(tmp_path, "drill", {"faults": {"failing_backend": "jsonl", "backend_fails_after": 1}})
    argv = ["--policy", "heuristic"] if command == "train" else ["--policies", "static"]
    rc = CLI[command].main([*argv, "--config", str(cfg), "--backends", "jsonl", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 0, err
    line = [x for x in err.splitlines() if x.startswith("telemetry lost: jsonl dropped ")]
    assert len(line) == 1 and line[0].endswith("No space left on device (fault drill))"), err
    lost, total = (int(x) for x in line[0].split("dropped ")[1].split(" events")[0].split(" of "))
    written = len((tmp_path / "run" / "telemetry.jsonl").read_text().splitlines())
    assert 0 < lost < total and written + lost == total  # nothing unaccounted for


# ----------------------------------------------------------------------------- killed runs
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_data_killed_training_keeps_a_resumable_checkpoint(tmp_path: Path, tiny: Path, sig: int) -> None:
    """A real ``python -m esper.train`` killed after its first round: the checkpoint loads and
    resumes, the JSONL holds every completed round; SIGTERM also says where it stopped, 143."""
    import subprocess
    import sys
    import time

    save, run = tmp_path / "ppo.pt", tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "esper.train", "--config", str(tiny), "--preset", "default",
                             "--rounds", "1000", "--save", str(save), "--backends", "jsonl", "--run-dir", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 50
    while not save.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert save.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in 50 s"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    rounds = load_checkpoint(save)["round"]
    assert rounds >= 1
    lines = (run / "telemetry.jsonl").read_text().splitlines()
    events = []
    for i, line in enumerate(lines):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # only a kill in mid-write can cut a line: the last one
            assert sig == signal.SIGKILL and i == len(lines) - 1, line
    updates = [e["epoch"] for e in events if e["kind"] == "ppo_update"]
    assert updates[:rounds] == list(range(1, rounds + 1))  # every checkpointed round's update is on disk
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, err
        assert err.strip().splitlines()[-1] == f"interrupted; last checkpoint {save} at round {rounds}"
        assert updates == list(range(1, rounds + 1))  # ... and exactly the completed rounds
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not [x for x in tmp_path.iterdir() if x.name.endswith(".tmp")]
    assert train.main(["--config", str(tiny), "--preset", "default", "--rounds", str(rounds + 1), "--resume",
                       str(save), "--save", str(save), "--backends", "jsonl", "--run-dir", str(run)]) == 0
    assert load_checkpoint(save)["round"] == rounds + 1
