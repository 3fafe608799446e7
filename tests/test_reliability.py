"""Issue 15: fail before the work, one error format, telemetry that survives, the governor."""

from __future__ import annotations

import json
import os
import pickle
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_config import TINY

from esper import evaluate, generate, train
from esper.nissa import NissaHub, make_backends
from esper.simic.checkpoint import load_checkpoint, save_checkpoint
from esper.simic.config import ConfigError, TrainingConfig, merge_config
from esper.simic.env import MorphogeneticEnv
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


def test_bad_inputs_give_one_line_errors_before_any_work(tmp_path: Path, tiny: Path, capsys) -> None:
    """Every bad input of issue 15 is one stderr line, exit 2, no traceback, nothing run."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    run = ["--config", str(tiny), "--run-dir", str(tmp_path / "run")]
    inf_cfg = tmp_path / "inf.json"
    inf_cfg.write_text(json.dumps(merge_config(TINY, {"ppo": {"lr": "inf"}})))
    existing = tmp_path / "existing.pt"
    existing.write_bytes(b"not overwritten")
    cases = [
        (train, ["--policy", "heuristic", "--backends", "console,nope", *run], "--backends"),
        (train, ["--policy", "heuristic", "--device", "cuda:99", *run], "--device"),
        (evaluate, ["--policies", "ppo", *run], "--policies"),
        (evaluate, ["--policies", "", *run], "--policies"),
        (evaluate, ["--policies", "static,,heuristic", *run], "--policies"),
        (evaluate, ["--policies", "static,static", *run], "--policies"),
        (evaluate, ["--policies", "heuristic=3", *run], "--policies"),
        (evaluate, ["--policies", "ppo=" + str(tmp_path / "missing.pt"), *run], "--policies"),
        (evaluate, ["--policies", "static", "--backends", ",", *run], "--backends"),
        (evaluate, ["--policies", "static", "--backends", "", *run], "--backends"),
        (train, ["--policy", "heuristic", "--rounds", "2", *run], "--rounds"),
        (train, ["--policy", "heuristic", "--save", str(tmp_path / "x.pt"), *run], "--save"),
        (train, ["--policy", "static", "--resume", str(existing), *run], "--resume"),
        (train, ["--preset", "default", "--config", str(inf_cfg), "--run-dir", str(tmp_path / "r")], "configuration"),
        (train, ["--policy", "heuristic", "--backends", "jsonl", "--config", str(tiny),
                 "--run-dir", str(blocker / "run")], "--run-dir"),
        (train, ["--policy", "heuristic", "--trace", str(blocker), *run], "--trace"),
        (evaluate, ["--policies", "static", "--json", str(blocker / "out.json"), *run], "--json"),
        (evaluate, ["--policies", "static", "--json", str(tmp_path), *run], "--json"),
        (train, ["--preset", "default", "--save", str(blocker / "ppo.pt"), *run], "--save"),
        (train, ["--preset", "default", "--save", str(existing), *run], "--save"),
        (generate, ["--policies", "heuristic", "--out", str(tmp_path / "p"), "--backends", "bogus", *run],
         "--backends"),
    ]
    if not torch.cuda.is_available():
        cases.append((train, ["--policy", "heuristic", "--device", "cuda", *run], "--device"))
    for kind in ("missing", "empty", "truncated", "shape", "dtype", "labels"):
        cifar = tmp_path / f"cifar-{kind}.json"
        cifar.write_text(json.dumps(merge_config(TINY, {"task": {"name": "cifar10",
                                                                "data_dir": str(_bad_cifar(tmp_path, kind))}})))
        cases.append((train, ["--policy", "heuristic", "--config", str(cifar), "--run-dir", str(tmp_path / "run")],
                      "task.data_dir"))
    for module, argv, where in cases:
        rc = module.main(argv)
        _assert_usage_error(rc, capsys.readouterr().err, where)
    assert existing.read_bytes() == b"not overwritten"
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_non_finite_config_values_are_refused() -> None:
    for section, key in (("ppo", "lr"), ("kasmina", "seed_lr"), ("reward", "terminal")):
        with pytest.raises(ConfigError, match=f"{section}.{key}"):
            TrainingConfig.from_dict(merge_config(TINY, {section: {key: float("inf")}}))
    with pytest.raises(ConfigError, match=r"non-finite values are not allowed: ppo\.lr"):
        TrainingConfig.from_dict(merge_config(TINY, {"ppo": {"lr": float("inf")}}))
    with pytest.raises(ConfigError, match=r"ppo\.target_kl"):
        TrainingConfig.from_dict(merge_config(TINY, {"ppo": {"target_kl": float("nan")}}))


def test_checkpoint_overwrite_and_resume_rounds(tmp_path: Path, tiny: Path, ckpt: Path, capsys) -> None:
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


def test_sigterm_stops_ppo_after_round_with_checkpoint_and_telemetry(tmp_path: Path, tiny: Path, capsys,
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


def test_sigint_stops_heuristic_after_the_epoch(tmp_path: Path, tiny: Path, capsys, monkeypatch) -> None:
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


def test_jsonl_is_flushed_every_epoch(tmp_path: Path) -> None:
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


def test_stale_temp_files_are_removed_on_the_next_save(tmp_path: Path) -> None:
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
def test_running_norm_ignores_non_finite_and_huge_rows() -> None:
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


def _nan_host(env: MorphogeneticEnv, env_index: int, at_epoch: int):
    def fault(step: int, snap: dict) -> None:
        if step == at_epoch:
            for t in env.kasmina.state["host"].values(True, True):
                t[env_index].fill_(float("nan"))
    return fault


def test_governor_rolls_back_a_nan_env_and_leaves_the_others_identical() -> None:
    cfg = TrainingConfig.from_dict(merge_config(TINY, {"episode": {"envs": 3, "length": 4}}))

    def run(fault: bool):
        env = MorphogeneticEnv(cfg)
        hub = NissaHub(synchronous=True)
        events: list = []
        hub.emit = events.append  # type: ignore[method-assign]
        runner = EpisodeRunner(env, make_policy("heuristic", env, cfg), hub=hub,
                               on_epoch=_nan_host(env, 1, 1) if fault else None)
        return runner.run(1), events

    clean, _ = run(False)
    faulty, events = run(True)
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
    assert "train_loss nan" in anomalies[0].message


def test_governor_keeps_ppo_alive_with_a_diverging_env() -> None:
    from esper.simic.ppo import PPOTrainer

    cfg = TrainingConfig.from_dict(merge_config(TINY, {"episode": {"envs": 3, "length": 3}}))
    trainer = PPOTrainer(cfg)
    trainer.base_env.pipeline.callbacks.append(_nan_host(trainer.base_env, 2, 1))
    stats = trainer.train_round()  # before: "probability tensor contains either inf, nan"
    assert all(torch.isfinite(p).all() for p in trainer.params)
    norm = trainer.base_env.features.norm
    assert torch.isfinite(norm.mean).all() and torch.isfinite(norm.var).all()
    assert np.isfinite(stats.mean_return)
    assert trainer.base_env.pipeline.governor.rollbacks.tolist() == [0, 0, 1]


def test_policy_divergence_is_judged_and_stops_train(tmp_path: Path, tiny: Path, capsys, monkeypatch) -> None:
    ok = SimpleNamespace(entropy={"op": 0.9}, explained_variance=0.1)
    assert policy_divergence(ok, [torch.ones(3)]) is None
    assert "entropy" in policy_divergence(SimpleNamespace(entropy={"op": 0.0}, explained_variance=0.1), [])
    assert "explained variance" in policy_divergence(
        SimpleNamespace(entropy={"op": 0.9}, explained_variance=-1011.0), [])
    assert "non-finite" in policy_divergence(ok, [torch.tensor([float("nan")])])
    monkeypatch.setattr(train, "policy_divergence", lambda stats, params: "op entropy collapsed to 0")
    save = tmp_path / "ppo.pt"
    rc = train.main(["--config", str(tiny), "--preset", "default", "--rounds", "1", "--save", str(save),
                     "--backends", "jsonl", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: the policy diverged: op entropy collapsed to 0 (ppo round 1)")
    assert not save.exists()
