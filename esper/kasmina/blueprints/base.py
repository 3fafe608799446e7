"""The blueprint registry: what a seed architecture is, and the names that find one.

Blueprints register on import of their family's module (:mod:`.cnn`, :mod:`.lm`); the package
imports both, in that order, which is the order of the catalogue a controller is laid out over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Params = dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class Blueprint:
    """A seed architecture: how to make its parameters, run it, and what it costs."""

    name: str
    init: Callable[[torch.Tensor, int], Params]  # (keys [N], channels) -> params [N, ...]
    delta: Callable[[Params, torch.Tensor, int], torch.Tensor]  # (params, x [B,N*C,H,W], N)
    param_count: Callable[[int], int]  # channels -> parameters per env
    macs: Callable[[int, int], int]  # (channels, H*W) -> multiply-accumulates per sample
    identity: bool = False  # adds nothing: the forward pass may skip it
    family: str = "cnn"  # the host family it fits ("cnn", "lm"), or "any"

    def flops(self, channels: int, hw: int) -> int:
        return 2 * self.macs(channels, hw)


BLUEPRINTS: dict[str, Blueprint] = {}


def register_blueprint(bp: Blueprint) -> Blueprint:
    if bp.name in BLUEPRINTS:
        raise ValueError(f"blueprint {bp.name!r} is already registered")
    BLUEPRINTS[bp.name] = bp
    return bp


def family_blueprints(family: str | None = None) -> list[str]:
    """Names of the blueprints a host family takes (every one when ``None``), in order."""
    return [n for n, bp in BLUEPRINTS.items() if family is None or bp.family in (family, "any")]


def get_blueprints(
    names: tuple[str, ...] | list[str] | None = None, family: str | None = None
) -> tuple[Blueprint, ...]:
    """Blueprints by name (all registered ones of ``family``, in registration order, when
    ``None``). A blueprint of another family is refused: a CNN seed's convolutions would read
    a token sequence's future."""
    allowed = family_blueprints(family)
    if names is None:
        return tuple(BLUEPRINTS[n] for n in allowed)
    unknown = [n for n in names if n not in BLUEPRINTS]
    if unknown:
        raise ValueError(f"unknown blueprint(s) {unknown}; allowed: {allowed}")
    foreign = [n for n in names if n not in allowed]
    if foreign:
        raise ValueError(f"blueprint(s) {foreign} do not fit a {family} host; allowed: {allowed}")
    if len(set(names)) != len(names):
        raise ValueError(f"blueprint list has duplicates: {list(names)}")
    return tuple(BLUEPRINTS[n] for n in names)


def blueprint_catalogue() -> tuple[str, ...]:
    """Every registered blueprint, of every family, in registration order.

    Why: a learned controller's observation and blueprint head are laid out over this
    catalogue, not over one run's blueprint set, so one controller runs on any blueprint set
    and host (a run's blueprints are a subset, gathered by name).
    """
    return tuple(BLUEPRINTS)


def catalogue_index(names: tuple[str, ...] | list[str], catalogue: tuple[str, ...] | None = None) -> list[int]:
    """Positions of ``names`` in ``catalogue`` (this build's when None); unknown names refused."""
    cat = blueprint_catalogue() if catalogue is None else tuple(catalogue)
    missing = [n for n in names if n not in cat]
    if missing:
        raise ValueError(f"blueprints {missing} are not in the controller's blueprint catalogue {list(cat)}; "
                         "use a blueprint set drawn from it, or a controller trained with them")
    return [cat.index(n) for n in names]
