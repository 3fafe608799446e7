"""What ``python -m esper.train`` says and where it writes: the run directory rule, the
``runs/latest`` link, the summary table, a failed checkpoint write, and the run's last words."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from esper.leyline import EventKind
from esper.leyline.events import AnomalyEvent
from esper.nissa import NissaHub
from esper.nissa.anomaly import PPO_SCOPE
from esper.simic.cli import build_config
from esper.simic.config import TrainingConfig
from esper.simic.distributed import launched
from esper.simic.episodes import EpisodeSummary
from esper.simic.errors import ConfigError
from esper.simic.offline import METHODS as OFFLINE_METHODS

RUNS_ENV = "ESPER_RUNS"  # where fresh run directories go (default ./runs)

# What each field of a PPO round line means (printed in the run's header and in --help).
ROUND_LEGEND = """\
round line fields:
  return       mean episode reward      test / val  accuracy % at the episode's end (held-out test split / validation)
  fossil       seeds kept per env       params+     parameters added per env
  ops[...]     share of each action (wait, germinate, advance, cull, fossilize)
  ok=          share of actions the env accepted (the rest were refused: no free slot, a gate said no)
  kl, clip     how far the update moved the policy
  H[...]       entropy of each action head (near 0: it always picks the same)
  EV           explained variance of the critic (1: it predicts returns; 0 or below: nothing yet)
  Vvar         variance of the critic's value estimates (near 0: it outputs a constant)
  |g|          actor and critic gradient norms      lr  learning rate
  Hx           scale of the entropy bonus (decays over the rounds)
  passes       PPO passes over the round's data (fewer: stopped at the target KL)
held-out line (before round 1 and after every round; --heldout 0 turns it off):
  the greedy controller and the heuristic on the same held-out hosts, which training never
  uses, test split; diff is controller minus heuristic, paired host by host, ± its standard error"""
EPILOG = f"""\
Where results go: each run writes into its own new directory, runs/<policy>-<date>-<time>
(runs/latest points at the newest; ${RUNS_ENV} moves runs/), unless --run-dir or the config
names one; --resume CKPT goes on in CKPT's directory. A PPO run refuses to overwrite a checkpoint there (--resume or --force). The run
writes console and JSONL telemetry (--backends changes that) and ends by naming the directory
and the commands that read it (python -m esper.report DIR, python -m esper.evaluate ...).

{ROUND_LEGEND}
"""


def where_telemetry(cfg: TrainingConfig) -> str:
    """Where this run's telemetry goes, in words."""
    names = [b.strip().lower() for b in cfg.telemetry.backends]
    files = [f for b, f in (("jsonl", "telemetry.jsonl"), ("tensorboard", "tensorboard/")) if b in names]
    if not files:
        return "no telemetry files (--backends console,jsonl writes them)"
    return "telemetry to " + ", ".join(str(Path(cfg.run_dir) / f) for f in files)


def follow_hint(console: Console, cfg: TrainingConfig) -> None:
    """How to watch the run from another terminal while it trains (it needs JSONL telemetry)."""
    if "jsonl" in [b.strip().lower() for b in cfg.telemetry.backends]:
        console.print(f"follow it from another terminal: python -m esper.report {cfg.run_dir} --live",
                      highlight=False, markup=False)


def where_next(console: Console, cfg: TrainingConfig, save: Path | None) -> None:
    """The run's last words: where everything is and the commands that read it."""
    run_dir = Path(cfg.run_dir)
    names = [b.strip().lower() for b in cfg.telemetry.backends]
    files = [p for p in (save, run_dir / "telemetry.jsonl", run_dir / "report.html") if p is not None and p.exists()]
    console.print(f"results in {run_dir}: " + (", ".join(str(p) for p in files) or "nothing written"),
                  highlight=False)
    console.print("next:", highlight=False)
    if "jsonl" in names:
        console.print(f"  python -m esper.report {run_dir}   # an HTML report with plots of this run",
                      highlight=False, markup=False)
    held_out = cfg.task.seed + 1
    if save is not None:
        console.print(f"  python -m esper.evaluate --policies static,heuristic,ppo={save} --task-seed {held_out}"
                      "   # the controller against the baselines on a task it never saw", highlight=False,
                      markup=False)
    else:
        console.print(f"  python -m esper.evaluate --policies static,heuristic --task-seed {held_out}"
                      "   # controllers side by side on identical hosts", highlight=False, markup=False)


