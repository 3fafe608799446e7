"""``python -m esper.evaluate``: compare controllers on identical hosts, side by side.

Scores are test accuracy (the held-out split no controller, gate or reward reads), beside the
final validation accuracy the controllers decided from; on language-model tasks also test
perplexity, and accuracy is next-token accuracy. Use ``--task-seed`` for data no
threshold was tuned on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from esper.atomic import atomic_write
from esper.nissa import TelemetryConfig
from esper.progress import RunProgress
from esper.report.compare import check_plot_target, write_comparison
from esper.simic.checkpoint import (  # registers ppo=PATH, ppo_sample=PATH
    checkpoint_for,
    load_checkpoint,
)
from esper.simic.cli import add_common_args, maybe_trace, run_hub
from esper.simic.config import TrainingConfig
from esper.simic.distributed import Ranks, main_rank
from esper.simic.env import load_config_task
from esper.simic.errors import Interrupted, UsageError
from esper.simic.launch import add_dist_args, for_rank, joined, trace_dir
from esper.simic.preflight import (
    StopSignals,
    add_debug_arg,
    check_config,
    check_file_target,
    parse_policies,
    run_cli,
)
from esper.simic.runner import EpisodeRunner, EpisodeSummary
from esper.simic.sharding import run_env
from esper.tamiyo.policies import POLICIES, make_policy


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m esper.evaluate", description=__doc__)
    p.add_argument("--policies", default="static,random,fixed,heuristic",
                   help=f"comma-separated specs from {sorted(POLICIES)} (name or name=ARG)")
    p.add_argument("--json", type=Path, help="write the results table here (atomically)")
    p.add_argument("--plot", type=Path, help="draw the comparison here (.png/.svg/.pdf): per-env points and "
                                             "means of test accuracy and parameters added")
    add_common_args(p)
    add_dist_args(p)
    add_debug_arg(p)
    # No preset and no config: a listed learned controller brings the setting it was trained
    # on (its checkpoint's config); otherwise the `default` preset.
    p.set_defaults(preset=None)
    return p


# What a checkpoint's config contributes as the evaluation setting: the task, hosts, episode
# length and controller settings; not its run (env count, seeds, telemetry, device, paths).
_SETTING_SECTIONS = ("task", "kasmina", "reward", "heuristic", "fixed", "ppo", "features", "history_length")


def trained_setting(policies: list[tuple[str, str | None]]) -> tuple[dict[str, Any], str] | None:
    """The training setting of the first learned controller listed, and its checkpoint path."""
    for name, arg in policies:
        if name in ("ppo", "ppo_sample"):
            path = checkpoint_for(arg, name)
            saved = load_checkpoint(path)["config"]
            setting = {k: saved[k] for k in _SETTING_SECTIONS if k in saved}
            setting["episode"] = {"length": saved["episode"]["length"]}
            setting["task"] = {k: v for k, v in setting["task"].items() if k != "seed"}
            return setting, path
    return None


def observed_by(spec: str, cfg: Any) -> Any:
    """``cfg`` with the observation a listed learned controller was trained on
    (``features.observe``): its inputs are part of the policy, whatever else is evaluated."""
    name, _, arg = spec.partition("=")
    if name not in ("ppo", "ppo_sample"):
        return cfg
    saved = load_checkpoint(checkpoint_for(arg or None, name))["config"].get("features", {})
    observe = saved.get("observe", "minimal")
    if observe == cfg.features.observe:
        return cfg
    return cfg.updated(features={"observe": observe})


def aggregate(summaries: list[EpisodeSummary], seconds: float) -> dict[str, Any]:
    """Means and spreads over the valid episodes (governed ones, rolled back by the governor,
    are counted but never averaged in)."""
    governed = sum(1 for s in summaries if s.governed)
    summaries = [s for s in summaries if not s.governed]

    def stat(values: list[float]) -> dict[str, float]:
        a = np.asarray(values, dtype=np.float64)
        return {"mean": float(a.mean()), "std": float(a.std())}

    return {
        "episodes": len(summaries),
        "governed_episodes": governed,
        "test_acc": stat([s.test_acc for s in summaries]),
        "test_loss": stat([s.test_loss for s in summaries]),
        # Each host's perplexity exp(mean token loss), then the mean over hosts.
        "test_perplexity": stat([float(np.exp(s.test_loss)) for s in summaries]),
        "final_val_acc": stat([s.final_val_acc for s in summaries]),
        "params_added": stat([s.params_added for s in summaries]),
        "fossilized": stat([s.fossilized for s in summaries]),
        "culled": stat([s.culled for s in summaries]),
        "reward": stat([s.total_reward for s in summaries]),
        "seconds": seconds,
        "trajectories": [s.trajectory for s in summaries],
        "per_env": {"env": [s.env for s in summaries], "episode": [s.episode for s in summaries],
                    **{k: [getattr(s, k) for s in summaries]
                       for k in ("test_acc", "test_loss", "final_val_acc", "params_added", "fossilized",
                                 "culled")}},
    }


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_write(path, lambda f: json.dump(data, f, indent=2), binary=False)


def results_table(results: dict[str, dict[str, Any]], sequences: bool = False) -> Table:
    """The side-by-side table; ``sequences`` (a language-model task) adds test perplexity, and
    accuracy is then next-token accuracy."""
    what = "test perplexity and next-token accuracy" if sequences else "test accuracy"
    table = Table(title=f"policies on identical hosts ({what} on the held-out split)")
    cols = ("policy", *(("test ppl",) if sequences else ()), "test acc", "final val acc", "params added",
            "fossilized", "culled", "reward", "s")
    for col in cols:
        table.add_column(col, justify="right" if col != "policy" else "left")
    for name, r in results.items():
        def ms(key: str, fmt: str = ".2f", r: dict[str, Any] = r) -> str:
            return f"{r[key]['mean']:{fmt}} ± {r[key]['std']:{fmt}}"

        table.add_row(name, *((ms("test_perplexity", ".3f"),) if sequences else ()), ms("test_acc"),
                      ms("final_val_acc"), ms("params_added", ".0f"), ms("fossilized"), ms("culled"),
                      ms("reward", ".3f"), f"{r['seconds']:.0f}")
    return table


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet = not main_rank()  # under torchrun, rank 0 speaks
    console = Console(quiet=quiet) if sys.stdout.isatty() else Console(width=200, quiet=quiet)
    parsed = parse_policies(args.policies)
    trained_on = None
    if args.preset is None and args.config is None:
        found = trained_setting(parsed)
        if found is not None:
            args.base_config, trained_on = found
    cfg, profile = check_config(args, [name for name, _ in parsed])
    if trained_on is not None:
        console.print(f"setting: the one {trained_on} was trained on (its checkpoint's config); "
                      f"task seed {cfg.task.seed}, host seed {cfg.episode.seed}")
        saved_seed = load_checkpoint(trained_on)["config"]["task"]["seed"]
        if cfg.task.seed == saved_seed:
            console.print(f"[yellow]note:[/yellow] task seed {saved_seed} is the task that controller "
                          f"was trained on: pass --task-seed N for a held-out score")
    check_file_target(args.json, "--json")
    check_file_target(args.plot, "--plot")
    check_plot_target(args.plot)
    with joined(args, cfg) as ranks:
        return evaluate(args, argv, cfg, profile, console, ranks)


def evaluate(args: argparse.Namespace, argv: list[str] | None, cfg: TrainingConfig, profile: TelemetryConfig,
             console: Console, ranks: Ranks) -> int:
    """Every listed policy over this rank's envs; rank 0 prints and writes the results of all envs."""
    specs = [s.strip() for s in args.policies.split(",")]
    task = load_config_task(cfg, ranks.device)
    # Every policy is built (checkpoints matched to the env) before any of them runs; a fresh
    # env per policy with the same seeds: every policy sees identical hosts.
    runs = []
    for spec in specs:
        env = run_env(observed_by(spec, cfg), ranks, task=task)
        try:
            runs.append((spec, env, make_policy(spec, env, cfg, seed=cfg.episode.seed)))
        except ValueError as err:
            raise UsageError(str(err), "--policies", "a policy that can be built for this env") from None
    results: dict[str, dict[str, Any]] = {}
    sequences = cfg.task.family == "lm"
    try:
        with StopSignals() as stop, run_hub(for_rank(cfg, ranks)) as hub, \
                maybe_trace(trace_dir(args, ranks), f"evaluate-{cfg.telemetry.profile}"), \
                RunProgress(console, enabled=ranks.main) as progress:
            ranks.stop = stop  # a signal on any rank stops every rank after the same epoch
            for i, (spec, env, policy) in enumerate(runs):
                start = time.perf_counter()
                progress.phase(f"evaluating {spec} ({i + 1}/{len(runs)})", total=cfg.episode.episodes
                               * cfg.episode.length, unit="epoch", per_unit=cfg.episode.envs)

                def on_epoch(k: int, _snap: object) -> None:
                    progress.advance(k)
                    stop.check()

                runner = EpisodeRunner(env, policy, hub=hub, profile=profile, on_epoch=on_epoch)
                summaries = runner.run(cfg.episode.episodes)
                results[spec] = aggregate(summaries, time.perf_counter() - start)
                r = results[spec]
                ppl = (f"test ppl {r['test_perplexity']['mean']:.3f} ± {r['test_perplexity']['std']:.3f}, "
                       if sequences else "")
                console.print(f"{spec}: {ppl}test acc {r['test_acc']['mean']:.2f} ± {r['test_acc']['std']:.2f} "
                              f"(val {r['final_val_acc']['mean']:.2f}) in {r['seconds']:.0f}s"
                              + (f"; {r['governed_episodes']} governed episodes excluded"
                                 if r["governed_episodes"] else ""))
    except Interrupted as err:
        print(f"interrupted; {len(results)} of {len(specs)} policies evaluated, no results written",
              file=sys.stderr)
        return err.exit_code
    console.print(results_table(results, sequences))
    if args.json and ranks.main:
        write_json_atomic(args.json, {
            "task_seed": cfg.task.seed,
            "host_seed": cfg.episode.seed,
            "command": "python -m esper.evaluate " + " ".join(sys.argv[1:] if argv is None else argv),
            "config": cfg.model_dump(mode="json"),
            "results": results,
        })
        console.print(f"results {args.json}")
    if args.plot and ranks.main:
        write_comparison(args.plot, results, f"task seed {cfg.task.seed}, host seed {cfg.episode.seed}: "
                                             f"each point one host run's test episode")
        console.print(f"plot {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
