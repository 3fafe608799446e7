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


class Forked:
    """``world`` spawned ranks of ``python -m module argv``."""

    def __init__(self, module: str, argv: list[str], world: int, logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.procs = [ctx.Process(target=_rank, args=(module, argv, r, world, port, logs)) for r in range(world)]
        for p in self.procs:
            p.start()

    def wait(self, timeout: float) -> list[int | None]:
        end = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(end - time.monotonic(), 0.1))
        for p in self.procs:  # nothing outlives the test
            if p.is_alive():
                p.kill()
                p.join()
        return [p.exitcode for p in self.procs]

    def err(self, rank: int) -> str:
        return (self.logs / f"rank{rank}.err").read_text()


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


def test_two_ranks_give_the_one_process_evaluation(cfg_file: Path, tmp_path: Path) -> None:
    """static, heuristic and random over 4 envs: per-env test and validation accuracies
    identical, and rank 0 writes the telemetry of all 4 envs once (rank 1 writes nothing)."""
    base = ["--policies", "static,heuristic,random", "--config", str(cfg_file), "--envs", "4",
            "--backends", "jsonl", "--device", "cpu"]
    assert evaluate.main([*base, "--json", str(tmp_path / "one.json"), "--run-dir", str(tmp_path / "run1")]) == 0
    argv = [*base, "--json", str(tmp_path / "two.json"), "--run-dir", str(tmp_path / "run2")]
    run = Forked("esper.evaluate", argv, 2, tmp_path / "logs")
    assert run.wait(50) == [0, 0], run.err(0) + run.err(1)
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