def failed_save(hub: NissaHub, save: Path, round_: int, err: OSError, last: tuple[Path, int] | None) -> None:
    """A checkpoint write failed (the atomic write left the previous file): say so on stderr
    and in telemetry; the run goes on and the next round tries again."""
    kept = f"last checkpoint {last[0]} at round {last[1]} kept" if last else "no checkpoint yet"
    message = f"checkpoint {save} not written at round {round_} ({err.strerror or err}); {kept}"
    print(f"warning: {message}", file=sys.stderr)
    hub.emit(AnomalyEvent(kind=EventKind.ANOMALY, epoch=round_, detector="checkpoint", severity="severe",
                          message=message, payload={"scope": PPO_SCOPE, "path": str(save), "error": str(err)}))


def summary_table(summaries: list[EpisodeSummary], title: str) -> Table:
    table = Table(title=title)
    for col in ("env", "ep", "test acc", "val acc", "params+", "fossil", "culled", "reward", "trajectory"):
        table.add_column(col, overflow="fold")
    for s in summaries:
        table.add_row(str(s.env), str(s.episode), f"{s.test_acc:.2f}", f"{s.final_val_acc:.2f}", f"{s.params_added:.0f}",
                      str(s.fossilized), str(s.culled), f"{s.total_reward:.3f}", s.trajectory)
    return table


def fresh_run_dir(policy: str, now: datetime | None = None) -> Path:
    """``runs/<policy>-<date>-<time>`` (``-2``, ``-3``... when taken) under ``$ESPER_RUNS``."""
    root = Path(os.environ.get(RUNS_ENV) or "runs")
    stem = f"{policy.split('=')[0]}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"
    path, i = root / stem, 1
    while path.exists():
        i += 1
        path = root / f"{stem}-{i}"
    return path


def default_outputs(args: argparse.Namespace) -> Path | None:
    """The main command's run directory rule: unless ``--run-dir`` or the config names one, a run
    gets a fresh directory (so the same command can run again; ``--resume CKPT`` goes on in
    CKPT's directory), and unless ``--backends`` or the
    config says otherwise it writes console and JSONL telemetry (so ``esper.report`` can read
    it). Returns the fresh directory, or None. Offline training keeps its own rules; under
    torchrun every rank must agree on the directory, so the config's applies."""
    if args.policy in OFFLINE_METHODS:
        return None
    try:
        user = build_config(args).user_set()
    except (ConfigError, ValueError, OSError):
        return None  # refused by the run's own checks, in their words
    if args.backends is None and "backends" not in user.get("telemetry", {}):
        args.backends = "console,jsonl"
    if args.run_dir is None and "run_dir" not in user and getattr(args, "resume", None) is not None:
        args.run_dir = str(args.resume.parent)  # a resumed run goes on where it was (telemetry appended)
        return None
    if args.run_dir is None and "run_dir" not in user and not launched():
        args.run_dir = str(fresh_run_dir(args.policy))
        return Path(args.run_dir)
    return None


def link_latest(run_dir: Path | None) -> None:
    """Point ``runs/latest`` at the newest fresh run, once its checks passed (a real directory
    of that name, from an older layout, is left alone)."""
    if run_dir is None:
        return
    latest = run_dir.parent / "latest"
    if latest.exists() and not latest.is_symlink():
        return
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, latest)
    except OSError:
        tmp.unlink(missing_ok=True)
