"""End-to-end: esper.train and esper.evaluate on a tiny config."""

from __future__ import annotations

import json

import pytest
from tiny_config import TINY

from esper import evaluate, train


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def test_train_cli_runs_and_summarizes(tiny_config, tmp_path, capsys) -> None:
    rc = train.main(["--policy", "fixed", "--config", str(tiny_config), "--backends", "jsonl",
                     "--run-dir", str(tmp_path / "run"), "--telemetry", "standard"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "germinate(conv_small@late)" in out and "test acc" in out and "3 host transfers for 3 epochs" in out
    lines = (tmp_path / "run" / "telemetry.jsonl").read_text().splitlines()
    kinds = {json.loads(line)["kind"] for line in lines}
    assert {"epoch", "decision", "lifecycle", "episode", "narrative", "analytics"} <= kinds
    epoch = next(json.loads(line) for line in lines if json.loads(line)["kind"] == "epoch")
    assert "diag.gradients.total_norm" in epoch["payload"]  # the standard profile's gradient norms
    assert "diag.per_class.accuracy" not in epoch["payload"]  # disabled in standard


def test_train_cli_rejects_bad_config(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"episode": {"lenght": 3}}))
    assert train.main(["--config", str(bad)]) == 2
    assert "episode.lenght" in capsys.readouterr().err  # the one error format: stderr, exit 2
    assert train.main(["--policy", "nonesuch", "--config", str(bad)]) == 2


def test_evaluate_cli_writes_table_and_json(tiny_config, tmp_path, capsys) -> None:
    out_json = tmp_path / "eval" / "results.json"
    rc = evaluate.main(["--policies", "static,heuristic", "--config", str(tiny_config), "--backends", "none",
                        "--json", str(out_json)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "static" in out and "heuristic" in out and "final val acc" in out
    data = json.loads(out_json.read_text())
    assert set(data["results"]) == {"static", "heuristic"}
    assert data["results"]["static"]["episodes"] == 2
    assert data["results"]["static"]["params_added"]["mean"] == 0.0
    assert not list(out_json.parent.glob("*.tmp"))


def test_trace_has_named_phases(tiny_config, tmp_path) -> None:
    rc = train.main(["--policy", "heuristic", "--config", str(tiny_config), "--backends", "none",
                     "--telemetry", "standard", "--trace", str(tmp_path / "traces")])
    assert rc == 0
    trace = tmp_path / "traces" / "heuristic-standard.trace.json"
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"train", "validate", "counterfactual", "policy", "telemetry"} <= names
