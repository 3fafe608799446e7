"""Issue 29: the main command as a user lives it: progress in every long phase, a second
signal that ends the run at once, a command that can run twice and names where its results are."""

from __future__ import annotations

import itertools
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tiny_config import TINY

from esper import train
from esper.progress import COMPILES, RunProgress, clock
from esper.report.__main__ import main as report_main
from esper.simic.train_output import fresh_run_dir

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "ESPER_RUNS": str(tmp_path / "runs"), **extra}


def _tiny(tmp_path: Path, **episode: int) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({**TINY, "episode": {**TINY["episode"], **episode}}))
    return path


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _read_pty(fd: int, proc: subprocess.Popen, timeout: float) -> list[tuple[float, str]]:
    """Every chunk the child wrote to its terminal, with the time it arrived."""
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the child closed its end
                break
            if not data:
                break
            chunks.append((time.monotonic(), data.decode(errors="replace")))
        elif proc.poll() is not None:
            break
    return chunks


def test_progress_under_a_terminal_updates_at_least_every_10_s(tmp_path: Path) -> None:
    """``esper.train`` under a pseudo-terminal (rich's live view): from its first output to its
    last, never 10 s without a status update, and the status says the round, the epoch and the
    PPO update in turn."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "esper.train", "--config", str(_tiny(tmp_path)), "--preset",
                             "default", "--rounds", "2", "--run-dir", str(tmp_path / "run")],
                            stdin=slave, stdout=slave, stderr=slave, env=_env(tmp_path, COLUMNS="200"),
                            close_fds=True)
    os.close(slave)
    try:
        chunks = _read_pty(master, proc, timeout=240)
    finally:
        os.close(master)
        proc.wait(timeout=30)
    text = ANSI.sub("", "".join(c for _, c in chunks))
    assert proc.returncode == 0, text[-2000:]
    updates = [t for t, c in chunks if "elapsed" in c]  # a redrawn status line
    assert len(updates) >= 4, text[-2000:]
    start, end = chunks[0][0], next(t for t, c in chunks if "done:" in c)
    gaps = [b - a for a, b in zip([start, *updates], [*updates, end], strict=True)]
    assert max(gaps) < 10.0, gaps
    assert "round 1/2 · epoch 1/3" in text and "round 2/2 · epoch 2/3" in text
    assert "round 1/2: PPO update" in text
    assert re.search(r"round 2/2 · epoch 2/3 · [0-9.]+ env-epochs/s · ETA \d+:\d\d", text), text[-3000:]


def test_second_sigint_in_a_long_phase_exits_at_once_and_keeps_the_files(tmp_path: Path) -> None:
    """The first Ctrl-C says the run stops at the end of the epoch; a second one ends it within
    5 s (exit 130), and what was written is whole: every telemetry line parses, no temp file."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "esper.train", "--config", str(_tiny(tmp_path, length=200)),
                             "--preset", "default", "--rounds", "1", "--run-dir", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    seen = []
    for line in proc.stdout:  # plain lines: stdout is a pipe
        seen.append(line)
        if line.startswith("progress: round 1/1 · epoch 0/200"):  # the round's epochs have begun
            break
    assert seen[-1].startswith("progress: round 1/1 · epoch"), "".join(seen) + proc.stderr.read()
    deadline = time.monotonic() + 120
    while '"kind": "epoch"' not in _text(run / "telemetry.jsonl") and time.monotonic() < deadline:
        time.sleep(0.05)  # an epoch on disk: the signals come in the middle of the round
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - sent
    # 130, or killed by SIGINT itself (the shell shows 130 too) when the second signal lands
    # while the interpreter finalizes, where Python has put the default handler back
    assert proc.returncode in (130, -signal.SIGINT), err
    assert took < 5.0, took
    assert "SIGINT: stopping at the end of this epoch (send it again to exit at once)" in err
    if proc.returncode == 130:
        assert "interrupted by SIGINT again: exiting now" in err
    events = [json.loads(x) for x in (run / "telemetry.jsonl").read_text().splitlines()]
    assert events[0]["kind"] == "run" and any(e["kind"] == "epoch" for e in events)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")] and not (run / "ppo.pt").exists()