def test_a_rolled_back_env_is_reported_by_its_run_index(tmp_path: Path) -> None:
    """A fault drill on env 3 (rank 1's second env): one rollback event naming env 3, and its
    episode the only governed one, as in one process."""
    cfg = tmp_path / "drill.json"
    cfg.write_text(json.dumps({**PPO_TINY, "faults": {"nan_loss_envs": [3], "at_epoch": 2}}))
    argv = ["--policies", "heuristic", "--config", str(cfg), "--envs", "4", "--backends", "jsonl", "--device", "cpu",
            "--json", str(tmp_path / "two.json"), "--run-dir", str(tmp_path / "run")]
    run = Forked("esper.evaluate", argv, 2, tmp_path / "logs")
    assert run.wait(50) == [0, 0], run.err(0) + run.err(1)
    result = json.loads((tmp_path / "two.json").read_text())["results"]["heuristic"]
    assert result["governed_episodes"] == 1 and result["per_env"]["env"] == [0, 1, 2]
    events = [json.loads(line) for line in (tmp_path / "run" / "telemetry.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e["kind"] == "anomaly" and e.get("detector") == "governor"]
    assert [(e["env"], e["message"][:22]) for e in rollbacks] == [(3, "env 3 diverged at epoc")]


def _wait_for_epoch(telemetry: Path, timeout: float) -> bool:
    """True once ``telemetry`` holds an epoch event (each finished epoch is flushed)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if telemetry.exists() and '"kind": "epoch"' in telemetry.read_text().replace('"kind":"', '"kind": "'):
            return True
        time.sleep(0.5)
    return False


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_epoch(cfg_file: Path, tmp_path: Path) -> None:
    argv = ["--policy", "heuristic", "--config", str(cfg_file), "--envs", "4", "--episodes", "200",
            "--backends", "jsonl", "--run-dir", str(tmp_path / "run"), "--device", "cpu"]
    run = Forked("esper.train", argv, 2, tmp_path / "logs")
    # Mid-run: once rank 0 has flushed a finished epoch (a fixed sleep raced slow starts on a
    # loaded machine, where the signal landed before the handlers were installed).
    assert _wait_for_epoch(tmp_path / "run" / "telemetry.jsonl", 120), run.err(0) + run.err(1)
    os.kill(run.procs[1].pid, signal.SIGTERM)
    assert run.wait(60) == [143, 143], run.err(0) + run.err(1)
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


def test_one_ppo_round_on_two_ranks_equals_one_process(cfg_file: Path, tmp_path: Path) -> None:
    """DDP over 2 ranks with minibatches by global env index: the one-process update."""
    base = ["--config", str(cfg_file), "--envs", "4", "--rounds", "1", "--backends", "none", "--device", "cpu"]
    assert train.main([*base, "--save", str(tmp_path / "one.pt")]) == 0
    run = Forked("esper.train", [*base, "--save", str(tmp_path / "two.pt")], 2, tmp_path / "logs")
    assert run.wait(55) == [0, 0], run.err(0) + run.err(1)
    one, two = load_checkpoint(tmp_path / "one.pt"), load_checkpoint(tmp_path / "two.pt")
    _params_close(one["modules"], two["modules"])
    _params_close(one["obs_norm"], two["obs_norm"])
    assert torch.equal(one["env_episode"], two["env_episode"]) and one["env_episode"].numel() == 4
    h1, h2 = one["history"][-1], two["history"][-1]
    assert h1["op_freq"] == h2["op_freq"] and h1["test_acc"] == h2["test_acc"]
    assert h1["passes"] == h2["passes"]
    assert h1["kl"] == pytest.approx(h2["kl"], rel=1e-4, abs=1e-7)
    assert h1["explained_variance"] == pytest.approx(h2["explained_variance"], rel=1e-4, abs=1e-6)


def test_a_dead_rank_ends_every_rank(cfg_file: Path, tmp_path: Path) -> None:
    """SIGKILL one rank mid-run: the other exits 1 at its next collective with one clear line."""
    ckpt = tmp_path / "ppo.pt"
    argv = ["--config", str(cfg_file), "--envs", "4", "--rounds", "50", "--backends", "none", "--device", "cpu",
            "--save", str(ckpt), "--dist-timeout", "20"]
    run = Forked("esper.train", argv, 2, tmp_path / "logs")
    deadline = time.monotonic() + 45
    while not ckpt.exists() and time.monotonic() < deadline:  # mid-run: a round is done
        time.sleep(0.2)
    assert ckpt.exists(), run.err(0)
    os.kill(run.procs[1].pid, signal.SIGKILL)
    killed = time.monotonic()
    codes = run.wait(30)
    assert time.monotonic() - killed < 25
    assert codes[1] == -signal.SIGKILL and codes[0] == 1, (codes, run.err(0))
    err = run.err(0).strip().splitlines()
    assert err[-1].startswith("error: rank 0 of 2") and "(torch.distributed)" in err[-1] and "--resume" in err[-1]
    assert load_checkpoint(ckpt)["round"] >= 1  # the last checkpoint survives


def test_resume_two_rank_checkpoint_on_one_or_two_ranks(cfg_file: Path, tmp_path: Path) -> None:
    """The checkpoint holds the whole run: the next round is the same on 1 rank as on 2."""
    base = ["--config", str(cfg_file), "--envs", "4", "--backends", "none", "--device", "cpu"]
    first = Forked("esper.train", [*base, "--rounds", "1", "--save", str(tmp_path / "r1.pt")], 2, tmp_path / "a")
    assert first.wait(50) == [0, 0], first.err(0) + first.err(1)
    more = [*base, "--rounds", "2", "--resume", str(tmp_path / "r1.pt")]
    assert train.main([*more, "--save", str(tmp_path / "one.pt")]) == 0
    second = Forked("esper.train", [*more, "--save", str(tmp_path / "two.pt")], 2, tmp_path / "b")
    assert second.wait(50) == [0, 0], second.err(0) + second.err(1)
    one, two = load_checkpoint(tmp_path / "one.pt"), load_checkpoint(tmp_path / "two.pt")
    assert one["round"] == two["round"] == 2
    _params_close(one["modules"], two["modules"])
    _params_close(one["optimizer"]["state"][0], two["optimizer"]["state"][0])
    assert torch.equal(one["env_episode"], two["env_episode"])
    assert one["history"][-1]["op_freq"] == two["history"][-1]["op_freq"]
    assert one["history"][-1]["test_acc"] == two["history"][-1]["test_acc"]


def test_more_ranks_than_envs_is_refused(cfg_file: Path, tmp_path: Path) -> None:
    argv = ["--policy", "static", "--config", str(cfg_file), "--envs", "1", "--backends", "none", "--device", "cpu"]
    run = Forked("esper.train", argv, 2, tmp_path / "logs")
    assert run.wait(30) == [2, 2]
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
