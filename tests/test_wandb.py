"""The optional W&B backend: what it logs, offline by default, and a failing W&B never stops a run.

Most tests use a recording stand-in for the ``wandb`` module (the package is an optional extra);
the last runs the real package in offline mode when it is installed.
"""

from __future__ import annotations

import importlib.machinery
import json
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from esper import train

ARGS = ["--policy", "heuristic", "--envs", "2", "--episode-length", "4"]


class FakeConfig(dict):
    def update(self, d: dict, allow_val_change: bool = False) -> None:  # wandb's signature
        super().update(d)


class FakeRun:
    """Records what a W&B run is given."""

    def __init__(self, fail_log: bool) -> None:
        self.rows: list[dict] = []
        self.config = FakeConfig()
        self.summary: dict = {}
        self.metrics: list[tuple] = []
        self.finished = False
        self.fail_log = fail_log

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.metrics.append((name, step_metric))

    def log(self, row: dict) -> None:
        if self.fail_log:
            raise ConnectionError("W&B is down")
        self.rows.append(dict(row))

    def finish(self) -> None:
        self.finished = True


def fake_wandb(monkeypatch: pytest.MonkeyPatch, *, fail_init: bool = False, fail_log: bool = False):
    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    mod.calls = []
    mod.Settings = lambda **kw: kw

    def init(**kw):
        mod.calls.append(kw)
        if fail_init:
            raise TimeoutError("no network")
        mod.run = FakeRun(fail_log)
        return mod.run

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


def _epochs(run_dir: Path) -> list[dict]:
    events = [json.loads(x) for x in (run_dir / "telemetry.jsonl").read_text().splitlines()]
    return [e for e in events if e["kind"] == "epoch"]


def test_wandb_logs_the_epoch_means_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    wandb = fake_wandb(monkeypatch)
    rc = train.main([*ARGS, "--reward-mode", "sparse", "--backends", "wandb,jsonl", "--run-dir", str(tmp_path)])
    assert rc == 0
    (call,) = wandb.calls
    assert call["mode"] == "offline" and call["dir"] == str(tmp_path) and call["project"] == "esper"
    run = wandb.run
    assert ("*", "epoch") in run.metrics and run.finished
    assert run.config["reward"]["mode"] == "sparse" and run.config["episode"]["envs"] == 2
    rows = [r for r in run.rows if "signals.val_acc/mean" in r]
    epochs = _epochs(tmp_path)
    assert [r["epoch"] for r in rows] == [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    for r, e in zip(rows, epochs, strict=True):
        assert r["signals.val_acc/mean"] == pytest.approx(float(np.mean(e["payload"]["signals.val_acc"])))
        assert r["reward/mean"] == pytest.approx(float(np.mean(e["payload"]["reward"])))
    episodes = [r for r in run.rows if "episode/test_acc" in r]
    assert len(episodes) == 2 and all(r["episode/reward_components/shaping"] == 0.0 for r in episodes)
    assert run.summary["episode/env0/last"] == "no growth" or "→" in run.summary["episode/env0/last"]


@pytest.mark.parametrize("where", ["init", "log"])
def test_a_failing_wandb_never_stops_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str], where: str) -> None:
    fake_wandb(monkeypatch, fail_init=where == "init", fail_log=where == "log")
    rc = train.main([*ARGS, "--backends", "wandb,jsonl", "--run-dir", str(tmp_path)])
    out = capsys.readouterr()
    assert rc == 0 and "test acc" in out.out
    assert len(_epochs(tmp_path)) == 4  # the other backends got everything
    lost = [line for line in out.err.splitlines() if line.startswith("telemetry lost: wandb dropped")]
    assert len(lost) == 1 and "disabled after repeated failures" in lost[0], out.err
    assert ("no network" if where == "init" else "W&B is down") in lost[0]


def test_missing_wandb_is_refused_before_work(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    rc = train.main([*ARGS, "--backends", "wandb", "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: the wandb backend needs the 'wandb' package")
    assert not (tmp_path / "wandb").exists()


def _wandb_records(path: Path) -> list[bytes]:
    """Records of a ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB."""
    raw, pos, out, buf = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(data)
        elif kind == 2:
            buf = data
        elif kind == 3:
            buf += data
        elif kind == 4:
            out.append(buf + data)
    return out


def test_real_wandb_offline_run_holds_the_epoch_means(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2 as pb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert train.main([*ARGS, "--backends", "wandb,jsonl", "--run-dir", str(tmp_path)]) == 0
    (file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = []
    for data in _wandb_records(file):
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    logged = [(r["epoch"], r["signals.val_acc/mean"]) for r in rows if "signals.val_acc/mean" in r]
    want = [(e["epoch"], float(np.mean(e["payload"]["signals.val_acc"]))) for e in _epochs(tmp_path)]
    assert [e for e, _ in logged] == [e for e, _ in want] == [1, 2, 3, 4]
    assert [v for _, v in logged] == pytest.approx([v for _, v in want])
