"""Shared command-line plumbing of ``esper.train`` and ``esper.evaluate``."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from esper.leyline.events import EventKind, TelemetryEvent
from esper.nissa import (
    NissaHub,
    TelemetryConfig,
    apply_overrides,
    load_profile,
    load_profile_file,
    make_backends,
)
from esper.nissa.profiling import trace_run
from esper.simic.config import TrainingConfig, merge_config
from esper.simic.faults import wrap_backends


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", help="named configuration preset")
    p.add_argument("--config", type=Path,
                   help="JSON/YAML TrainingConfig, applied over the preset (its values win)")
    p.add_argument("--envs", type=int, help="envs trained at once")
    p.add_argument("--episodes", type=int, help="episodes per env")
    p.add_argument("--episode-length", type=int, help="epochs per episode")
    p.add_argument("--seed", type=int, help="base seed of the hosts")
    p.add_argument("--task-seed", type=int,
                   help="seed of the synthetic task's data (train/val/test images); tune on one, report on others")
    p.add_argument("--reward-mode", help="reward family: shaped (the default), simplified or sparse")
    p.add_argument("--device", help="auto (the default: CUDA when available, else the CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the epoch: the training step and validation")
    p.add_argument("--telemetry", help="telemetry profile name (minimal..research)")
    p.add_argument("--telemetry-file", type=Path, help="telemetry profile YAML file")
    p.add_argument("--telemetry-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile field (repeatable)")
    p.add_argument("--backends", help="comma-separated: console,jsonl,tensorboard,prometheus,wandb; none for no output")
    p.add_argument("--run-dir", help="where jsonl/tensorboard output goes")
    p.add_argument("--trace", type=Path, metavar="DIR",
                   help="write a torch profiler trace of the run (phases: train, validate, "
                        "counterfactual, policy, telemetry) to DIR")


def build_config(args: argparse.Namespace) -> TrainingConfig:
    """The preset, the file on top of it, then command-line flags; each validated.

    ``--preset P --config F`` applies F over preset P (the file wins where both set a value).
    Only values somebody wrote are merged, never a dump with every default filled in, so a
    default still counts as unset afterwards (e.g. the fixed schedule's default epochs are not
    checked against a shorter ``--episode-length``).
    """
    data = TrainingConfig.preset(args.preset or "default").user_set()
    base = getattr(args, "base_config", None)  # e.g. the setting a controller was trained on
    if base:
        data = merge_config(data, base)
    if args.config:
        data = merge_config(data, TrainingConfig.load(args.config).user_set())
    flags: dict[str, dict[str, object]] = {}
    episode = {k: v for k, v in (("envs", args.envs), ("episodes", args.episodes),
                                 ("length", args.episode_length), ("seed", args.seed)) if v is not None}
    if episode:
        flags["episode"] = episode
    if args.task_seed is not None:
        flags["task"] = {"seed": args.task_seed}
    if getattr(args, "reward_mode", None) is not None:
        flags["reward"] = {"mode": args.reward_mode}
    telemetry: dict[str, object] = {}
    if args.telemetry:
        telemetry["profile"] = args.telemetry
    if args.telemetry_file:
        telemetry["profile_file"] = str(args.telemetry_file)
    if args.telemetry_set:
        telemetry["overrides"] = list(data.get("telemetry", {}).get("overrides", [])) + list(args.telemetry_set)
    if args.backends is not None:  # "none": no telemetry output
        telemetry["backends"] = [b for b in args.backends.split(",") if b and b.strip().lower() != "none"]
    if telemetry:
        flags["telemetry"] = telemetry
    top: dict[str, object] = {}
    if args.device:
        top["device"] = args.device
    if args.compile:
        top["compile"] = True
    if args.run_dir:
        top["run_dir"] = args.run_dir
    cfg = TrainingConfig.from_dict(merge_config(data, {**flags, **top}), "command line").check_host()
    if cfg.ppo.minibatch_envs > cfg.episode.envs:
        cfg = cfg.updated(ppo={"minibatch_envs": cfg.episode.envs})
    return cfg


def telemetry_profile(cfg: TrainingConfig) -> TelemetryConfig:
    t = cfg.telemetry
    profile = load_profile_file(t.profile_file) if t.profile_file else load_profile(t.profile)
    return apply_overrides(profile, t.overrides) if t.overrides else profile


def make_hub(cfg: TrainingConfig) -> NissaHub:
    backends = make_backends(cfg.telemetry.backends, run_dir=cfg.run_dir, verbosity=cfg.telemetry.verbosity,
                             prometheus_port=cfg.telemetry.prometheus_port)
    return NissaHub(wrap_backends(backends, cfg.faults))


@contextlib.contextmanager
def run_hub(cfg: TrainingConfig) -> Iterator[NissaHub]:
    """The run's hub; closed on the way out (signals and errors included), then every event a
    backend lost is reported on stderr: telemetry is never lost silently."""
    hub = make_hub(cfg)
    try:
        with hub:
            # The run's configuration opens its telemetry (esper.report shows it).
            hub.emit(TelemetryEvent(kind=EventKind.RUN, payload={"config": cfg.model_dump(mode="json")}))
            hub.flush()  # on disk before any work: a run killed in its first epoch still names its config
            yield hub
    finally:
        for line in hub.loss_report():
            print(line, file=sys.stderr)


def maybe_trace(directory: Path | None, name: str) -> contextlib.AbstractContextManager[object]:
    """A profiler trace of the block into ``directory`` (``<name>.trace.json``), or nothing."""
    return trace_run(directory, name) if directory is not None else contextlib.nullcontext()
