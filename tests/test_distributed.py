"""torch.distributed over CPU ranks (gloo): sharded envs behave as the whole run in one process.

Ranks are spawned processes running the commands' ``main`` with the variables torchrun sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): the same code
path as ``torchrun -m esper.train``. Spawned, not forked: a fork of a process whose OpenMP
threads have run deadlocks in its first parallel torch op (seen with 2 threads). One slow test
runs the real ``torchrun``.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tiny_config import TINY

from esper import evaluate, train
from esper.simic.checkpoint import load_checkpoint
from esper.simic.distributed import shard

PPO_TINY = {**TINY, "ppo": {"minibatch_envs": 2, "epochs": 2, "hidden_size": 16, "lstm_hidden_size": 16}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(module: str, argv: list[str], rank: int, world: int, port: int, logs: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = open(logs / f"rank{rank}.out", "w")  # noqa: SIM115 (this process ends with os._exit)
    err = open(logs / f"rank{rank}.err", "w")  # noqa: SIM115
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.stdout, sys.stderr = out, err
    code = importlib.import_module(module).main(argv)
    out.flush()
    err.flush()
    os._exit(code)


STALL_S = 180.0  # a run is hung once neither its ranks' CPU time nor their logs moved for this long


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc; 0 elsewhere or once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Forked:
    """``world`` spawned ranks of ``python -m module argv``.

    Waits follow progress, not wall-clock guesses: a run may take as long as it needs on a
    loaded machine while its ranks burn CPU or write logs; it is declared hung only after
    ``STALL_S`` without either. Started through the ``spawn`` fixture, which reaps every rank
    whatever the test does."""

    def __init__(self, module: str, argv: list[str], world: int, logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.procs = [ctx.Process(target=_rank, args=(module, argv, r, world, port, logs)) for r in range(world)]
        for p in self.procs:
            p.start()

    def _progress(self) -> tuple[float, tuple[int, ...]]:
        cpu = sum(_cpu_seconds(p.pid) for p in self.procs if p.pid is not None and p.is_alive())
        sizes = tuple(f.stat().st_size for f in sorted(self.logs.iterdir()) if f.is_file())
        return cpu, sizes

    def wait_until(self, done: Callable[[], bool], stall: float = STALL_S) -> bool:
        """Poll ``done`` while the ranks make progress; False once they all exited or stalled first."""
        cpu, sizes = self._progress()
        quiet_since = time.monotonic()
        while not done():
            if not any(p.is_alive() for p in self.procs):
                return done()
            time.sleep(0.2)
            now_cpu, now_sizes = self._progress()
            if now_cpu > cpu + 0.5 or now_sizes != sizes:
                cpu, sizes, quiet_since = now_cpu, now_sizes, time.monotonic()
            elif time.monotonic() - quiet_since > stall:
                return False
        return True

    def wait(self, stall: float = STALL_S) -> list[int | None]:
        """Every rank's exit code once all exited (``None`` for a rank killed as hung)."""
        self.wait_until(lambda: not any(p.is_alive() for p in self.procs), stall)
        hung = [p.is_alive() for p in self.procs]
        self.reap()
        return [None if h else p.exitcode for h, p in zip(hung, self.procs, strict=True)]

    def reap(self) -> None:
        """Nothing outlives the test: kill and join every rank still running."""
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join()

    def err(self, rank: int) -> str:
        path = self.logs / f"rank{rank}.err"
        return path.read_text() if path.exists() else ""


@contextmanager
def reaped() -> Iterator[Callable[..., Forked]]:
    """Starts ranks (``start(module, argv, world, logs)``) and reaps them all on the way out,
    passed or failed (an assertion before a wait used to leave them running)."""
    runs: list[Forked] = []

    def start(module: str, argv: list[str], world: int, logs: Path) -> Forked:
        runs.append(Forked(module, argv, world, logs))
        return runs[-1]

    try:
        yield start
    finally:
        for run in runs:
            run.reap()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Forked]]:
    with reaped() as start:
        yield start


