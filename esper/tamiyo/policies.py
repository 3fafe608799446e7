"""Policy registry: CLI names -> factories building a TensorDict policy for an env.

A spec is ``name`` or ``name=ARG`` (e.g. a checkpoint path for a learned policy). New
policies register with :func:`register_policy`; train/evaluate offer whatever is registered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from esper.tamiyo.baselines import FixedSchedulePolicy, RandomPolicy, StaticPolicy
from esper.tamiyo.heuristic import HeuristicPolicy


class PolicyEnv(Protocol):
    """What a factory may read from the env."""

    n: int
    blueprint_names: tuple[str, ...]
    device: torch.device


PolicyFactory = Callable[[PolicyEnv, Any, str | None, int], Any]
POLICIES: dict[str, PolicyFactory] = {}


def register_policy(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    def deco(fn: PolicyFactory) -> PolicyFactory:
        if name in POLICIES:
            raise ValueError(f"policy {name!r} is already registered")
        POLICIES[name] = fn
        return fn

    return deco


def parse_spec(spec: str) -> tuple[str, str | None]:
    name, sep, arg = spec.partition("=")
    name = name.strip()
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; available: {sorted(POLICIES)}")
    return name, (arg.strip() or None) if sep else None


def make_policy(spec: str, env: PolicyEnv, cfg: Any, seed: int = 0) -> Any:
    """Build the policy named by ``spec`` (``name`` or ``name=ARG``) for ``env``.

    The config's settings for that policy are checked first (``cfg.check_for(name)`` where the
    config has it): a policy's own section matters only when that policy runs.
    """
    name, arg = parse_spec(spec)
    check = getattr(cfg, "check_for", None)
    if callable(check):
        check(name)
    return POLICIES[name](env, cfg, arg, seed)


@register_policy("static")
def _static(env: PolicyEnv, cfg: Any, arg: str | None, seed: int) -> StaticPolicy:
    return StaticPolicy()


@register_policy("random")
def _random(env: PolicyEnv, cfg: Any, arg: str | None, seed: int) -> RandomPolicy:
    # env i of a sharded run draws as env i (MorphogeneticEnv.env_offset)
    return RandomPolicy(env.n, seed=int(arg) if arg else seed, env_offset=getattr(env, "env_offset", 0),
                        device=env.device)


@register_policy("fixed")
def _fixed(env: PolicyEnv, cfg: Any, arg: str | None, seed: int) -> FixedSchedulePolicy:
    fixed = cfg.fixed
    name = arg or fixed.blueprint
    if name not in env.blueprint_names:
        raise ValueError(f"fixed schedule blueprint {name!r} not among {list(env.blueprint_names)}")
    return FixedSchedulePolicy(env.blueprint_names.index(name), fixed.epochs, fixed.tempo_index, fixed.slot_preference)


@register_policy("heuristic")
def _heuristic(env: PolicyEnv, cfg: Any, arg: str | None, seed: int) -> HeuristicPolicy:
    return HeuristicPolicy(cfg.heuristic, env.blueprint_names, env.n, env.device)
