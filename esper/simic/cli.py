"""Shared command-line plumbing of ``esper.train`` and ``esper.evaluate``."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from esper.nissa import (
    NissaHub,
    TelemetryConfig,
    apply_overrides,
    load_profile,
    load_profile_file,
    make_backends,
)
from esper.nissa.profiling import trace_run
from esper.simic.config import TrainingConfig


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", help="named configuration preset")
    p.add_argument("--config", type=Path, help="JSON/YAML TrainingConfig (overrides the preset)")
    p.add_argument("--envs", type=int, help="envs trained at once")
    p.add_argument("--episodes", type=int, help="episodes per env")
    p.add_argument("--episode-length", type=int, help="epochs per episode")
    p.add_argument("--seed", type=int, help="base seed of the hosts")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--telemetry", help="telemetry profile name (minimal..research)")
    p.add_argument("--telemetry-file", type=Path, help="telemetry profile YAML file")
    p.add_argument("--telemetry-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile field (repeatable)")
    p.add_argument("--backends", help="comma-separated: console,jsonl,tensorboard")
    p.add_argument("--run-dir", help="where jsonl/tensorboard output goes")
    p.add_argument("--trace", type=Path, metavar="DIR",
                   help="write a torch profiler trace of the run (phases: train, validate, "
                        "counterfactual, policy, telemetry) to DIR")


def build_config(args: argparse.Namespace) -> TrainingConfig:
    """Preset, then file, then command-line flags; validated at every stage."""
    cfg = TrainingConfig.load(args.config) if args.config else TrainingConfig.preset(args.preset)
    episode = {k: v for k, v in (("envs", args.envs), ("episodes", args.episodes),
                                 ("length", args.episode_length), ("seed", args.seed)) if v is not None}
    telemetry: dict[str, object] = {}
    if args.telemetry:
        telemetry["profile"] = args.telemetry
    if args.telemetry_file:
        telemetry["profile_file"] = str(args.telemetry_file)
    if args.telemetry_set:
        telemetry["overrides"] = list(cfg.telemetry.overrides) + list(args.telemetry_set)
    if args.backends:
        telemetry["backends"] = [b for b in args.backends.split(",") if b]
    data = cfg.model_dump()
    data["episode"].update(episode)
    data["telemetry"].update(telemetry)
    if args.device:
        data["device"] = args.device
    if args.compile:
        data["compile"] = True
    if args.run_dir:
        data["run_dir"] = args.run_dir
    if data["ppo"]["minibatch_envs"] > data["episode"]["envs"]:
        data["ppo"]["minibatch_envs"] = data["episode"]["envs"]
    return TrainingConfig.from_dict(data, "command line")


def telemetry_profile(cfg: TrainingConfig) -> TelemetryConfig:
    t = cfg.telemetry
    profile = load_profile_file(t.profile_file) if t.profile_file else load_profile(t.profile)
    return apply_overrides(profile, t.overrides) if t.overrides else profile


def make_hub(cfg: TrainingConfig) -> NissaHub:
    backends = make_backends(cfg.telemetry.backends, run_dir=cfg.run_dir, verbosity=cfg.telemetry.verbosity)
    return NissaHub(backends)


def maybe_trace(directory: Path | None, name: str) -> contextlib.AbstractContextManager[object]:
    """A profiler trace of the block into ``directory`` (``<name>.trace.json``), or nothing."""
    return trace_run(directory, name) if directory is not None else contextlib.nullcontext()
