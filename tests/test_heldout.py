"""Learning you can see (issue 29): the held-out check of every PPO round, the verdict, and
where a fresh run starts (the shipped controller, or --from-scratch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_config import TINY

from esper import evaluate, train
from esper.simic.checkpoint import load_checkpoint, shipped_controller
from esper.simic.config import TrainingConfig
from esper.simic.heldout import HELDOUT_SEED_OFFSET, HeldOutCheck, HeldOutScore
from esper.simic.ppo import PPOTrainer
from esper.simic.start import shipped_start


def _tiny(tmp_path: Path, **episode: int) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({**TINY, "episode": {**TINY["episode"], **episode}}))
    return path


def _cfg(**episode: int) -> TrainingConfig:
    return TrainingConfig.from_dict({**TINY, "episode": {**TINY["episode"], **episode}})


def _score(diff: list[float], controller: list[float] | None = None, round_: int = 1) -> HeldOutScore:
    d = np.asarray(diff)
    acc = np.asarray(controller if controller is not None else [50.0 + x for x in diff])
    return HeldOutScore(round=round_, hosts=len(d), controller=float(acc.mean()), controller_std=float(acc.std()),
                        heuristic=50.0, heuristic_std=0.0, diff=float(d.mean()),
                        diff_sem=float(d.std(ddof=1) / np.sqrt(len(d))), per_host=list(acc))


def test_verdict_needs_two_standard_errors() -> None:
    assert _score([1.0, 1.2, 0.8, 1.1]).verdict() == "beat"
    assert _score([-1.0, -1.2, -0.8, -1.1]).verdict() == "fell behind"
    assert _score([1.0, -1.0, 0.5, -0.4]).verdict() == "was level with"


def test_heuristic_half_matches_esper_evaluate_on_the_same_hosts(tmp_path: Path, capsys) -> None:
    """The check's heuristic scores are `esper.evaluate`'s, host for host, at the held-out host
    seed: the check plays real, reproducible hosts that PPO's training episodes never use."""
    cfg = _cfg(envs=3)
    trainer = PPOTrainer(cfg)
    check = HeldOutCheck(cfg, 3, trainer.base_env.kasmina.task)
    first = check.heuristic()
    assert check.heuristic() is first  # played once
    out = tmp_path / "h.json"
    assert evaluate.main(["--config", str(_tiny(tmp_path, envs=3)), "--preset", "default", "--policies", "heuristic",
                          "--seed", str(cfg.episode.seed + HELDOUT_SEED_OFFSET), "--backends", "none",
                          "--json", str(out)]) == 0
    per_env = json.loads(out.read_text())["results"]["heuristic"]["per_env"]
    expected = [acc for _, acc in sorted(zip(per_env["env"], per_env["test_acc"], strict=True))]
    np.testing.assert_allclose(first, expected, rtol=0, atol=1e-9)


def test_controller_half_leaves_the_trainer_untouched_and_is_greedy() -> None:
    """Scoring copies the networks and freezes a copy of the normalizer: the trainer's weights
    and observation statistics are bit-identical after it, and two scores of the same weights
    are the same numbers (greedy actions, identical hosts)."""
    cfg = _cfg(envs=2)
    trainer = PPOTrainer(cfg)
    trainer.train_round()
    before = {k: v.clone() for k, v in trainer.modules.state_dict().items()}
    norm = trainer.base_env.features.norm
    norm_before = {k: v.clone() for k, v in norm.state_dict().items()}
    check = HeldOutCheck(cfg, 2, trainer.base_env.kasmina.task)
    a = check.score(trainer.modules, norm, trainer.round)
    b = check.score(trainer.modules, norm, trainer.round)
    assert a.per_host == b.per_host and a.hosts == 2 and a.round == 1
    assert a.diff == pytest.approx(a.controller - a.heuristic)
    for k, v in trainer.modules.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in norm.state_dict().items():
        assert torch.equal(v, norm_before[k]), k
    assert trainer.modules.training  # the trainer's networks stay in train mode
    assert "round 1 " in check.summary() and "held-out verdict: the controller" in check.summary()


def test_train_prints_a_heldout_line_every_round_and_the_verdict(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert train.main(["--config", str(_tiny(tmp_path)), "--rounds", "2", "--heldout", "2", "--run-dir", str(run),
                       "--backends", "jsonl"]) == 0
    out = capsys.readouterr().out
    assert out.count("held-out (2 hosts, test split): controller") == 3  # round 0, 1, 2
    assert "held-out verdict: the controller" in out and "round 0 " in out.split("held-out verdict")[1]
    events = [json.loads(x) for x in (run / "telemetry.jsonl").read_text().splitlines()]
    held = [e["payload"] for e in events if e["kind"] == "heldout"]
    assert [h["round"] for h in held] == [0, 1, 2]
    assert all(len(h["per_host"]) == 2 and h["heuristic"] == held[0]["heuristic"] for h in held)
    # the held-out hosts' epochs are not the run's: the epoch events are the training envs' only
    epochs = [e for e in events if e["kind"] == "epoch"]
    assert len(epochs) == 2 * TINY["episode"]["length"]
    from esper.report.learning import learning_section
    from esper.report.run import RunData

    data = RunData()
    data.add(events)
    assert len(data.heldout) == 3 and "Held-out hosts (2, test split" in learning_section(data).note


def test_a_fresh_run_starts_from_the_shipped_controller_unless_from_scratch(tmp_path: Path, capsys) -> None:
    shipped = shipped_controller()
    assert shipped is not None
    argv = ["--config", str(_tiny(tmp_path)), "--rounds", "1", "--heldout", "0", "--backends", "none"]
    assert train.main([*argv, "--run-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert f"starting from the shipped controller {shipped}" in out and "held-out (" not in out
    assert load_checkpoint(tmp_path / "a" / "ppo.pt")["provenance"]["init_from"] == str(shipped)
    assert train.main([*argv, "--run-dir", str(tmp_path / "b"), "--from-scratch"]) == 0
    assert "starting from" not in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "b" / "ppo.pt")["provenance"]["init_from"] is None


def test_other_widths_start_from_scratch_and_say_why() -> None:
    path, said = shipped_start(_cfg().updated(ppo={"hidden_size": 96}))
    assert path is None and said.startswith("starting from scratch: the shipped controller's widths")
    assert "hidden_size" in said


@pytest.mark.parametrize(("argv", "message"), [
    (["--from-scratch", "--init", "x.pt"], "--from-scratch with --init"),
    (["--heldout", "-1"], "--heldout -1"),
    (["--heldout", "2", "--mix", "mix.yaml"], "--heldout with --mix"),
    (["--from-scratch", "--resume", "x.pt"], "--from-scratch with --resume"),
    (["--policy", "heuristic", "--heldout", "2"], "--heldout has no effect with --policy heuristic"),
    (["--policy", "heuristic", "--from-scratch"], "--from-scratch has no effect with --policy heuristic"),
])
def test_bad_start_flags_are_refused(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert train.main(["--config", str(_tiny(tmp_path)), "--run-dir", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "r").exists()
