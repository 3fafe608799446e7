"""LSTM-PPO: runs, resumes, sees whole sequences, respects masks and head relevance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torchrl.modules import set_recurrent_mode
from torchrl.modules.value_norm import RunningValueNorm

from esper.kasmina.blueprints import blueprint_catalogue
from esper.leyline import NUM_OPS, Op
from esper.simic.checkpoint import load_checkpoint
from esper.simic.config import TrainingConfig
from esper.simic.env import MorphogeneticEnv
from esper.simic.errors import CheckpointError
from esper.simic.ppo import PPOTrainer
from esper.simic.ppo_round import collect
from esper.simic.runner import EpisodeRunner
from esper.tamiyo.lstm_policy import (
    ACTOR_STATE,
    HEAD_KEYS,
    FactoredActionDistribution,
    PolicyShape,
    TamiyoModules,
)
from esper.tamiyo.policies import make_policy


def tiny_config(**over: dict) -> TrainingConfig:
    base = TrainingConfig().updated(
        task={"train_size": 64, "val_size": 32, "image_size": 8},
        kasmina={"batch_size": 32, "val_batch_size": 32, "blueprints": ["norm", "conv_small"]},
        episode={"envs": 4, "length": 5},
        heuristic={"warmup_epochs": 1},
        fixed={"epochs": [1]},
        ppo={"minibatch_envs": 2, "epochs": 2, "hidden_size": 16, "lstm_hidden_size": 16},
    )
    return base.updated(**over) if over else base


@pytest.fixture(scope="module")
def trained() -> tuple[PPOTrainer, TensorDict]:
    trainer = PPOTrainer(tiny_config())
    trainer.train_round()
    batch = collect(trainer)
    return trainer, batch


def test_short_eager_run(trained: tuple[PPOTrainer, TensorDict]) -> None:
    trainer, _ = trained
    stats = trainer.history[-1]
    assert trainer.round == 1 and stats["round"] == 1 and stats["rolled_back"] is None
    assert 1 <= stats["passes"] <= trainer.cfg.ppo.epochs
    assert 0.0 <= stats["clip_fraction"] <= 1.0 and abs(stats["kl"]) < 0.5  # small steps from the start
    assert -10.0 < stats["explained_variance"] <= 1.0 and stats["value_loss"] >= 0.0
    assert stats["env_epochs_per_s"] > 0 and stats["collect_s"] > 0 and stats["update_s"] > 0
    assert stats["lr"] == trainer.cfg.ppo.lr and stats["entropy_scale"] == 1.0  # round 1: the schedule's start
    assert -10.0 < stats["mean_return"] < 10.0 and 0.0 <= stats["test_acc"] <= 100.0
    assert set(stats["entropy"]) == set(HEAD_KEYS) and all(v >= 0.0 for v in stats["entropy"].values())
    assert abs(sum(stats["op_freq"]) - 1.0) < 1e-5


@pytest.mark.slow  # minutes from a cold inductor cache; CI runs it in its slow stage
@pytest.mark.compile
def test_short_compiled_run() -> None:
    trainer = PPOTrainer(tiny_config(compile=True, episode={"envs": 2, "length": 3},
                                     ppo={"minibatch_envs": 2, "epochs": 1}))
    stats = trainer.train_round()
    assert trainer.round == 1 and stats.rolled_back is None and 1 <= stats.passes <= 1
    assert 0.0 <= stats.clip_fraction <= 1.0 and 0.0 <= stats.test_acc <= 100.0
    assert abs(sum(stats.op_freq) - 1.0) < 1e-5


def test_hidden_state_is_carried(trained: tuple[PPOTrainer, TensorDict]) -> None:
    _, batch = trained
    h_out, h_in = batch.get(("next", "rs_h")), batch.get("rs_h")
    assert h_out.abs().sum() > 0, "the LSTM state is never written: is the primer missing?"
    torch.testing.assert_close(h_in[:, 1:], h_out[:, :-1])  # carried step to step
    assert (h_in[:, 0] == 0).all() and batch.get("is_init")[:, 0].all()


def test_recurrent_mode_matches_step_mode(trained: tuple[PPOTrainer, TensorDict]) -> None:
    trainer, batch = trained
    with torch.no_grad(), set_recurrent_mode(True):
        dist = trainer.modules.actor.get_dist(batch.clone())
        lp = dist.log_prob(batch.select(*HEAD_KEYS))
    for h in HEAD_KEYS:
        torch.testing.assert_close(lp[f"{h}_log_prob"], batch.get(f"{h}_log_prob"), atol=1e-5, rtol=1e-5)


def test_collected_actions_are_legal(trained: tuple[PPOTrainer, TensorDict]) -> None:
    _, batch = trained
    assert batch.get(("next", "signals", "action_accepted")).all()
    op, slot = batch.get("op"), batch.get("slot")
    assert batch.get("op_mask").gather(-1, op.unsqueeze(-1)).all()
    rows = batch.get("slot_mask").gather(-2, op[..., None, None].expand(*op.shape, 1, batch.get("slot_mask").shape[-1]))
    assert rows.squeeze(-2).gather(-1, slot.unsqueeze(-1)).all()


def _params(n: int, op_mask: torch.Tensor, slot_mask: torch.Tensor, n_bp: int = 4) -> TensorDict:
    g = torch.Generator().manual_seed(0)
    return TensorDict(
        {
            "op": {"logits": torch.randn(n, NUM_OPS, generator=g), "mask": op_mask},
            "slot": {"logits": torch.randn(n, NUM_OPS, 3, generator=g), "mask": slot_mask},
            "blueprint": {"logits": torch.randn(n, n_bp, generator=g), "mask": torch.ones(n, n_bp, dtype=torch.bool)},
            "tempo": {"logits": torch.randn(n, 3, generator=g), "mask": torch.ones(n, 3, dtype=torch.bool)},
        },
        batch_size=[n],
    )


def test_sampled_actions_respect_op_dependent_slot_mask() -> None:
    n = 4000
    g = torch.Generator().manual_seed(1)
    slot_mask = torch.rand(n, NUM_OPS, 3, generator=g) > 0.5
    op_mask = slot_mask.any(-1)
    op_mask[:, Op.WAIT] = True
    slot_mask[:, Op.WAIT] = True
    dist = FactoredActionDistribution(_params(n, op_mask, slot_mask))
    s = dist.sample()
    assert op_mask.gather(1, s["op"][:, None]).all()
    legal = slot_mask[torch.arange(n), s["op"], s["slot"]]
    assert legal.all()
    lp = dist.log_prob(s)["slot_log_prob"]
    assert torch.isfinite(lp).all() and (lp <= 0).all()


def test_irrelevant_heads_do_not_count() -> None:
    n = 8
    ones = torch.ones(n, NUM_OPS, 3, dtype=torch.bool)
    only_wait = torch.zeros(n, NUM_OPS, dtype=torch.bool)
    only_wait[:, Op.WAIT] = True
    dist = FactoredActionDistribution(_params(n, only_wait, ones))
    sample = dist.sample()
    assert (sample["op"] == Op.WAIT).all()
    lp = dist.log_prob(sample)
    for h in ("slot", "blueprint", "tempo"):
        assert (lp[f"{h}_log_prob"] == 0).all(), h
    ent = dist.entropy()
    for h in ("slot", "blueprint", "tempo"):
        assert (ent[f"{h}_entropy"] == 0).all(), h
    # ADVANCE uses op and slot only: the blueprint/tempo picks never change its log-prob.
    all_ops = torch.ones(n, NUM_OPS, dtype=torch.bool)
    dist = FactoredActionDistribution(_params(n, all_ops, ones))
    act = TensorDict({"op": torch.full((n,), int(Op.ADVANCE)), "slot": torch.zeros(n, dtype=torch.long),
                      "blueprint": torch.zeros(n, dtype=torch.long), "tempo": torch.zeros(n, dtype=torch.long)}, [n])
    other = act.clone()
    other["blueprint"] = torch.full((n,), 3)
    other["tempo"] = torch.full((n,), 2)
    a, b = dist.log_prob(act), dist.log_prob(other)
    for h in HEAD_KEYS:
        torch.testing.assert_close(a[f"{h}_log_prob"], b[f"{h}_log_prob"])
    assert (a["slot_log_prob"] < 0).all() and (a["blueprint_log_prob"] == 0).all()


def test_resume_continues_round_and_state(tmp_path: Path) -> None:
    cfg = tiny_config()
    a = PPOTrainer(cfg)
    a.train_round()
    path = a.save(tmp_path / "ckpt.pt")
    saved_rng = torch.get_rng_state()
    b = PPOTrainer(cfg)
    b.resume(path)
    assert torch.equal(torch.get_rng_state(), saved_rng)
    assert b.round == 1 and len(b.history) == 1
    for (k, va), vb in zip(a.modules.state_dict().items(), b.modules.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)
    rng = torch.get_rng_state()  # both trainers sample from the global torch RNG
    a.train_round()
    torch.set_rng_state(rng)
    b.train_round()
    assert a.round == b.round == 2
    for (k, va), vb in zip(a.modules.state_dict().items(), b.modules.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)
    assert a.history[-1]["mean_return"] == pytest.approx(b.history[-1]["mean_return"], abs=1e-6)


def test_corrupt_and_mismatched_checkpoints(tmp_path: Path, trained: tuple[PPOTrainer, TensorDict]) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad\.pt"):
        load_checkpoint(bad)
    trainer, _ = trained
    good = trainer.save(tmp_path / "good.pt")
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"trunc\.pt"):
        load_checkpoint(truncated)
    other = PPOTrainer(tiny_config(ppo={"hidden_size": 8, "lstm_hidden_size": 16, "minibatch_envs": 2}))
    with pytest.raises(CheckpointError, match=r"good\.pt.*hidden_size"):
        other.resume(good)


def test_trained_policy_runs_in_evaluate_registry(tmp_path: Path, trained: tuple[PPOTrainer, TensorDict]) -> None:
    trainer, _ = trained
    path = trainer.save(tmp_path / "p.pt")
    cfg = tiny_config()
    env = MorphogeneticEnv(cfg)
    for spec in (f"ppo={path}", f"ppo_sample={path}"):
        summaries = EpisodeRunner(env, make_policy(spec, env, cfg)).run(1)
        assert len(summaries) == env.n
    # The layout does not depend on the blueprint set: the same checkpoint runs where the run
    # offers other blueprints, in another order, and its blueprint head follows them by name.
    other_cfg = tiny_config(kasmina={"blueprints": ["conv_light", "norm", "depthwise"]})
    other = MorphogeneticEnv(other_cfg)
    policy = make_policy(f"ppo={path}", other, other_cfg)
    cat = blueprint_catalogue()
    assert policy.modules.heads.bp_index.tolist() == [cat.index(b) for b in ("conv_light", "norm", "depthwise")]
    summaries = EpisodeRunner(other, policy).run(1)
    assert len(summaries) == other.n
    # ...and on a language-model host (transformer, LM blueprints, 256-byte vocabulary).
    lm_cfg = TrainingConfig().updated(
        task={"name": "grammar", "train_size": 64, "val_size": 32, "test_size": 32, "seq_len": 8},
        kasmina={"host": "lm_small", "batch_size": 32, "val_batch_size": 32, "blueprints": ["mlp", "block"],
                 "optimizer": "adamw", "host_lr": 0.003},
        episode={"envs": 4, "length": 3})
    lm = MorphogeneticEnv(lm_cfg)
    assert lm.schema.size == env.schema.size
    assert len(EpisodeRunner(lm, make_policy(f"ppo={path}", lm, lm_cfg)).run(1)) == lm.n


def test_modules_shapes() -> None:
    m = TamiyoModules(PolicyShape(10, 3, 2, 3, 8, 8), RunningValueNorm(shape=1))
    primer = m.primer()
    assert set(primer.primers.keys(True, True)) == set(ACTOR_STATE)  # the actor's (h, c); the critic recomputes
    assert all(spec.shape[-1] == 8 for spec in primer.primers.values(True, True))
    assert {k for k in m.actor.dist_sample_keys} == set(HEAD_KEYS)


def test_train_cli_trains_saves_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from esper import train

    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(tiny_config(episode={"envs": 2, "length": 3}).model_dump_json())
    ckpt = tmp_path / "run" / "ppo.pt"
    assert train.main(["--config", str(cfg_path), "--rounds", "1", "--save", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "round   1" in out and "EV" in out and "wait=" in out and "env-epochs/s" in out
    assert load_checkpoint(ckpt)["round"] == 1
    args = ["--config", str(cfg_path), "--rounds", "2", "--save", str(ckpt), "--resume", str(ckpt)]
    assert train.main(args) == 0
    assert "resumed" in capsys.readouterr().out and load_checkpoint(ckpt)["round"] == 2


def test_round_reports_to_nissa_with_health_checks() -> None:
    """Each round emits a PPO_UPDATE event with the anomaly inputs, and the detectors run."""
    from esper.leyline import EventKind
    from esper.nissa import NissaHub

    class Collect:
        def __init__(self) -> None:
            self.events: list = []

        def emit(self, event: object) -> None:
            self.events.append(event)

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    sink = Collect()
    with NissaHub([sink], synchronous=True) as hub:
        trainer = PPOTrainer(tiny_config(), hub=hub)
        trainer.monitor.value_collapse.patience = 1  # EV of a fresh critic is ~0: must flag
        trainer.monitor.value_collapse.threshold = 2.0
        trainer.train_round()
    updates = [e for e in sink.events if e.kind is EventKind.PPO_UPDATE]
    assert len(updates) == 1
    payload = updates[0].payload
    for key in ("ratio_max", "ratio_min", "lstm_h_norm", "lstm_c_norm", "grad_norm", "explained_variance"):
        assert key in payload and payload[key] == payload[key], key  # present and not NaN
    assert 0 < payload["ratio_min"] <= payload["ratio_max"] < 100
    assert payload["lstm_h_norm"] > 0, "recurrent state must be carried (primer present)"
    anomalies = [e for e in sink.events if e.kind is EventKind.ANOMALY]
    assert any(e.detector == "value_collapse" for e in anomalies)
    assert trainer.history[-1]["anomalies"]
