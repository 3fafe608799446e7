"""Capacity gap on the embedded tasks: static hosts of several sizes, same epochs.

Growth only has room to help if a small host falls well short of a larger one. Run:
``python bench/capacity.py --hosts shallow,impaired,baseline --envs 4 --epochs 30 --task-seed 1``
(the README's setting: the evaluation task, 2048 training images, batch 64, cosine host lr over
the run). Reported: test accuracy after the last epoch (the held-out split), beside validation.

``--preset lm`` measures the language-model hosts on the embedded grammar corpus instead, with
that preset's task, optimizer and batch (test perplexity and next-token accuracy), e.g.
``python bench/capacity.py --preset lm --hosts lm_small,lm_base,lm_large --epochs 15 --task-seed 1``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tensordict import TensorDict

from esper.kasmina.epoch import KasminaConfig, MorphogeneticBatch
from esper.kasmina.hosts import host_spec
from esper.simic.config import TrainingConfig
from esper.simic.env import kasmina_config, load_config_task
from esper.tasks import load_task


def run(host: str, envs: int, epochs: int, task_seed: int, seed: int, device: str, train_size: int,
        batch_size: int) -> dict[str, float]:
    task = load_task("synthetic", seed=task_seed, device=device, train_size=train_size, val_size=512)
    cfg = KasminaConfig(host=host, blueprints=("noop",), batch_size=batch_size, lr_horizon=epochs)
    batch = MorphogeneticBatch(task, envs, cfg, base_seed=seed)
    wait = TensorDict({k: torch.zeros(envs, dtype=torch.long, device=device) for k in ("op", "slot", "blueprint", "tempo")},
                      batch_size=[envs])
    start = time.perf_counter()
    for epoch in range(epochs):
        signals = batch.run_epoch(wait, test=epoch == epochs - 1)
    acc = signals["val_acc"].cpu()
    test = signals["test_acc"].cpu()
    c, _, _ = task.image_shape
    return {
        "host": host,
        "params": host_spec(host).param_count(c, task.num_classes),
        "test_acc_mean": float(test.mean()),
        "test_acc_std": float(test.std()) if envs > 1 else 0.0,
        "val_acc_mean": float(acc.mean()),
        "val_acc_std": float(acc.std()) if envs > 1 else 0.0,
        "seconds": time.perf_counter() - start,
    }


def run_preset(preset: str, host: str, envs: int, epochs: int, task_seed: int, seed: int,
               device: str, optimizer: str | None = None, lr: float | None = None) -> dict[str, float]:
    """One static host on a preset's task and training settings (its host, and optionally its
    optimizer and learning rate, swapped)."""
    cfg = TrainingConfig.preset(preset)
    kasmina: dict[str, object] = {"host": host, "blueprints": ["noop"]}
    if optimizer:
        kasmina["optimizer"] = optimizer
    if lr:
        kasmina["host_lr"] = lr
    cfg = cfg.updated(task={"seed": task_seed}, kasmina=kasmina, episode={"length": epochs})
    task = load_config_task(cfg, device)
    batch = MorphogeneticBatch(task, envs, kasmina_config(cfg), base_seed=seed)
    wait = TensorDict({k: torch.zeros(envs, dtype=torch.long, device=device) for k in ("op", "slot", "blueprint", "tempo")},
                      batch_size=[envs])
    start = time.perf_counter()
    for epoch in range(epochs):
        signals = batch.run_epoch(wait, test=epoch == epochs - 1)
    ppl = signals["test_loss"].cpu().exp()
    test = signals["test_acc"].cpu()
    return {
        "host": host,
        "optimizer": cfg.kasmina.optimizer,
        "lr": cfg.kasmina.host_lr,
        "params": int(batch.host_params),
        "test_ppl_mean": float(ppl.mean()),
        "test_ppl_std": float(ppl.std()) if envs > 1 else 0.0,
        "test_acc_mean": float(test.mean()),
        "test_acc_std": float(test.std()) if envs > 1 else 0.0,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", default="shallow,impaired,baseline")
    parser.add_argument("--envs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--task-seed", type=int, default=1, help="synthetic data seed")
    parser.add_argument("--seed", type=int, default=7, help="host seed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--preset", help="measure on this training preset's task and settings (e.g. lm)")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], help="with --preset: replace its optimizer")
    parser.add_argument("--lr", type=float, help="with --preset: replace its host learning rate")
    args = parser.parse_args()
    if args.preset:
        rows = [run_preset(args.preset, h, args.envs, args.epochs, args.task_seed, args.seed, args.device,
                           args.optimizer, args.lr) for h in args.hosts.split(",")]
        for r in rows:
            print(f"{r['host']:>10}  {r['optimizer']} lr {r['lr']:g}  params {r['params']:>7}  test ppl {r['test_ppl_mean']:.3f} ± {r['test_ppl_std']:.3f}  "
                  f"test next-token acc {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}  ({r['seconds']:.0f} s)")
        print(json.dumps(rows))
        return
    rows = [run(h, args.envs, args.epochs, args.task_seed, args.seed, args.device, args.train_size,
                args.batch_size) for h in args.hosts.split(",")]
    for r in rows:
        print(f"{r['host']:>10}  params {r['params']:>7}  test acc {r['test_acc_mean']:.1f} ± {r['test_acc_std']:.1f}  "
              f"val acc {r['val_acc_mean']:.1f} ± {r['val_acc_std']:.1f}  ({r['seconds']:.0f} s)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