def main(argv: list[str]) -> int:
    """A rank that hangs: sleeps ``argv[0]`` seconds (the stall and reaping test's target)."""
    time.sleep(float(argv[0]))
    return 0


def test_a_failing_test_and_a_hung_rank_leave_no_process(tmp_path: Path) -> None:
    """Ranks are reaped when the test fails before waiting; a rank that makes no progress (no
    CPU, no log) is declared hung after the stall limit, however long it would have slept."""
    with pytest.raises(AssertionError, match="before any wait"), reaped() as start:
        failed = start("test_distributed", ["3600"], 1, tmp_path / "a")
        raise AssertionError("a check that fails before any wait")
    assert [p.is_alive() for p in failed.procs] == [False]
    with reaped() as start:
        hung = start("test_distributed", ["3600"], 1, tmp_path / "b")
        began = time.monotonic()
        assert hung.wait(stall=3.0) == [None]
        assert time.monotonic() - began < 600 and not hung.procs[0].is_alive()


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(PPO_TINY))
    return path


def test_shards_cover_every_env_once() -> None:
    for total, world in ((4, 2), (5, 2), (7, 3), (3, 3)):
        blocks = [shard(total, world, r) for r in range(world)]
        assert [i for off, n in blocks for i in range(off, off + n)] == list(range(total))
        assert max(n for _, n in blocks) - min(n for _, n in blocks) <= 1


def _events(run_dir: Path) -> Counter:
    lines = (run_dir / "telemetry.jsonl").read_text().splitlines()
    return Counter((e["kind"], e["env"], e["epoch"]) for e in map(json.loads, lines)
                   if e["kind"] in ("decision", "lifecycle", "episode", "epoch"))


def test_two_ranks_give_the_one_process_evaluation(cfg_file: Path, tmp_path: Path, spawn: Callable[..., Forked]) -> None:
    """static, heuristic and random over 4 envs: per-env test and validation accuracies
    identical, and rank 0 writes the telemetry of all 4 envs once (rank 1 writes nothing)."""
    base = ["--policies", "static,heuristic,random", "--config", str(cfg_file), "--envs", "4",
            "--backends", "jsonl", "--device", "cpu"]
    assert evaluate.main([*base, "--json", str(tmp_path / "one.json"), "--run-dir", str(tmp_path / "run1")]) == 0
    argv = [*base, "--json", str(tmp_path / "two.json"), "--run-dir", str(tmp_path / "run2")]
    run = spawn("esper.evaluate", argv, 2, tmp_path / "logs")
    assert run.wait() == [0, 0], run.err(0) + run.err(1)
    one = json.loads((tmp_path / "one.json").read_text())["results"]
    two = json.loads((tmp_path / "two.json").read_text())["results"]
    for policy in ("static", "heuristic", "random"):
        a, b = one[policy]["per_env"], two[policy]["per_env"]
        assert b["env"] == [0, 1, 2, 3]
        assert a["test_acc"] == b["test_acc"] and a["final_val_acc"] == b["final_val_acc"], policy
        assert one[policy]["trajectories"] == two[policy]["trajectories"]
    events = _events(tmp_path / "run2")
    assert events == _events(tmp_path / "run1")  # every env's decisions and episodes, once
    assert events[("episode", 3, 3)] == 3 and max(events.values()) == 3  # one per policy
    assert "results" not in (tmp_path / "logs" / "rank1.out").read_text()  # rank 1 says nothing


