"""``python -m esper.train``: train the LSTM-PPO controller (default), or run any other
controller over N batched host-training runs (``--policy heuristic`` etc.)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from esper.compile_cache import compile_line, use_stable_cache
from esper.nissa import TelemetryConfig
from esper.progress import RunProgress
from esper.report.after_run import report_after, report_target
from esper.simic.checkpoint import check_matches, load_checkpoint
from esper.simic.cli import add_common_args, maybe_trace, run_hub
from esper.simic.config import TrainingConfig
from esper.simic.distributed import Ranks, launched, main_rank
from esper.simic.errors import CheckpointError, ConfigError, Interrupted, UsageError
from esper.simic.heldout import HeldOutCheck
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
from esper.simic.runner import EpisodeRunner
from esper.simic.sharding import run_env
from esper.simic.start import WIDTHS, check_start_flags, shipped_start
from esper.simic.train_output import (
    EPILOG,
    ROUND_LEGEND,
    default_outputs,
    failed_save,
    follow_hint,
    link_latest,
    summary_table,
    where_next,
    where_telemetry,
)
from esper.tamiyo.policies import POLICIES, make_policy

PPO_ONLY = ("--rounds", "--resume", "--init", "--force", "--from-scratch", "--heldout")
# Offline training (bc, iql, cql) runs on the CPU from a pack and emits no telemetry.
OFFLINE_NO_EFFECT = ("--rounds", "--from-scratch", "--heldout", "--trace", "--report", "--dist-timeout", "--device", "--compile", "--telemetry",
                     "--telemetry-file", "--telemetry-set", "--backends")
# Settings that enter an offline checkpoint's config only through --config/--preset (otherwise
# the pack's own config is used, whole).
OFFLINE_SETTINGS = ("--envs", "--episodes", "--episode-length", "--seed", "--task-seed", "--run-dir")


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
    p.add_argument("--from-scratch", action="store_true",
                   help="a fresh PPO run starts from random weights (default: from the shipped controller when "
                        "its network widths fit the config)")
    p.add_argument("--heldout", type=int, metavar="HOSTS",
                   help="after every round the greedy controller and the heuristic play this many held-out hosts, "
                        "at most --envs (ppo.heldout_hosts, default 8; 0: no check)")
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
    cfg = check_start_flags(args, cfg)
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
        elif args.resume is None and mix is None and not args.from_scratch:
            shipped, said = shipped_start(cfg)
            if shipped is not None:
                try:
                    trainer.init(shipped)
                except (CheckpointError, ConfigError) as err:  # another env layout: say so, go on
                    said = f"starting from scratch: the shipped controller does not fit this env ({err})"
            console.print(said, highlight=False, markup=False)
        heldout = None
        if cfg.ppo.heldout_hosts and mix is None and ranks.world == 1:
            heldout = HeldOutCheck(cfg, min(cfg.ppo.heldout_hosts, cfg.episode.envs), trainer.base_env.kasmina.task,
                                   on_epoch=lambda k, _snap: (progress.advance(k), stop.check()))
        elif cfg.ppo.heldout_hosts:  # one setting's hosts, one process: say why there is no check
            console.print(f"no held-out check: {'a mixed run' if mix is not None else 'several ranks'} "
                          "(esper.evaluate scores the checkpoint afterwards)", highlight=False)
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

        def check_heldout() -> None:
            """The controller as it is now against the heuristic, on the held-out hosts."""
            if heldout is None:
                return
            at = f"round {trainer.round}/{cfg.ppo.rounds}: held-out check"
            length = cfg.episode.length
            progress.phase(f"{at}, heuristic", total=length, unit="epoch", per_unit=heldout.hosts)
            heldout.heuristic()
            progress.phase(f"{at}, controller", total=length, unit="epoch", per_unit=heldout.hosts)
            score = heldout.score(trainer.modules, trainer.base_env.features.norm, trainer.round)
            console.print(" " * 9 + score.line(), highlight=False, markup=False)
            hub.emit(score.event())
            hub.flush()

        try:
            check_heldout()  # round 0: where the controller starts
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
                check_heldout()
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
    if heldout is not None and heldout.scores:
        console.print(heldout.summary(), highlight=False, markup=False)
    if ranks.main:
        where_next(console, cfg, save)
    return 0


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
