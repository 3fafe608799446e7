"""What the epoch pipeline and the governor read of the env: a small protocol, so neither
imports the env class (:class:`~esper.simic.env.MorphogeneticEnv` satisfies it)."""

from __future__ import annotations

from typing import Protocol

import torch
from tensordict import TensorDictBase

from esper.kasmina.epoch import MorphogeneticBatch
from esper.simic.rewards import ShapedReward


class EpochEnv(Protocol):
    """The env's batched state and layout, as the host half of an epoch sees them."""

    n: int  # envs held here
    slots: tuple[str, ...]
    blueprint_names: tuple[str, ...]
    episode_length: int
    kasmina: MorphogeneticBatch  # the batched hosts and seeds
    signals: TensorDictBase  # Kasmina's last signals, what the next actions read
    tracker: TensorDictBase  # on-device history counters
    reward_fn: ShapedReward

    @property
    def device(self) -> torch.device: ...

    def describe(self, op: int, slot: int, blueprint: int, tempo: int) -> str:
        """One action in words (``germinate(conv_light@block1, tempo 5)``)."""
        ...
