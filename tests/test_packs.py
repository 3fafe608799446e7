"""Episode packs (write/read/schema), esper.generate, offline BC/IQL and PPO's --init."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from tiny_config import TINY

import esper
from esper import generate, train
from esper.leyline import SCHEMA_VERSION, ObservationSchema
from esper.simic.checkpoint import load_checkpoint, load_policy
from esper.simic.config import TrainingConfig
from esper.simic.env import MorphogeneticEnv
from esper.simic.errors import PackError, PackSchemaError
from esper.simic.offline import OfflineConfig, OfflineTrainer
from esper.simic.packs import read_pack, write_pack
from esper.simic.ppo import PPOTrainer
from esper.tamiyo.lstm_policy import HEAD_KEYS

# Long enough that the tiny heuristic germinates, advances and germinates again (21 of 48 steps
# are not WAIT), small enough to generate in a few seconds.
TINY6 = copy.deepcopy(TINY) | {"episode": {"length": 6, "envs": 4}}


def _config_file(tmp: Path, data: dict, name: str) -> Path:
    path = tmp / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def heuristic_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m esper.generate`` end to end: 2 episodes x 4 envs of the heuristic."""
    tmp = tmp_path_factory.mktemp("heuristic")
    cfg = _config_file(tmp, TINY6, "tiny6.json")
    out = tmp / "pack"
    rc = generate.main(["--policies", "heuristic", "--episodes", "2", "--config", str(cfg), "--backends", "jsonl",
                        "--run-dir", str(tmp / "run"), "--out", str(out)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def mixed_pack(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A rule policy and a sampled learned policy (an untrained PPO checkpoint) in one pack."""
    tmp = tmp_path_factory.mktemp("mixed")
    cfg_file = _config_file(tmp, TINY, "tiny.json")
    ckpt = PPOTrainer(TrainingConfig.from_dict(TINY)).save(tmp / "ppo0.pt")
    out = tmp / "pack"
    rc = generate.main(["--policies", f"static,ppo_sample={ckpt}", "--config", str(cfg_file), "--backends", "jsonl",
                        "--run-dir", str(tmp / "run"), "--out", str(out)])
    assert rc == 0
    return out, cfg_file


# ----------------------------------------------------------------------------- packs
def _schema_meta() -> dict:
    schema = ObservationSchema(history_length=2, blueprints=("norm", "conv_small"))
    return {"schema": {**schema.to_dict(), "size": schema.size}, "command": "test"}


def test_pack_round_trip(tmp_path: Path) -> None:
    e, t, f = 3, 4, 7
    data = TensorDict(
        {
            "observation": torch.randn(e, t, f),
            "op": torch.randint(0, 5, (e, t)),
            "op_mask": torch.rand(e, t, 5) > 0.5,
            "op_log_prob": torch.randn(e, t),
            ("next", "reward"): torch.randn(e, t, 1),
            ("next", "done"): torch.zeros(e, t, 1, dtype=torch.bool),
            ("next", "reward_components", "rent"): torch.randn(e, t),
        },
        batch_size=[e, t],
    )
    norm = {"mean": torch.randn(f), "var": torch.rand(f), "count": torch.tensor(12.0)}
    out = write_pack(tmp_path / "p", data, _schema_meta(), norm)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # the temp dir was renamed away
    back, meta = read_pack(out)
    assert back.batch_size == (e, t)
    assert (back.clone() == data).all()
    for k, v in norm.items():
        assert torch.equal(meta["obs_norm_state"][k], v)
    assert meta["format_version"] == 1 and meta["schema"]["version"] == SCHEMA_VERSION
    assert meta["keys"]["next.reward_components.rent"] == {"dtype": "float32", "shape": [e, t]}
    assert not list((out / "data").rglob("*.pkl")) and not list((out / "data").rglob("*.pt"))
    with pytest.raises(PackError, match="not empty"):  # never written over
        write_pack(out, data, _schema_meta(), norm)
    # The pack's id is its content: the same data gives the same id, a changed byte is refused.
    again = write_pack(tmp_path / "q", data, _schema_meta(), norm)
    assert meta["pack_id"].startswith("sha256:") and read_pack(again)[1]["pack_id"] == meta["pack_id"]
    victim = next(f for f in sorted((out / "data").rglob("*")) if f.is_file() and f.stat().st_size > 0)
    raw = bytearray(victim.read_bytes())
    raw[0] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(PackError, match="does not match its pack_id"):
        read_pack(out)


def test_generated_pack_is_self_describing(heuristic_pack: Path) -> None:
    data, meta = read_pack(heuristic_pack)
    e, t = data.batch_size
    assert (e, t) == (8, 6)
    for key in ("observation", "observation_final", "observation_raw", "op_mask", "slot_mask", "blueprint_mask",
                "tempo_mask", *HEAD_KEYS, "reason", *(f"{h}_log_prob" for h in HEAD_KEYS), "is_init",
                "policy_id", ("next", "reward"), ("next", "done"), ("next", "terminated"), ("next", "truncated"),
                ("next", "reward_components", "total")):
        assert key in data.keys(include_nested=True), key
    assert meta["schema"]["size"] == data["observation"].shape[-1] and meta["schema"]["names"]
    assert meta["telemetry_profile"] == "minimal" and "rent" in meta["reward"]
    assert meta["config"]["episode"]["length"] == 6 and meta["command"].startswith("python -m esper.generate")
    assert set(meta["obs_norm_state"]) == {"mean", "var", "count"} and float(meta["obs_norm_state"]["count"]) > 0
    assert meta["policies"] == ["heuristic"] and len(meta["episodes"]) == e
    first = meta["episodes"][0]
    assert first["summary"]["trajectory"] and first["summary"]["outcome"] and len(first["decisions"]) == t
    for k in ("policy", "episode_id", "test_acc", "final_val_acc", "fossilized", "reward_components"):
        assert k in first, k
    assert (data["reason"] >= 0).all() and (data["op_log_prob"] == 0).all()  # rule policy: no log-probs
    assert data["next", "done"][:, -1].all() and not data["next", "done"][:, :-1].any()
    # The rewards recorded per step add up to each episode's summary total.
    totals = torch.tensor([ep["total_reward"] for ep in meta["episodes"]])
    torch.testing.assert_close(data["next", "reward"].sum((1, 2)).double(), totals.double(), rtol=1e-4, atol=1e-4)


def test_learned_policy_log_probs_recorded(mixed_pack: tuple[Path, Path]) -> None:
    data, meta = read_pack(mixed_pack[0])
    assert meta["policies"][0] == "static" and meta["policies"][1].startswith("ppo_sample=")
    static, learned = data["policy_id"][:, 0] == 0, data["policy_id"][:, 0] == 1
    assert static.sum() == 2 and learned.sum() == 2
    assert (data["op_log_prob"][static] == 0).all()
    assert (data["op_log_prob"][learned] < 0).all()  # sampled from a fresh actor: log-probs below 0
    assert (data["reason"][learned] == -1).all()


def test_schema_mismatch_is_refused_naming_fields(heuristic_pack: Path, tmp_path: Path) -> None:
    copy_dir = tmp_path / "copy"
    shutil.copytree(heuristic_pack, copy_dir)
    meta = json.loads((copy_dir / "meta.json").read_text())
    meta["schema"]["names"] = [n for n in meta["schema"]["names"] if n != "val_acc"]
    meta["schema"]["size"] -= 1
    (copy_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(PackSchemaError, match=r"size: pack \d+ != code \d+.*names: missing \['val_acc'\]"):
        read_pack(copy_dir)
    meta["schema"]["version"] = SCHEMA_VERSION + 1
    (copy_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version: pack"):
        read_pack(copy_dir)
    # Against a run's own schema (another blueprint set): the fields that differ are named.
    other = ObservationSchema(history_length=4, blueprints=("norm", "attention"))
    with pytest.raises(PackSchemaError, match=r"blueprints: pack \['noop', 'norm', .*'lora'\] != code \['norm', 'attention'\]"):
        read_pack(heuristic_pack, schema=other)


def test_generate_refuses_bad_inputs_before_work(heuristic_pack: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["--policies", "heuristic,nope", "--out", str(tmp_path / "a")], "unknown policy 'nope' (--policies)"),
        (["--out", str(heuristic_pack)], "is not empty (--out)"),
        (["--out", str(tmp_path / "a"), "--policies", "ppo_sample=" + str(tmp_path / "none.pt")],
         "unusable checkpoint"),
    ]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases.append((["--out", str(blocker / "pack")], "(--out)"))
    for argv, message in cases:
        assert generate.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "; " in err, err
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- offline
def test_offline_cli_refuses_bad_inputs_before_training(heuristic_pack: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """--offline-epochs 0 fell back to 100 passes, -1 trained none; a --save directory was a
    traceback after training; an existing --save file was replaced silently; flags offline
    training never reads (--device cuda, --backends, --envs without --config) were ignored."""
    existing = tmp_path / "kept.pt"
    existing.write_bytes(b"not a checkpoint, not overwritten")
    folder = tmp_path / "folder"
    folder.mkdir()
    base = ["--policy", "bc", "--data", str(heuristic_pack)]
    cases = [
        (["--offline-epochs", "0", "--save", str(tmp_path / "a.pt")], "--offline-epochs", "a positive number"),
        (["--offline-epochs", "-1", "--save", str(tmp_path / "a.pt")], "--offline-epochs", "a positive number"),
        (["--offline-epochs", "1", "--save", str(folder)], "--save", "is a directory"),
        (["--offline-epochs", "1", "--save", str(existing)], "--save", "or --force to overwrite"),
        (["--save", str(tmp_path / "a.pt"), "--device", "cuda"], "--device", "has no effect with --policy bc"),
        (["--save", str(tmp_path / "a.pt"), "--backends", "bogus"], "--backends", "has no effect"),
        (["--save", str(tmp_path / "a.pt"), "--envs", "3"], "--envs", "unless --config or --preset"),
    ]
    for argv, where, words in cases:
        assert train.main([*base, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and f"({where}); " in err and words in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "--resume" not in err, err
        assert "epoch " not in capsys.readouterr().out
    assert existing.read_bytes() == b"not a checkpoint, not overwritten"
    assert not (tmp_path / "a.pt").exists() and not any(folder.iterdir())
    assert train.main([*base, "--offline-epochs", "1", "--save", str(existing), "--force"]) == 0
    assert load_checkpoint(existing)["offline"]["method"] == "bc"


def _small_nets(meta: dict) -> TrainingConfig:
    return TrainingConfig.from_dict(meta["config"]).updated(ppo={"hidden_size": 32, "lstm_hidden_size": 32})


def test_bc_clones_the_heuristic(heuristic_pack: Path) -> None:
    data, meta = read_pack(heuristic_pack)
    trainer = OfflineTrainer(heuristic_pack, OfflineConfig(method="bc", holdout=0.0, lr=3e-3),
                             cfg=_small_nets(meta), data=(data, meta))
    before = trainer.agreement(held_out=False)
    history = trainer.train(300)  # one minibatch of all 8 episodes per epoch: 300 steps
    after = trainer.agreement(held_out=False)
    assert history[-1].actor < 0.2 * history[0].actor
    assert history[-1].critic < history[0].critic
    assert after["nonwait_steps"] >= 15  # the pack holds real decisions, not only WAITs
    assert after["action"] >= 0.9 and after["action_nonwait"] >= 0.8, (before, after)
    assert after["action_nonwait"] > before["action_nonwait"] + 0.5


def test_iql_loss_is_finite_with_gradients_on_all_heads(heuristic_pack: Path) -> None:
    data, meta = read_pack(heuristic_pack)
    trainer = OfflineTrainer(heuristic_pack, OfflineConfig(method="iql", holdout=0.25), cfg=_small_nets(meta),
                             data=(data, meta))
    assert trainer.iql is not None
    losses = trainer.iql(trainer.train_data.clone(False))
    for k in ("loss_actor", "loss_qvalue", "loss_value"):
        assert torch.isfinite(losses[k]), k
    assert losses["loss_qvalue"] > 0 and losses["loss_value"] > 0  # squared and expectile errors
    (losses["loss_actor"] + losses["loss_qvalue"] + losses["loss_value"]).backward()
    heads = dict(trainer.modules.named_parameters())
    for h in HEAD_KEYS:
        (name,) = [n for n in heads if n.endswith(f".{h}.weight")]
        grad = heads[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, h
    for p in trainer.qv_params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    stats = trainer.train(3)
    assert [s.epoch for s in stats] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([s.loss, s.q, s.v])).all() for s in stats)
    agree = trainer.agreement()
    assert 0.0 <= agree["action"] <= 1.0 and agree["steps"] == 2 * 6


def test_offline_cli_then_evaluate_and_ppo_init(heuristic_pack: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "bc.pt"
    rc = train.main(["--policy", "bc", "--data", str(heuristic_pack), "--offline-epochs", "3", "--save", str(ckpt)])
    out = capsys.readouterr().out
    assert rc == 0 and "epoch    3  loss" in out and "action agreement with the pack on held-out" in out
    saved = load_checkpoint(ckpt)
    assert saved["round"] == 0 and saved["offline"]["method"] == "bc"
    _, meta = read_pack(heuristic_pack)
    assert torch.equal(saved["obs_norm"]["mean"], meta["obs_norm_state"]["mean"])

    cfg = TrainingConfig.from_dict(TINY6)
    # The evaluation path loads it like a PPO checkpoint, with the pack's normalizer.
    env = MorphogeneticEnv(cfg)
    load_policy(ckpt, env, deterministic=True)
    assert torch.equal(env.features.norm.mean, saved["obs_norm"]["mean"])

    # PPO starts from it: the actor/critic and obs_norm are the checkpoint's before any update.
    trainer = PPOTrainer(cfg)
    trainer.init(ckpt)
    assert trainer.round == 0 and trainer.history == []
    state = trainer.modules.state_dict()
    for k, v in saved["modules"].items():
        assert torch.equal(state[k], v), k
    assert torch.equal(trainer.base_env.features.norm.mean, saved["obs_norm"]["mean"])
    assert not trainer.optimizer.state  # a fresh optimizer

    cfg_file = _config_file(tmp_path, TINY6 | {"episode": {"length": 3, "envs": 2}}, "tiny3.json")
    rc = train.main(["--init", str(ckpt), "--config", str(cfg_file), "--preset", "default", "--rounds", "1",
                     "--backends", "jsonl", "--run-dir", str(tmp_path / "run"), "--save", str(tmp_path / "ppo.pt")])
    assert rc == 0 and f"initialized from {ckpt}" in capsys.readouterr().out.replace("\n", "")
    assert train.main(["--init", str(tmp_path / "missing.pt")]) == 2
    assert "(--init)" in capsys.readouterr().err
    assert train.main(["--policy", "iql", "--data", str(tmp_path / "nope")]) == 2
    assert "(--data)" in capsys.readouterr().err


def test_bare_ppo_spec_is_the_shipped_controller(heuristic_pack: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``ppo`` with no path loads the packaged checkpoint; without one it is refused clearly."""
    import esper.simic.checkpoint as checkpoint_mod
    from esper.simic.errors import UsageError
    from esper.simic.preflight import parse_policies
    from esper.tamiyo.policies import make_policy

    ckpt = tmp_path / "bc.pt"
    assert train.main(["--policy", "bc", "--data", str(heuristic_pack), "--offline-epochs", "1",
                       "--save", str(ckpt)]) == 0
    cfg = TrainingConfig.from_dict(TINY6)
    monkeypatch.setattr(checkpoint_mod, "shipped_controller", lambda: ckpt)
    assert parse_policies("static,ppo") == [("static", None), ("ppo", None)]
    policy = make_policy("ppo", MorphogeneticEnv(cfg), cfg)
    saved = load_checkpoint(ckpt)["modules"]
    assert all(torch.equal(policy.modules.state_dict()[k], v) for k, v in saved.items())
    monkeypatch.setattr(checkpoint_mod, "shipped_controller", lambda: None)
    with pytest.raises(UsageError, match="ships none"):
        parse_policies("ppo")
    with pytest.raises(ValueError, match="ships none"):
        make_policy("ppo", MorphogeneticEnv(cfg), cfg)


def test_ppo_checkpoint_records_its_provenance(heuristic_pack: Path, tmp_path: Path) -> None:
    """A PPO checkpoint names the command, code version and the pack its init came from."""
    ckpt = tmp_path / "bc.pt"
    assert train.main(["--policy", "bc", "--data", str(heuristic_pack), "--offline-epochs", "1",
                       "--save", str(ckpt)]) == 0
    trainer = PPOTrainer(TrainingConfig.from_dict(TINY6))
    trainer.init(ckpt)
    prov = trainer.state()["provenance"]
    assert prov["init_from"] == str(ckpt) and prov["command"].startswith("python -m")
    assert prov["code"]["package"] == esper.__version__
    offline = next(x for x in prov["lineage"] if "method" in x)
    assert offline["method"] == "bc" and offline["pack"] == str(heuristic_pack)
    assert offline["pack_id"] == read_pack(heuristic_pack)[1]["pack_id"]


def test_evaluate_runs_a_controller_on_the_setting_it_was_trained_on(
        heuristic_pack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --preset/--config, a listed checkpoint brings its training setting (task, hosts,
    episode length); seeds come from the flags, and its own task seed is flagged as not held out."""
    from esper import evaluate

    ckpt = tmp_path / "bc.pt"
    assert train.main(["--policy", "bc", "--data", str(heuristic_pack), "--offline-epochs", "1",
                       "--save", str(ckpt)]) == 0
    capsys.readouterr()
    out = tmp_path / "eval.json"
    rc = evaluate.main(["--policies", f"static,ppo={ckpt}", "--envs", "2", "--task-seed", "3",
                        "--backends", "none", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "was trained on (its checkpoint's config)" in printed
    assert "for a held-out score" not in printed
    data = json.loads(out.read_text())
    trained = load_checkpoint(ckpt)["config"]
    assert data["config"]["task"]["train_size"] == trained["task"]["train_size"] == TINY6["task"]["train_size"]
    assert data["config"]["episode"]["length"] == TINY6["episode"]["length"]
    assert data["task_seed"] == 3 and data["config"]["episode"]["envs"] == 2
    rc = evaluate.main(["--policies", f"ppo={ckpt}", "--envs", "2", "--backends", "none"])
    assert rc == 0 and "pass --task-seed N for a held-out score" in capsys.readouterr().out


def test_shipped_controller_is_package_data_for_the_ppo_preset() -> None:
    """The controller in the package was trained on a mix of image and sequence settings (no
    real data: it is scored there), records how it was made, is small, and loads into any
    setting: the `ppo` preset's hosts and the language-model ones."""
    from esper.simic.checkpoint import shipped_controller

    path = shipped_controller()
    assert path is not None and path.stat().st_size < 2_000_000
    ckpt = load_checkpoint(path)
    tasks = [(c["task"]["name"], c["kasmina"]["host"]) for c in ckpt["mix"]]
    assert {"synthetic", "grammar"} <= {t for t, _ in tasks} and len({h for _, h in tasks}) >= 2
    assert not {"images", "text", "cifar10"} & {t for t, _ in tasks}
    assert ckpt["provenance"]["lineage"][0]["method"] == "bc"
    for cfg in (TrainingConfig.preset("ppo").updated(episode={"envs": 2}),
                TrainingConfig.preset("lm").updated(episode={"envs": 2}, task={"train_size": 64})):
        policy = load_policy(path, MorphogeneticEnv(cfg), deterministic=True)
        assert all(torch.equal(policy.modules.state_dict()[k], v) for k, v in ckpt["modules"].items())
