"""``python -m esper.train``: train the LSTM-PPO controller (default), or run any other
controller over N batched host-training runs (``--policy heuristic`` etc.)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from esper.simic.checkpoint import CheckpointError, load_checkpoint
from esper.simic.cli import add_common_args, build_config, make_hub, maybe_trace, telemetry_profile
from esper.simic.config import ConfigError
from esper.simic.env import MorphogeneticEnv
from esper.simic.offline import METHODS as OFFLINE_METHODS
from esper.simic.offline import train_offline
from esper.simic.ppo import PPOTrainer, RoundStats
from esper.simic.runner import EpisodeRunner, EpisodeSummary
from esper.tamiyo.policies import POLICIES, make_policy


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m esper.train", description=__doc__)
    p.add_argument("--policy", default="ppo",
                   help=f"'ppo' trains the LSTM policy; or run one of {sorted(POLICIES)} (name or name=ARG)")
    p.add_argument("--rounds", type=int, help="PPO rounds (one episode of every env each)")
    p.add_argument("--save", type=Path, help="PPO checkpoint written after every round (default RUN_DIR/ppo.pt)")
    p.add_argument("--resume", type=Path, help="continue the PPO run stored in this checkpoint")
    p.add_argument("--init", type=Path, help="start PPO from this checkpoint's actor/critic and obs_norm "
                                             "(e.g. one from --policy bc|iql); fresh optimizer, round 0")
    p.add_argument("--data", type=Path, help="episode pack (esper.generate) for --policy bc or iql")
    p.add_argument("--offline-epochs", type=int, help="passes over the pack for --policy bc|iql")
    add_common_args(p)
    # The preset follows the policy unless given: PPO trains on the `ppo` preset, any other
    # controller runs the `default` one. The header line names the preset that ran.
    p.set_defaults(preset=None)
    return p


def train_ppo(args: argparse.Namespace, console: Console) -> int:
    """Train with :class:`PPOTrainer`, one progress line per round, checkpoint every round."""
    try:
        cfg = build_config(args)
        if args.rounds is not None:
            cfg = cfg.updated(ppo={"rounds": args.rounds})
        cfg.check_for("ppo")
        profile = telemetry_profile(cfg)
    except (ConfigError, ValueError) as err:
        console.print(f"[red]configuration error:[/red] {err}")
        return 2
    save = args.save or Path(cfg.run_dir) / "ppo.pt"
    if args.init is not None:  # checked before any work
        why = "--init starts a new run; --resume continues one" if args.resume is not None else None
        try:
            load_checkpoint(args.init)
        except CheckpointError as err:
            why = str(err)
        if why is not None:
            print(f"error: {why} (--init); a checkpoint written by esper.train (ppo, bc or iql)", file=sys.stderr)
            return 2
    start = time.perf_counter()
    with make_hub(cfg) as hub, maybe_trace(args.trace, f"ppo-{cfg.telemetry.profile}"):
        trainer = PPOTrainer(cfg, hub=hub, profile=profile)
        if args.init is not None:
            try:
                trainer.init(args.init)
            except (CheckpointError, ConfigError) as err:
                print(f"error: cannot start from {args.init}: {err} (--init); a checkpoint of the same "
                      "policy shape (esper.train --policy ppo|bc|iql)", file=sys.stderr)
                return 2
            console.print(f"initialized from {args.init}")
        if args.resume is not None:
            try:
                trainer.resume(args.resume)
            except (CheckpointError, ConfigError) as err:
                console.print(f"[red]cannot resume:[/red] {err}")
                return 2
            console.print(f"resumed {args.resume} at round {trainer.round}")
        console.print(f"PPO (preset {args.preset}): {cfg.episode.envs} envs x {cfg.episode.length} epochs "
                      f"per round, {cfg.ppo.rounds} rounds, task seed {cfg.task.seed}, host seed "
                      f"{cfg.episode.seed}, telemetry {profile.name}, compile={cfg.compile}, device={cfg.device}")

        def on_round(stats: RoundStats) -> None:
            console.print(f"{time.perf_counter() - start:7.1f}s {stats.line()}", highlight=False, markup=False)

        trainer.train(cfg.ppo.rounds, on_round=on_round, save=save)
    pipe = trainer.base_env.pipeline
    console.print(f"done: {trainer.round} rounds in {time.perf_counter() - start:.1f}s; checkpoint {save}; "
                  f"{pipe.transfers} host transfers for {pipe.epochs} epochs")
    return 0


def summary_table(summaries: list[EpisodeSummary], title: str) -> Table:
    table = Table(title=title)
    for col in ("env", "ep", "test acc", "val acc", "params+", "fossil", "culled", "reward", "trajectory"):
        table.add_column(col, overflow="fold")
    for s in summaries:
        table.add_row(str(s.env), str(s.episode), f"{s.test_acc:.2f}", f"{s.final_val_acc:.2f}", f"{s.params_added:.0f}",
                      str(s.fossilized), str(s.culled), f"{s.total_reward:.3f}", s.trajectory)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=200)
    if args.preset is None:
        args.preset = "ppo" if args.policy == "ppo" else "default"
    if args.policy == "ppo":
        return train_ppo(args, console)
    if args.policy in OFFLINE_METHODS:
        return train_offline(args, console)
    try:
        cfg = build_config(args)
        profile = telemetry_profile(cfg)
    except (ConfigError, ValueError) as err:
        console.print(f"[red]configuration error:[/red] {err}")
        return 2
    env = MorphogeneticEnv(cfg, profile=profile)
    try:
        policy = make_policy(args.policy, env, cfg, seed=cfg.episode.seed)
    except ValueError as err:
        console.print(f"[red]{err}[/red]")
        return 2
    total = cfg.episode.episodes * cfg.episode.length
    start = time.perf_counter()
    with make_hub(cfg) as hub, maybe_trace(args.trace, f"{args.policy}-{cfg.telemetry.profile}"), Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console, transient=False,
    ) as progress:
        task = progress.add_task(f"{args.policy} x{env.n}", total=total, status="")

        def on_epoch(step: int, snap: dict[str, np.ndarray]) -> None:
            acc = snap["signals.val_acc"]
            live = snap["tracker.seeds_fossilized"].sum()
            progress.update(task, completed=step,
                            status=f"val acc {acc.mean():.2f}±{acc.std():.2f}  fossilized {live}")

        runner = EpisodeRunner(env, policy, hub=hub, profile=profile, on_epoch=on_epoch)
        summaries = runner.run(cfg.episode.episodes)
    elapsed = time.perf_counter() - start
    console.print(summary_table(summaries, f"{args.policy}: {len(summaries)} episodes in {elapsed:.1f}s"))
    test = np.array([s.test_acc for s in summaries])
    val = np.array([s.final_val_acc for s in summaries])
    console.print(f"test acc {test.mean():.2f} ± {test.std():.2f} (val {val.mean():.2f} ± {val.std():.2f}) "
                  f"over {test.size} episodes; {runner.transfers} host transfers for {runner.epochs} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
