"""``python -m esper.train``: train the LSTM-PPO controller (default), or run any other
controller over N batched host-training runs (``--policy heuristic`` etc.)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from esper.compile_cache import compile_line, use_stable_cache
from esper.leyline import EventKind
from esper.leyline.events import AnomalyEvent
from esper.nissa import NissaHub, TelemetryConfig
from esper.nissa.anomaly import PPO_SCOPE
from esper.progress import RunProgress
from esper.report.after_run import report_after, report_target
from esper.simic.checkpoint import check_matches, load_checkpoint
from esper.simic.cli import add_common_args, maybe_trace, run_hub
from esper.simic.config import TrainingConfig
from esper.simic.distributed import Ranks, launched, main_rank
from esper.simic.errors import CheckpointError, ConfigError, Interrupted, UsageError
from esper.simic.launch import add_dist_args, agree_stop, for_rank, joined, trace_dir
from esper.simic.mix import MixedTrainer, read_mix
from esper.simic.offline import METHODS as OFFLINE_METHODS
from esper.simic.offline import train_offline
from esper.simic.ppo import PPOTrainer
from esper.simic.preflight import (
    StopSignals,
    add_debug_arg,
    check_config,
    check_fresh_checkpoint,
    check_resume,
    parse_policies,
    refuse_flags,
    run_cli,
)
from esper.simic.runner import EpisodeRunner, EpisodeSummary
from esper.simic.sharding import run_env
from esper.tamiyo.policies import POLICIES, make_policy

PPO_ONLY = ("--rounds", "--resume", "--init", "--force")
WIDTHS = ("hidden_size", "lstm_hidden_size")  # policy-shape fields set by the config alone
# Offline training (bc, iql, cql) runs on the CPU from a pack and emits no telemetry.
OFFLINE_NO_EFFECT = ("--rounds", "--trace", "--report", "--dist-timeout", "--device", "--compile", "--telemetry",
                     "--telemetry-file", "--telemetry-set", "--backends")
# Settings that enter an offline checkpoint's config only through --config/--preset (otherwise
# the pack's own config is used, whole).
OFFLINE_SETTINGS = ("--envs", "--episodes", "--episode-length", "--seed", "--task-seed", "--run-dir")


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
  passes       PPO passes over the round's data (fewer: stopped at the target KL)"""