@pytest.mark.slow
def test_plain_output_says_what_compiles_and_a_signal_during_compile_exits_at_once(tmp_path: Path) -> None:
    """Not a terminal: ``progress:`` lines every 5 s while a cold torch.compile runs, naming the
    graph; the first SIGINT during the compile ends the run within 5 s (130)."""
    env = _env(tmp_path, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cold-cache"))
    proc = subprocess.Popen([sys.executable, "-m", "esper.train", "--config", str(_tiny(tmp_path)), "--preset",
                             "default", "--rounds", "1", "--compile", "--run-dir", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    compiling: list[float] = []
    for line in proc.stdout:
        if line.startswith("progress:") and "compiling training step (graph 1)" in line:
            compiling.append(time.monotonic())
            if len(compiling) == 3:
                break
    assert len(compiling) == 3, proc.communicate(timeout=60)
    assert max(b - a for a, b in itertools.pairwise(compiling)) < 10.0
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5.0
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT while compiling training step: exiting now" in err


def test_the_readme_train_command_runs_twice_and_names_a_reportable_directory(tmp_path: Path, capsys,
                                                                            monkeypatch) -> None:
    """The README's command (with the tiny config) twice in a row: two fresh directories, the
    second is runs/latest, each holds a checkpoint and JSONL telemetry, and the report command it
    prints works on it."""
    monkeypatch.chdir(tmp_path)
    argv = ["--config", str(_tiny(tmp_path, length=2)), "--preset", "default", "--rounds", "1"]
    dirs = []
    for _ in range(2):
        assert train.main(argv) == 0
        out = capsys.readouterr().out
        named = re.search(r"^results in (\S+): ", out, re.M)
        assert named, out
        dirs.append(Path(named.group(1)))
        assert f"python -m esper.report {dirs[-1]}" in out
        assert f"python -m esper.evaluate --policies static,heuristic,ppo={dirs[-1] / 'ppo.pt'}" in out
    assert dirs[0] != dirs[1] and all(d.parent == tmp_path / "runs" for d in dirs)
    assert (tmp_path / "runs" / "latest").resolve() == dirs[1].resolve()
    for d in dirs:
        assert (d / "ppo.pt").exists()
        kinds = {json.loads(x)["kind"] for x in (d / "telemetry.jsonl").read_text().splitlines()}
        assert {"run", "epoch", "ppo_update"} <= kinds
    assert train.main([*argv[:-1], "2", "--resume", str(dirs[0] / "ppo.pt")]) == 0  # goes on in place
    assert re.search(rf"^results in {re.escape(str(dirs[0]))}: ", capsys.readouterr().out, re.M)
    updates = [json.loads(x)["epoch"] for x in (dirs[0] / "telemetry.jsonl").read_text().splitlines()
               if '"ppo_update"' in x]
    assert updates == [1, 2] and len(list((tmp_path / "runs").iterdir())) == 3  # two runs and latest
    assert report_main([str(dirs[1])]) == 0
    assert (dirs[1] / "report.html").stat().st_size > 1000
    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps at 80 columns otherwise
    assert report_main([str(dirs[1]), "--live"]) == 0  # not a terminal: one snapshot of the live view
    snap = capsys.readouterr().out.splitlines()
    assert snap[0] == f"{dirs[1]}  epoch 2/2  episodes done 2"
    assert snap[1].startswith("val acc  ") and len(snap[1].split()[2]) == 2  # a sparkline of 2 epochs
    grid = snap[snap.index("seed stage per env (early mid late in each cell, 8 envs a line):") + 1]
    assert re.fullmatch(r"   0  [·GTBSPFCER]{3}  [·GTBSPFCER]{3}", grid.rstrip()), grid
    assert any(s.startswith("seeds by stage: ") for s in snap) and any(s.startswith("PPO round 1: test ") for s in snap)


def test_fresh_run_dirs_never_collide(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ESPER_RUNS", str(tmp_path / "r"))
    now = datetime(2026, 12, 5, 8, 1, 2)
    first = fresh_run_dir("ppo", now)
    assert first == tmp_path / "r" / "ppo-20261205-080102"
    first.mkdir(parents=True)
    assert fresh_run_dir("ppo=x.pt", now) == tmp_path / "r" / "ppo-20261205-080102-2"


def test_an_explicit_run_dir_keeps_the_overwrite_rule(tmp_path: Path, capsys) -> None:
    """--run-dir names the directory: a second fresh run there is refused before any work."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ppo.pt").write_bytes(b"x")
    assert train.main(["--envs", "2", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint") and "--resume it, or --force" in err
    assert not (tmp_path / "runs").exists()


def test_status_names_the_compile_the_rate_and_the_eta() -> None:
    """The status line while dynamo compiles (seen through its compile callbacks), then the
    rate measured without it and an ETA."""
    progress = RunProgress(Console(quiet=True), live=False)
    seen = []

    def backend(gm, example_inputs):  # runs inside dynamo's compile
        seen.append(progress.status())
        return gm.forward

    torch._dynamo.reset()  # clears dynamo's callbacks: the progress must register its own again
    with progress:
        progress.phase("round 1/2", total=4, unit="epoch", per_unit=8)
        torch.compile(lambda x: x * 2 + 1, backend=backend)(torch.ones(3))
        assert not COMPILES.active
        progress.advance(1)
        time.sleep(0.2)
        progress.advance(3)
        line = progress.status()
    assert len(seen) == 1 and re.search(r"compiling a graph \(graph \d+\) for 0:0\d", seen[0]), seen
    assert line.startswith("round 1/2 · epoch 3/4 · ")
    rate = float(re.search(r"([0-9.]+) env-epochs/s", line).group(1))
    assert 8 * 2 / 0.5 < rate < 8 * 2 / 0.15  # 2 epochs of 8 envs in ~0.2 s
    assert "ETA 0:00" in line and clock(3725) == "1:02:05"


def test_plain_progress_prints_a_line_every_heartbeat(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    with path.open("w") as f:
        console = Console(file=f, width=200)
        with RunProgress(console, heartbeat=0.5) as progress:
            progress.phase("evaluating", total=2, unit="policy")
            time.sleep(1.8)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("progress: evaluating · policy 0/2 · ") and 3 <= len(lines) <= 5, lines



def test_console_keeps_routine_anomalies_out_of_red_severe_lines() -> None:
    """Verbosity 0 (the default): an env's accuracy swing (severe by its own detector) is counted
    and named once at the end as expected; a governor rollback still prints as severe."""
    from esper.leyline.events import AnomalyEvent, EventKind
    from esper.nissa.backends import ConsoleBackend

    console = Console(record=True, width=300, force_terminal=False)
    backend = ConsoleBackend(verbosity=0, console=console)
    for env in (3, 5):
        backend.emit(AnomalyEvent(kind=EventKind.ANOMALY, env=env, epoch=7, detector="performance_degradation",
                                  severity="severe", message="accuracy 40.0 is 15.0 below its best 55.0"))
    backend.emit(AnomalyEvent(kind=EventKind.ANOMALY, env=2, epoch=8, detector="governor", severity="severe",
                              message="loss not finite: rolled back"))
    assert console.export_text().splitlines() == ["epoch 8 env 2 severe: loss not finite: rolled back"]
    backend.close()
    last = console.export_text().splitlines()[-1]
    assert last.startswith("routine anomalies not shown (performance_degradation x2): expected in a normal run")
    loud = Console(record=True, width=300)
    ConsoleBackend(verbosity=1, console=loud).emit(AnomalyEvent(
        kind=EventKind.ANOMALY, env=3, epoch=7, detector="performance_degradation", severity="severe",
        message="accuracy 40.0 is 15.0 below its best 55.0"))
    text = loud.export_text()
    assert "performance_degradation (routine: one env's accuracy swings" in text and "severe" not in text


def test_sparkline_scales_from_min_to_max() -> None:
    from esper.report.live import sparkline

    assert sparkline([10.0, 20.0, 30.0, 40.0], 3) == "▁▅█"  # the last 3, halfway is the 5th of 8
    assert sparkline([5.0, 5.0], 10) == "▁▁" and sparkline([], 5) == ""
