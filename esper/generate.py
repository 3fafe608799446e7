"""``python -m esper.generate``: record episodes of controllers into an episode data pack.

Each policy in ``--policies`` plays ``--episodes`` episodes on every one of ``--envs`` envs
through torchrl's collector over the same env (the one epoch pipeline); the batches are
concatenated along the episode dimension into one pack (:mod:`esper.simic.packs`) for offline
learning (``python -m esper.train --policy bc|iql|cql --data PACK``). Inputs are checked before any
work; errors read ``error: what (where); what is allowed`` on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from esper.progress import RunProgress
from esper.simic.checkpoint import (  # registers ppo=PATH, ppo_sample=PATH
    check_matches,
    checkpoint_for,
    load_checkpoint,
)
from esper.simic.cli import add_common_args, make_hub
from esper.simic.env import MorphogeneticEnv
from esper.simic.errors import CheckpointError, PackError, UsageError
from esper.simic.packs import PackBuilder, check_out_dir, write_pack
from esper.simic.preflight import (
    StopSignals,
    add_debug_arg,
    check_config,
    parse_policies,
    refuse_flags,
    run_cli,
)
from esper.simic.runner import collector_for
from esper.tamiyo.policies import POLICIES, make_policy, parse_spec


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m esper.generate", description=__doc__)
    p.add_argument("--policies", default="heuristic",
                   help=f"comma-separated specs from {sorted(POLICIES)} (name or name=ARG)")
    p.add_argument("--out", type=Path, required=True, help="pack directory to create (absent or empty)")
    add_common_args(p)
    add_debug_arg(p)
    return p


def check_inputs(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """Config, telemetry profile and policy specs, or :class:`UsageError` (nothing run yet)."""
    refuse_flags(args, ("--trace",), "generate")
    parsed = parse_policies(args.policies)
    specs = [s.strip() for s in args.policies.split(",")]
    why = check_out_dir(args.out)
    if why is not None:
        raise UsageError(f"{args.out} {why}", "--out", "a new path or an empty directory under a writable parent")
    cfg, profile = check_config(args, [name for name, _ in parsed])
    return cfg, profile, specs


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    cfg, profile, specs = check_inputs(args)
    command = "python -m esper.generate " + " ".join(argv)
    start = time.perf_counter()
    with StopSignals() as stop, make_hub(cfg) as hub, RunProgress(Console()) as progress:  # a signal: no pack
        env = MorphogeneticEnv(cfg, profile=profile, hub=hub)  # one env: its normalizer spans the pack
        env.pipeline.callbacks.append(stop.check)
        first = [0]  # the pipeline's epoch count when the current policy started
        env.pipeline.callbacks.append(lambda k, _snap: progress.advance(k - first[0]))
        builder = PackBuilder(env)
        layout = {"obs_size": env.schema.size, "n_slots": len(env.slots)}
        for spec in specs:  # learned policies must fit this env before anything runs
            name, arg = parse_spec(spec)
            if name in ("ppo", "ppo_sample"):
                path = checkpoint_for(arg, name)  # a bare name is the shipped controller
                shape = load_checkpoint(path)["policy_shape"]
                try:
                    check_matches(path, "env layout", {k: shape[k] for k in layout}, layout)
                except CheckpointError as err:
                    print(f"error: {err} (--policies); a checkpoint trained on this env layout", file=sys.stderr)
                    return 2
        for spec in specs:
            try:
                policy = make_policy(spec, env, cfg, seed=cfg.episode.seed)
            except ValueError as err:
                print(f"error: {err} (--policies); a policy that can be built for this env", file=sys.stderr)
                return 2
            t0, first[0] = time.perf_counter(), env.pipeline.epochs
            progress.phase(f"generating {spec}", total=cfg.episode.episodes * cfg.episode.length, unit="epoch",
                           per_unit=cfg.episode.envs)
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
