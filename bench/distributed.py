"""Scale-out study: one run on 1 and on K torchrun ranks (gloo on the CPU, NCCL on CUDA).

``python bench/distributed.py --ranks 1,2 --envs 8 --out bench/results/distributed_cpu.json``

For each rank count K, with ``cores // K`` threads per rank (so every K uses the same cores):

* ``torchrun --nproc_per_node K -m esper.evaluate --policies heuristic``: the run's own seconds
  from its JSON (startup excluded), as env-epochs/s;
* ``torchrun --nproc_per_node K -m esper.train --rounds R``: rank 0's collect and update seconds
  of the last round, from its checkpoint's history (round 1 includes warm-up).

Every run also checks that the per-env results equal the 1-rank run's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TINY_PPO = {"ppo": {"hidden_size": 32, "lstm_hidden_size": 32, "minibatch_envs": 4, "epochs": 2}}


def torchrun(ranks: int, module: str, args: list[str], threads: int, device: str) -> float:
    """Run ``module`` on ``ranks`` ranks; the wall seconds of the whole command."""
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(ranks),
           "--master_port", str(29500 + os.getpid() % 1000), "-m", module, *args, "--device", device,
           "--backends", "none"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - start


def measure(ranks: int, a: argparse.Namespace, tmp: Path) -> dict:
    threads = max(1, (os.cpu_count() or 1) // ranks) if a.threads is None else a.threads
    common = ["--envs", str(a.envs), "--episode-length", str(a.length), "--task-seed", "1", "--seed", "7"]
    out = tmp / f"eval{ranks}.json"
    wall = torchrun(ranks, "esper.evaluate", ["--policies", "heuristic", *common, "--json", str(out)], threads,
                    a.device)
    res = json.loads(out.read_text())["results"]["heuristic"]
    cfg = tmp / "ppo.json"
    cfg.write_text(json.dumps(TINY_PPO))
    ckpt = tmp / f"ppo{ranks}.pt"
    ppo_wall = torchrun(ranks, "esper.train", ["--config", str(cfg), "--rounds", str(a.rounds), *common,
                                               "--save", str(ckpt)], threads, a.device)
    last = torch.load(ckpt, weights_only=True)["history"][-1]
    return {
        "ranks": ranks, "threads_per_rank": threads,
        "evaluate_run_s": res["seconds"], "evaluate_wall_s": wall,
        "env_epochs_per_s": a.envs * a.length / res["seconds"],
        "per_env_test_acc": res["per_env"]["test_acc"],
        "ppo_wall_s": ppo_wall, "ppo_collect_s": last["collect_s"], "ppo_update_s": last["update_s"],
        "ppo_env_epochs_per_s": last["env_epochs_per_s"], "ppo_test_acc": last["test_acc"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    p.add_argument("--envs", type=int, default=8)
    p.add_argument("--length", type=int, default=10, help="epochs per episode")
    p.add_argument("--rounds", type=int, default=2, help="PPO rounds (the last one is reported)")
    p.add_argument("--threads", type=int, help="threads per rank (default: cores // ranks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(int(k), a, Path(tmp)) for k in a.ranks.split(",")]
    for r in rows:
        same = r["per_env_test_acc"] == rows[0]["per_env_test_acc"]
        print(f"{r['ranks']} rank(s) x {r['threads_per_rank']} threads: evaluate {r['env_epochs_per_s']:.1f} "
              f"env-epochs/s ({r['evaluate_run_s']:.1f}s run, {r['evaluate_wall_s']:.1f}s wall); PPO round "
              f"collect {r['ppo_collect_s']:.1f}s update {r['ppo_update_s']:.2f}s; per-env results "
              f"{'identical' if same else 'DIFFER'}")
    if a.out:
        a.out.write_text(json.dumps({"when": datetime.datetime.now().isoformat(timespec="seconds"),
                                     "machine": platform.platform(), "cpus": os.cpu_count(),
                                     "torch": torch.__version__, "args": vars(a) | {"out": str(a.out)},
                                     "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
