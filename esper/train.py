"""``python -m esper.train``: run a controller over N batched host-training runs."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from esper.simic.cli import add_common_args, build_config, make_hub, telemetry_profile
from esper.simic.config import ConfigError
from esper.simic.env import MorphogeneticEnv
from esper.simic.runner import EpisodeRunner, EpisodeSummary
from esper.tamiyo.policies import POLICIES, make_policy


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m esper.train", description=__doc__)
    p.add_argument("--policy", default="heuristic", help=f"one of {sorted(POLICIES)} (name or name=ARG)")
    add_common_args(p)
    return p


def summary_table(summaries: list[EpisodeSummary], title: str) -> Table:
    table = Table(title=title)
    for col in ("env", "ep", "final acc", "params+", "fossil", "culled", "reward", "trajectory"):
        table.add_column(col, overflow="fold")
    for s in summaries:
        table.add_row(str(s.env), str(s.episode), f"{s.final_val_acc:.2f}", f"{s.params_added:.0f}",
                      str(s.fossilized), str(s.culled), f"{s.total_reward:.3f}", s.trajectory)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=200)
    try:
        cfg = build_config(args)
        profile = telemetry_profile(cfg)
    except (ConfigError, ValueError) as err:
        console.print(f"[red]configuration error:[/red] {err}")
        return 2
    env = MorphogeneticEnv(cfg)
    try:
        policy = make_policy(args.policy, env, cfg, seed=cfg.episode.seed)
    except ValueError as err:
        console.print(f"[red]{err}[/red]")
        return 2
    total = cfg.episode.episodes * cfg.episode.length
    start = time.perf_counter()
    with make_hub(cfg) as hub, Progress(
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
    acc = np.array([s.final_val_acc for s in summaries])
    console.print(f"final val acc {acc.mean():.2f} ± {acc.std():.2f} over {acc.size} episodes; "
                  f"{runner.syncs} host transfers for {runner.syncs} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
