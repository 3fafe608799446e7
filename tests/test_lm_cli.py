"""End to end on language-model tasks: the `lm` and `tinystories` presets through esper.evaluate
and esper.train, every controller unchanged, perplexity reported."""

from __future__ import annotations

import json
import math

from esper import evaluate, train

SMALL = {"task": {"seq_len": 12, "train_size": 64, "val_size": 32, "test_size": 32},
         "kasmina": {"batch_size": 16, "val_batch_size": 32}, "episode": {"length": 3, "envs": 2},
         "fixed": {"epochs": [0, 1]}}


def _config(tmp_path, extra: dict | None = None):
    cfg = json.loads(json.dumps(SMALL))
    for key, value in (extra or {}).items():
        cfg.setdefault(key, {}).update(value)
    path = tmp_path / "small.json"
    path.write_text(json.dumps(cfg))
    return path


def test_evaluate_lm_preset_reports_perplexity(tmp_path, capsys) -> None:
    out_json = tmp_path / "lm.json"
    rc = evaluate.main(["--preset", "lm", "--config", str(_config(tmp_path)), "--policies",
                        "static,random,fixed,heuristic", "--backends", "none", "--json", str(out_json)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "test ppl" in out and "next-token accuracy" in out
    results = json.loads(out_json.read_text())["results"]
    for r in results.values():
        ppl, loss = r["test_perplexity"]["mean"], r["test_loss"]["mean"]
        assert 1.0 < ppl < 200 and math.isfinite(loss)
        assert 0.0 < r["test_acc"]["mean"] < 100.0
    assert results["static"]["params_added"]["mean"] == 0.0
    assert results["fixed"]["params_added"]["mean"] > 0  # the fixed schedule germinated MLP seeds


def test_tinystories_preset_reads_a_local_file(tmp_path, capsys) -> None:
    stories = "<|endoftext|>".join(f"Once upon a time, a dog named Rex{i} found a ball. He was happy. " * 3
                                   for i in range(60))
    (tmp_path / "TinyStories-train.txt").write_text(stories)
    cfg = _config(tmp_path, {"task": {"data_dir": str(tmp_path), "seq_len": 16},
                             "kasmina": {"host": "lm_small"}})
    out_json = tmp_path / "ts.json"
    rc = evaluate.main(["--preset", "tinystories", "--config", str(cfg), "--policies", "static,heuristic",
                        "--backends", "none", "--json", str(out_json)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(out_json.read_text())
    assert data["config"]["task"]["name"] == "tinystories"
    assert 1.0 < data["results"]["heuristic"]["test_perplexity"]["mean"] < 256


def test_tinystories_without_data_is_one_clear_error(tmp_path, capsys) -> None:
    cfg = _config(tmp_path, {"task": {"data_dir": str(tmp_path / "missing")}})
    assert evaluate.main(["--preset", "tinystories", "--config", str(cfg), "--policies", "static"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "nothing is downloaded" in err and "task.data_dir" in err


def test_train_ppo_on_lm_preset(tmp_path, capsys) -> None:
    rc = train.main(["--preset", "lm", "--config", str(_config(tmp_path, {"ppo": {"minibatch_envs": 2}})),
                     "--rounds", "1", "--backends", "none", "--run-dir", str(tmp_path / "run")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "test ppl" in out and (tmp_path / "run" / "ppo.pt").exists()


def test_too_little_text_is_one_clear_error(tmp_path, capsys) -> None:
    """Data that cannot supply the windows asked for is refused in one line, before any host."""
    (tmp_path / "TinyStories-train.txt").write_text("<|endoftext|>".join(["A short story."] * 20))
    cfg = _config(tmp_path, {"task": {"data_dir": str(tmp_path), "seq_len": 16, "val_size": 500}})
    assert evaluate.main(["--preset", "tinystories", "--config", str(cfg), "--policies", "static"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tinystories: not enough text") and "(task 'tinystories')" in err
    assert "Traceback" not in err


def test_a_cnn_host_on_a_language_task_is_refused_before_work(tmp_path, capsys) -> None:
    cfg = _config(tmp_path, {"kasmina": {"host": "shallow"}})
    assert evaluate.main(["--preset", "lm", "--config", str(cfg), "--policies", "static"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: kasmina.host 'shallow' cannot run task 'grammar'") and "lm_small" in err