def test_a_rolled_back_env_is_reported_by_its_run_index(tmp_path: Path, spawn: Callable[..., Forked]) -> None:
    """A fault drill on env 3 (rank 1's second env): one rollback event naming env 3, and its
    episode the only governed one, as in one process."""
    cfg = tmp_path / "drill.json"
    cfg.write_text(json.dumps({**PPO_TINY, "faults": {"nan_loss_envs": [3], "at_epoch": 2}}))
    argv = ["--policies", "heuristic", "--config", str(cfg), "--envs", "4", "--backends", "jsonl", "--device", "cpu",
            "--json", str(tmp_path / "two.json"), "--run-dir", str(tmp_path / "run")]
    run = spawn("esper.evaluate", argv, 2, tmp_path / "logs")
    assert run.wait() == [0, 0], run.err(0) + run.err(1)
    result = json.loads((tmp_path / "two.json").read_text())["results"]["heuristic"]
    assert result["governed_episodes"] == 1 and result["per_env"]["env"] == [0, 1, 2]
    events = [json.loads(line) for line in (tmp_path / "run" / "telemetry.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e["kind"] == "anomaly" and e.get("detector") == "governor"]
    assert [(e["env"], e["message"][:22]) for e in rollbacks] == [(3, "env 3 diverged at epoc")]


def _has_epoch(telemetry: Path) -> bool:
    """``telemetry`` holds an epoch event (each finished epoch is flushed)."""
    return telemetry.exists() and '"kind": "epoch"' in telemetry.read_text().replace('"kind":"', '"kind": "')


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_epoch(cfg_file: Path, tmp_path: Path, spawn: Callable[..., Forked]) -> None:
    argv = ["--policy", "heuristic", "--config", str(cfg_file), "--envs", "4", "--episodes", "200",
            "--backends", "jsonl", "--run-dir", str(tmp_path / "run"), "--device", "cpu"]
    run = spawn("esper.train", argv, 2, tmp_path / "logs")
    # Mid-run: once rank 0 has flushed a finished epoch (a fixed sleep raced slow starts on a
    # loaded machine, where the signal landed before the handlers were installed).
    assert run.wait_until(lambda: _has_epoch(tmp_path / "run" / "telemetry.jsonl")), run.err(0) + run.err(1)
    os.kill(run.procs[1].pid, signal.SIGTERM)
    assert run.wait() == [143, 143], run.err(0) + run.err(1)
    said = [run.err(r).strip().splitlines()[-1] for r in (0, 1)]
    assert said[0] == said[1] and said[0].startswith("interrupted;"), said  # the same epoch count


def _params_close(a: dict, b: dict, atol: float = 1e-5) -> float:
    worst = 0.0
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_floating_point(a[k]):
            worst = max(worst, float((a[k] - b[k]).abs().max()))
        else:
            assert torch.equal(a[k], b[k]), k
    assert worst <= atol, worst
    return worst


def test_one_ppo_round_on_two_ranks_equals_one_process(cfg_file: Path, tmp_path: Path, spawn: Callable[..., Forked]) -> None:
    """DDP over 2 ranks with minibatches by global env index: the one-process update."""
    base = ["--config", str(cfg_file), "--envs", "4", "--rounds", "1", "--backends", "none", "--device", "cpu"]
    assert train.main([*base, "--save", str(tmp_path / "one.pt")]) == 0
    run = spawn("esper.train", [*base, "--save", str(tmp_path / "two.pt")], 2, tmp_path / "logs")
    assert run.wait() == [0, 0], run.err(0) + run.err(1)
    one, two = load_checkpoint(tmp_path / "one.pt"), load_checkpoint(tmp_path / "two.pt")
    _params_close(one["modules"], two["modules"])
    _params_close(one["obs_norm"], two["obs_norm"])
    assert torch.equal(one["env_episode"], two["env_episode"]) and one["env_episode"].numel() == 4
    h1, h2 = one["history"][-1], two["history"][-1]
    assert h1["op_freq"] == h2["op_freq"] and h1["test_acc"] == h2["test_acc"]
    assert h1["passes"] == h2["passes"]
    assert h1["kl"] == pytest.approx(h2["kl"], rel=1e-4, abs=1e-7)
    assert h1["explained_variance"] == pytest.approx(h2["explained_variance"], rel=1e-4, abs=1e-6)


def test_a_dead_rank_ends_every_rank(cfg_file: Path, tmp_path: Path, spawn: Callable[..., Forked]) -> None:
    """SIGKILL one rank mid-run: the other exits 1 at its next collective with one clear line."""
    ckpt = tmp_path / "ppo.pt"
    argv = ["--config", str(cfg_file), "--envs", "4", "--rounds", "50", "--backends", "none", "--device", "cpu",
            "--save", str(ckpt), "--dist-timeout", "20"]
    run = spawn("esper.train", argv, 2, tmp_path / "logs")
    assert run.wait_until(ckpt.exists), run.err(0)  # mid-run: a round is done
    os.kill(run.procs[1].pid, signal.SIGKILL)
    killed = time.monotonic()
    codes = run.wait()
    # ended by --dist-timeout (20 s) at its next collective, not the default 30 min; slack for load
    assert time.monotonic() - killed < 120
    assert codes[1] == -signal.SIGKILL and codes[0] == 1, (codes, run.err(0))
    err = run.err(0).strip().splitlines()
    assert err[-1].startswith("error: rank 0 of 2") and "(torch.distributed)" in err[-1] and "--resume" in err[-1]
    assert load_checkpoint(ckpt)["round"] >= 1  # the last checkpoint survives


def test_resume_two_rank_checkpoint_on_one_or_two_ranks(cfg_file: Path, tmp_path: Path, spawn: Callable[..., Forked]) -> None:
    """The checkpoint holds the whole run: the next round is the same on 1 rank as on 2."""
    base = ["--config", str(cfg_file), "--envs", "4", "--backends", "none", "--device", "cpu"]
    first = spawn("esper.train", [*base, "--rounds", "1", "--save", str(tmp_path / "r1.pt")], 2, tmp_path / "a")
    assert first.wait() == [0, 0], first.err(0) + first.err(1)
    more = [*base, "--rounds", "2", "--resume", str(tmp_path / "r1.pt")]
    assert train.main([*more, "--save", str(tmp_path / "one.pt")]) == 0
    second = spawn("esper.train", [*more, "--save", str(tmp_path / "two.pt")], 2, tmp_path / "b")
    assert second.wait() == [0, 0], second.err(0) + second.err(1)
    one, two = load_checkpoint(tmp_path / "one.pt"), load_checkpoint(tmp_path / "two.pt")
    assert one["round"] == two["round"] == 2
    _params_close(one["modules"], two["modules"])
    _params_close(one["optimizer"]["state"][0], two["optimizer"]["state"][0])
    assert torch.equal(one["env_episode"], two["env_episode"])
    assert one["history"][-1]["op_freq"] == two["history"][-1]["op_freq"]
    assert one["history"][-1]["test_acc"] == two["history"][-1]["test_acc"]


def test_more_ranks_than_envs_is_refused(cfg_file: Path, tmp_path: Path, spawn: Callable[..., Forked]) -> None:
    argv = ["--policy", "static", "--config", str(cfg_file), "--envs", "1", "--backends", "none", "--device", "cpu"]
    run = spawn("esper.train", argv, 2, tmp_path / "logs")
    assert run.wait() == [2, 2]
    assert "error: 1 envs over 2 ranks (--envs); at least one env per rank" in run.err(0)


@pytest.mark.slow
def test_torchrun_launches_evaluate(cfg_file: Path, tmp_path: Path) -> None:
    """The real launcher: ``torchrun --nproc_per_node 2 -m esper.evaluate`` on the CPU."""
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "eval.json"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "esper.evaluate",
           "--policies", "static", "--config", str(cfg_file), "--envs", "4", "--backends", "none",
           "--device", "cpu", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["results"]["static"]["per_env"]["env"] == [0, 1, 2, 3]
