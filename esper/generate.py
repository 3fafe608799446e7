"""``python -m esper.generate``: record episodes of controllers into an episode data pack.

Each policy in ``--policies`` plays ``--episodes`` episodes on every one of ``--envs`` envs
through torchrl's collector over the same env (the one epoch pipeline); the batches are
concatenated along the episode dimension into one pack (:mod:`esper.simic.packs`) for offline
learning (``python -m esper.train --policy bc|iql --data PACK``). Inputs are checked before any
work; errors read ``error: what (where); what is allowed`` on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import esper.simic.ppo  # noqa: F401  (registers the trained policies: ppo=PATH, ppo_sample=PATH)
from esper.simic.checkpoint import CheckpointError, check_matches, load_checkpoint
from esper.simic.cli import add_common_args, build_config, make_hub, telemetry_profile
from esper.simic.config import ConfigError
from esper.simic.env import MorphogeneticEnv
from esper.simic.packs import PackBuilder, PackError, check_out_dir, write_pack
from esper.simic.runner import collector_for
from esper.tamiyo.policies import POLICIES, make_policy, parse_spec


class UsageError(Exception):
    """An input refused before any work: ``what``, ``where``, ``allowed``."""

    def __init__(self, what: str, where: str, allowed: str) -> None:
        super().__init__(f"error: {what} ({where}); {allowed}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m esper.generate", description=__doc__)
    p.add_argument("--policies", default="heuristic",
                   help=f"comma-separated specs from {sorted(POLICIES)} (name or name=ARG)")
    p.add_argument("--out", type=Path, required=True, help="pack directory to create (absent or empty)")
    add_common_args(p)
    return p


def check_inputs(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """Config, telemetry profile and policy specs, or :class:`UsageError` (nothing run yet)."""
    specs = [s.strip() for s in args.policies.split(",") if s.strip()]
    if not specs:
        raise UsageError("no policy given", "--policies", f"allowed: {sorted(POLICIES)}")
    for spec in specs:
        try:
            name, arg = parse_spec(spec)
        except ValueError:
            raise UsageError(f"unknown policy {spec.partition('=')[0]!r}", "--policies",
                             f"allowed: {sorted(POLICIES)} (name or name=ARG)") from None
        if name in ("ppo", "ppo_sample"):
            if not arg:
                raise UsageError(f"policy {name!r} needs a checkpoint", "--policies", f"write {name}=PATH")
            try:
                load_checkpoint(arg)
            except CheckpointError as err:
                raise UsageError(f"unusable checkpoint: {err}", "--policies",
                                 "a checkpoint written by esper.train") from None
    if len(set(specs)) != len(specs):
        raise UsageError("a policy is listed twice", "--policies", "list each spec once")
    why = check_out_dir(args.out)
    if why is not None:
        raise UsageError(f"{args.out} {why}", "--out", "a new path or an empty directory under a writable parent")
    try:
        cfg = build_config(args)
        profile = telemetry_profile(cfg)
    except (ConfigError, ValueError) as err:
        raise UsageError(str(err), "configuration", "see --preset/--config and the flags") from None
    for spec in specs:
        try:
            cfg.check_for(parse_spec(spec)[0])
        except ConfigError as err:
            raise UsageError(str(err), "configuration", "fix the policy's config section") from None
    return cfg, profile, specs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        cfg, profile, specs = check_inputs(args)
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    command = "python -m esper.generate " + " ".join(argv)
    start = time.perf_counter()
    with make_hub(cfg) as hub:
        env = MorphogeneticEnv(cfg, profile=profile, hub=hub)  # one env: its normalizer spans the pack
        builder = PackBuilder(env)
        layout = {"obs_size": env.schema.size, "n_slots": len(env.slots), "n_blueprints": len(env.blueprint_names)}
        for spec in specs:  # learned policies must fit this env before anything runs
            name, arg = parse_spec(spec)
            if name in ("ppo", "ppo_sample"):
                shape = load_checkpoint(arg)["policy_shape"]
                try:
                    check_matches(arg, "env layout", {k: shape[k] for k in layout}, layout)
                except CheckpointError as err:
                    print(f"error: {err} (--policies); a checkpoint trained on this env layout", file=sys.stderr)
                    return 2
        for spec in specs:
            try:
                policy = make_policy(spec, env, cfg, seed=cfg.episode.seed)
            except ValueError as err:
                print(f"error: {err} (--policies); a policy that can be built for this env", file=sys.stderr)
                return 2
            t0 = time.perf_counter()
            for batch in collector_for(env, policy, cfg.episode.episodes):
                builder.add(batch, env.pipeline.take_summaries(), spec)
            done = [e for e in builder.episodes if e["policy"] == spec]
            acc = [e["test_acc"] for e in done if "test_acc" in e]
            print(f"{spec}: {len(done)} episodes in {time.perf_counter() - t0:.1f}s, "
                  f"test acc {sum(acc) / max(len(acc), 1):.2f}")
        env.pipeline.finish()
        data = builder.build()
        try:
            out = write_pack(args.out, data, builder.meta(cfg, profile.name, command), builder.obs_norm_state())
        except (PackError, OSError) as err:
            print(f"error: {err} (--out); a new path or an empty directory under a writable parent",
                  file=sys.stderr)
            return 2
    e, t = data.batch_size
    print(f"pack {out}: {e} episodes x {t} steps from {', '.join(specs)} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
