"""How far K torchrun ranks of PPO are from one process, round by round.

``python bench/ranks_equivalence.py --rounds 12 --ranks 2 --envs 4``

Trains the same run (the tests' tiny PPO config) once in one process and once on K gloo ranks
(``torchrun``, CPU), then compares the checkpoints: the largest difference of any policy
parameter, and per round whether the op frequencies and test accuracies are identical and how
far KL and explained variance are apart. The ranks' update is the one-process update up to float
rounding: DDP all-reduces per-rank partial gradients, summed in another order than one process's
mean over the same steps.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

TINY_PPO = {
    "task": {"train_size": 256, "val_size": 128},
    "kasmina": {"batch_size": 64, "blueprints": ["norm", "conv_small"], "gates": {"min_training_epochs": 1}},
    "episode": {"length": 3, "envs": 2},
    "ppo": {"minibatch_envs": 2, "epochs": 2, "hidden_size": 16, "lstm_hidden_size": 16},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--envs", type=int, default=4)
    args = ap.parse_args(argv)
    from esper.simic.checkpoint import load_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="ranks_eq_"))
    cfg = tmp / "config.json"
    cfg.write_text(json.dumps(TINY_PPO))
    base = ["--config", str(cfg), "--envs", str(args.envs), "--rounds", str(args.rounds), "--backends", "none",
            "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "esper.train", *base, "--save", str(tmp / "one.pt")], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    torchrun = Path(sys.executable).with_name("torchrun")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    subprocess.run([str(torchrun), "--nproc_per_node", str(args.ranks), "--master_port", port, "-m", "esper.train",
                    *base, "--save", str(tmp / "many.pt")], env=env, check=True, stdout=subprocess.DEVNULL)
    one, many = load_checkpoint(tmp / "one.pt"), load_checkpoint(tmp / "many.pt")
    floats = [k for k, v in one["modules"].items() if v.is_floating_point()]
    worst = max(float((one["modules"][k] - many["modules"][k]).abs().max()) for k in floats)
    print(f"{args.rounds} rounds, {args.envs} envs, 1 process vs {args.ranks} ranks: "
          f"largest policy parameter difference {worst:.2g}")
    for a, b in zip(one["history"], many["history"], strict=True):
        print(f"round {a['round']:3d}: op_freq identical {a['op_freq'] == b['op_freq']}, "
              f"test_acc identical {a['test_acc'] == b['test_acc']}, |dKL| {abs(a['kl'] - b['kl']):.1g}, "
              f"|dEV| {abs(a['explained_variance'] - b['explained_variance']):.1g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