EPILOG = f"""\
Where results go: each run writes into its own new directory, runs/<policy>-<date>-<time>
(runs/latest points at the newest; ${RUNS_ENV} moves runs/), unless --run-dir or the config
names one; --resume CKPT goes on in CKPT's directory. A PPO run refuses to overwrite a checkpoint there (--resume or --force). The run
writes console and JSONL telemetry (--backends changes that) and ends by naming the directory
and the commands that read it (python -m esper.report DIR, python -m esper.evaluate ...).

{ROUND_LEGEND}
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m esper.train", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="ppo",
                   help=f"'ppo' trains the LSTM policy; or run one of {sorted(POLICIES)} (name or name=ARG)")
    p.add_argument("--rounds", type=int, help="PPO rounds (one episode of every env each)")
    p.add_argument("--save", type=Path, help="PPO checkpoint written after every round (default RUN_DIR/ppo.pt)")
    p.add_argument("--resume", type=Path, help="continue the PPO run stored in this checkpoint")
    p.add_argument("--init", type=Path, help="start PPO from this checkpoint's actor/critic and obs_norm "
                                             "(e.g. one from --policy bc|iql|cql); fresh optimizer, round 0")
    p.add_argument("--data", type=Path, help="episode pack (esper.generate) for --policy bc, iql or cql")
    p.add_argument("--offline-epochs", type=int, help="passes over the pack for --policy bc|iql|cql")
    p.add_argument("--mix", type=Path, help="train one controller over several settings, a round each in turn: "
                                            "a YAML file 'settings: [{preset: NAME, <section>: {...}}, ...]' "
                                            "(esper.simic.mix); --config and the flags apply to every setting")
    p.add_argument("--force", action="store_true", help="let a fresh run (ppo, bc, iql, cql) overwrite an existing checkpoint")
    add_common_args(p)
    add_dist_args(p)
    p.add_argument("--report", action="store_true",
                   help="write RUN_DIR/report.html (python -m esper.report) when the run ends; needs --backends ...jsonl")
    add_debug_arg(p)
    # The preset follows the policy unless given: PPO trains on the `ppo` preset, any other
    # controller runs the `default` one. The header line names the preset that ran.
    p.set_defaults(preset=None)
    return p


def preflight_ppo(args: argparse.Namespace) -> tuple[object, object, Path]:
    """Everything a PPO run needs, checked before any work: config, profile, device, data,
    backends, run dir, trace dir, --init/--resume checkpoints and the save target."""
    refuse_flags(args, ("--data", "--offline-epochs"), "ppo")
    if args.rounds is not None and args.rounds < 1:
        raise UsageError(f"--rounds {args.rounds}", "--rounds", "a positive number of rounds")
    cfg, profile = check_config(args, ["ppo"], trains_ppo=True)
    if args.rounds is not None:
        try:
            cfg = cfg.updated(ppo={"rounds": args.rounds})
        except ConfigError as err:
            raise UsageError(str(err), "--rounds", "a positive number of rounds") from None
    save = args.save or Path(cfg.run_dir) / "ppo.pt"
    if args.init is not None:
        if args.resume is not None:
            raise UsageError("--init starts a new run; --resume continues one", "--init", "give one of them")
        try:
            shape = load_checkpoint(args.init)["policy_shape"]
            # The network widths come from the config: compared now, before an env is built or
            # telemetry written (the env-derived sizes are checked by the trainer).
            check_matches(args.init, "policy shape", {k: shape.get(k) for k in WIDTHS},
                          {k: getattr(cfg.ppo, k) for k in WIDTHS})
        except CheckpointError as err:
            raise UsageError(str(err), "--init", "a checkpoint written by esper.train (ppo, bc, iql or cql) "
                                                 "with this run's ppo.hidden_size and ppo.lstm_hidden_size") from None
    if args.resume is not None:
        check_resume(args.resume, cfg)
    check_fresh_checkpoint(save, args.resume, args.force)
    return cfg, profile, save


def mix_configs(args: argparse.Namespace, rounds: int) -> list[TrainingConfig]:
    """Each setting of ``--mix``: its preset, its overrides, then --config and the flags."""
    if args.resume is not None:
        raise UsageError("--resume of a mixed run", "--mix", "start it again with --init from its checkpoint")
    try:
        settings = read_mix(args.mix)
    except ConfigError as err:
        raise UsageError(str(err), "--mix", "a YAML file 'settings: [{preset: NAME, ...}, ...]'") from None
    cfgs = []
    for setting in settings:
        ns = argparse.Namespace(**vars(args))
        ns.preset = setting["preset"]
        ns.base_config = {k: v for k, v in setting.items() if k != "preset"}
        cfgs.append(check_config(ns, ["ppo"], trains_ppo=True)[0].updated(ppo={"rounds": rounds}))
    widths = [tuple(getattr(c.ppo, k) for k in WIDTHS) for c in cfgs]
    if len(set(widths)) > 1:
        raise UsageError(f"the settings' network widths {WIDTHS} differ: {widths}", "--mix",
                         "one controller: the same ppo.hidden_size and ppo.lstm_hidden_size in every setting")
    return cfgs


def train_ppo(args: argparse.Namespace, console: Console) -> int:
    """Train with :class:`PPOTrainer`, one progress line per round, checkpoint every round.

    SIGINT/SIGTERM stop at the end of the current epoch (the partial round is dropped, the
    last complete checkpoint kept). A diverged policy update is rolled back by the trainer and
    the run goes on. A checkpoint write that fails (disk full) keeps the previous checkpoint and
    is retried next round; if the last round's write fails the run exits 1.
    """
    cfg, profile, save = preflight_ppo(args)
    mix = mix_configs(args, cfg.ppo.rounds) if args.mix is not None else None
    if mix is not None:
        cfg = mix[0]
    link_latest(getattr(args, "fresh_run", None))
    start = time.perf_counter()
    last: tuple[Path, int] | None = None  # the last complete checkpoint and its round
    n, length = cfg.episode.envs, cfg.episode.length
    with joined(args, cfg) as ranks, StopSignals() as stop, run_hub(for_rank(cfg, ranks)) as hub, \
            maybe_trace(trace_dir(args, ranks), f"ppo-{cfg.telemetry.profile}"), \
            RunProgress(console, enabled=ranks.main) as progress:
        ranks.stop = stop  # a signal on any rank stops every rank after the same epoch
        progress.phase("building the envs and the policy")
        if mix is not None:
            if ranks.world > 1:
                raise UsageError("--mix under torchrun", "--mix", "a mixed run as one process")
            trainer: PPOTrainer | MixedTrainer = MixedTrainer(mix, cfg.ppo.rounds, hub=hub, profile=profile)
            trainer.add_epoch_callback(stop.check)
            for i, c in enumerate(mix):
                console.print(f"setting {i}: task {c.task.name} (seed {c.task.seed}), host {c.kasmina.host}, "
                              f"blueprints {list(trainer.trainers[i].base_env.blueprint_names)}, "
                              f"{c.episode.envs} envs x {c.episode.length} epochs")
        else:
            trainer = PPOTrainer(cfg, hub=hub, profile=profile, ranks=ranks)
            trainer.base_env.pipeline.callbacks.append(stop.check)
        if args.init is not None:
            try:
                trainer.init(args.init)
            except (CheckpointError, ConfigError) as err:
                raise UsageError(f"cannot start from {args.init}: {err}", "--init",
                                 "a checkpoint of the same policy shape (esper.train --policy ppo|bc|iql|cql)") from None
            console.print(f"initialized from {args.init}")
        if args.resume is not None:
            try:
                trainer.resume(args.resume)
            except (CheckpointError, ConfigError) as err:
                raise UsageError(f"cannot resume: {err}", "--resume", "a checkpoint of this run's config") from None
            last = (args.resume, trainer.round)
            stop.kept = f"last checkpoint {args.resume} at round {trainer.round}"
            console.print(f"resumed {args.resume} at round {trainer.round}")
        console.print(f"PPO (preset {args.preset}): {n} envs x {length} epochs "
                      f"per round, {cfg.ppo.rounds} rounds, task seed {cfg.task.seed}, host seed "
                      f"{cfg.episode.seed}, telemetry {profile.name}, reward {cfg.reward.mode}, compile={cfg.compile}, device={trainer.device}")
        console.print(f"writing {save} every round and {where_telemetry(cfg)}", highlight=False)
        follow_hint(console, cfg)
        console.print(ROUND_LEGEND, style="dim", highlight=False, markup=False)
        kas = trainer.base_env.kasmina
        first_epoch = trainer.base_env.pipeline.epochs  # of the env that trains this round
        round_s: list[float] = []  # seconds per finished round: the ETA of the rounds after this one

        def on_epoch(epochs: int, snap: dict[str, np.ndarray]) -> None:
            k = epochs - first_epoch
            progress.advance(k, f"val acc {snap['signals.val_acc'].mean():.1f}")
            if k == length:  # the round's episodes are done: the learner updates now
                progress.phase(f"round {trainer.round + 1}/{cfg.ppo.rounds}: PPO update "
                               f"({cfg.ppo.epochs} passes at most)")

        if mix is not None:
            trainer.add_epoch_callback(on_epoch)
        else:
            trainer.base_env.pipeline.callbacks.append(on_epoch)
        try:
            while trainer.round < cfg.ppo.rounds:
                graphs, compiling = kas.compile_graphs, kas.compile_seconds
                setting = trainer.current.cfg if mix is not None else cfg  # a mix: this round's setting
                n, length = setting.episode.envs, setting.episode.length
                first_epoch, t0 = trainer.base_env.pipeline.epochs, time.perf_counter()
                later = cfg.ppo.rounds - trainer.round - 1
                progress.phase(f"round {trainer.round + 1}/{cfg.ppo.rounds}", total=length, unit="epoch",
                               per_unit=n, eta_after=later * float(np.median(round_s)) if round_s else 0.0)
                stats = trainer.train_round()
                round_s.append(time.perf_counter() - t0 - (kas.compile_seconds - compiling))
                tag = f"[{trainer.history[-1]['task']}, mix round {trainer.round}] " if mix is not None else ""
                console.print(f"{time.perf_counter() - start:7.1f}s {tag}{stats.line()}", highlight=False, markup=False)
                if kas.compile_graphs > graphs:  # compile time apart from the round's throughput
                    console.print(" " * 9 + compile_line(kas.compile_graphs - graphs, kas.compile_seconds - compiling,
                                                         trainer.learner.total * cfg.episode.length,
                                                         stats.env_epochs_per_s), highlight=False)
                progress.phase(f"round {trainer.round}/{cfg.ppo.rounds}: saving")
                try:
                    trainer.save(save)
                    last = (save, trainer.round)
                    stop.kept = f"last checkpoint {save} at round {trainer.round}"
                except OSError as err:
                    failed_save(hub, save, trainer.round, err, last)
                agree_stop(ranks, stop)
                stop.check()
        except Interrupted as err:
            hub.flush()
            kept = f"last checkpoint {last[0]} at round {last[1]}" if last else "no checkpoint written"
            print(f"interrupted; {kept}", file=sys.stderr)
            return err.exit_code
    pipe = trainer.base_env.pipeline
    rolled = sum(1 for h in trainer.history if h.get("rolled_back"))
    if last is None or last[1] != trainer.round:
        kept = f"last checkpoint {last[0]} at round {last[1]}" if last else "no checkpoint written"
        print(f"error: the round {trainer.round} checkpoint was not written ({save}); {kept}; "
              "free space or pick another --save, then --resume", file=sys.stderr)
        return 1
    console.print(f"done: {trainer.round} rounds in {time.perf_counter() - start:.1f}s; checkpoint {save}; "
                  f"{pipe.transfers} host transfers for {pipe.epochs} epochs"
                  + (f"; diverged policy updates rolled back: {rolled}" if rolled else ""))
    if ranks.main:
        where_next(console, cfg, save)
    return 0


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
    from esper.simic.cli import build_config

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


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    use_stable_cache()
    quiet = not main_rank()  # under torchrun, rank 0 speaks
    console = Console(quiet=quiet) if sys.stdout.isatty() else Console(width=200, quiet=quiet)
    if args.preset is None:
        args.preset = "ppo" if args.policy == "ppo" else "default"
    args.fresh_run = default_outputs(args)
    report = report_target(args) if args.policy not in OFFLINE_METHODS else None
    if args.policy == "ppo":
        return report_after(train_ppo(args, console), report if main_rank() else None)
    if args.policy in OFFLINE_METHODS:
        refuse_flags(args, OFFLINE_NO_EFFECT, args.policy)
        if args.config is None and args.preset == "default":
            refuse_flags(args, OFFLINE_SETTINGS, f"{args.policy} unless --config or --preset is given "
                                                 "(the pack's config is used)")
        if args.offline_epochs is not None and args.offline_epochs < 1:
            raise UsageError(f"--offline-epochs {args.offline_epochs}", "--offline-epochs",
                             "a positive number of passes over the pack")
        if launched():
            raise UsageError(f"--policy {args.policy} under torchrun", "--policy",
                             "behaviour cloning and IQL run as one process (python -m esper.train)")
        return train_offline(args, console)
    refuse_flags(args, (*PPO_ONLY, "--save", "--data", "--offline-epochs"), args.policy)
    specs = parse_policies(args.policy, "--policy")
    if len(specs) != 1:
        raise UsageError(f"{len(specs)} policies given", "--policy", "one policy (esper.evaluate compares several)")
    name = specs[0][0]
    cfg, profile = check_config(args, [name])
    link_latest(getattr(args, "fresh_run", None))
    with joined(args, cfg) as ranks:
        code = run_controller(args, cfg, profile, console, ranks)
    return report_after(code, report if ranks.main else None)


def run_controller(args: argparse.Namespace, cfg: TrainingConfig, profile: TelemetryConfig, console: Console,
                   ranks: Ranks) -> int:
    """Run ``--policy`` (not PPO) over this rank's envs; the summaries of every env, printed on rank 0."""
    env = run_env(cfg, ranks, profile=profile)
    try:
        policy = make_policy(args.policy, env, cfg, seed=cfg.episode.seed)
    except ValueError as err:
        raise UsageError(str(err), "--policy", "a policy that can be built for this env") from None
    total = cfg.episode.episodes * cfg.episode.length
    start = time.perf_counter()
    if ranks.main:
        console.print(f"{args.policy} (preset {args.preset}): {cfg.episode.envs} envs x {cfg.episode.episodes} "
                      f"episodes x {cfg.episode.length} epochs, compile={cfg.compile}, {where_telemetry(cfg)}",
                      highlight=False)
        follow_hint(console, cfg)
    try:
        with StopSignals() as stop, run_hub(for_rank(cfg, ranks)) as hub, \
                maybe_trace(trace_dir(args, ranks), f"{args.policy}-{cfg.telemetry.profile}"), \
                RunProgress(console, enabled=ranks.main) as progress:
            ranks.stop = stop  # a signal on any rank stops every rank after the same epoch
            progress.phase(f"{args.policy} x{cfg.episode.envs}", total=total, unit="epoch", per_unit=cfg.episode.envs)

            def on_epoch(step: int, snap: dict[str, np.ndarray]) -> None:
                acc = snap["signals.val_acc"]
                live = snap["tracker.seeds_fossilized"].sum()
                progress.advance(step, f"val acc {acc.mean():.2f}±{acc.std():.2f}  fossilized {live}")
                stop.check()

            runner = EpisodeRunner(env, policy, hub=hub, profile=profile, on_epoch=on_epoch)
            summaries = runner.run(cfg.episode.episodes)
    except Interrupted as err:  # the hub was flushed and closed on the way out
        print(f"interrupted; {env.pipeline.epochs} epochs done, telemetry flushed", file=sys.stderr)
        return err.exit_code
    elapsed = time.perf_counter() - start
    console.print(summary_table(summaries, f"{args.policy}: {len(summaries)} episodes in {elapsed:.1f}s, "
                                           f"reward {cfg.reward.mode}"))
    if cfg.compile:
        kas = env.kasmina
        frames = runner.epochs * env.n
        console.print(compile_line(kas.compile_graphs, kas.compile_seconds, frames, frames / elapsed), highlight=False)
    valid = [s for s in summaries if not getattr(s, "governed", False)]
    test = np.array([s.test_acc for s in valid])
    val = np.array([s.final_val_acc for s in valid])
    excluded = len(summaries) - len(valid)
    console.print(f"test acc {test.mean():.2f} ± {test.std():.2f} (val {val.mean():.2f} ± {val.std():.2f}) "
                  f"over {test.size} episodes"
                  + (f" ({excluded} governed episodes excluded)" if excluded else "")
                  + f"; {runner.transfers} host transfers for {runner.epochs} epochs")
    if ranks.main:
        where_next(console, cfg, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
