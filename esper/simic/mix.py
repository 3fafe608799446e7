"""One controller trained over several settings (tasks, hosts, blueprint sets) in turn.

Why: a controller trained on one generator learns that generator. Its observation and action
layout do not depend on the task, the host or the blueprint set (``ObservationSchema`` over the
blueprint catalogue, losses in units of ln(classes)), so the same networks can learn from image
and sequence hosts alike. Each setting gets its own :class:`PPOTrainer` (env, collector, GAE,
loss) sharing one set of networks, normalizers and optimizer; round ``r`` trains setting
``r mod K``, so every update sees one setting's whole episodes (whole-sequence minibatches with
one blueprint set), and the schedules advance in lockstep.

A mix file (``esper.train --mix FILE``) lists the settings, each a preset with overrides::

    settings:
      - {preset: ppo, task: {seed: 0}}
      - {preset: lm, task: {seed: 1}, episode: {length: 20}}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from esper.nissa import NissaHub, TelemetryConfig
from esper.simic.checkpoint import save_checkpoint
from esper.simic.config import TrainingConfig
from esper.simic.errors import ConfigError
from esper.simic.ppo import PPOTrainer
from esper.simic.ppo_round import RoundStats


def read_mix(path: str | Path) -> list[dict[str, Any]]:
    """The settings of a mix file: ``[{"preset": name, **overrides}, ...]``, checked for shape."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read mix file {p}: {err}") from None
    settings = data.get("settings") if isinstance(data, dict) else None
    if not isinstance(settings, list) or len(settings) < 2:
        raise ConfigError(f"{p}: expected 'settings:' with a list of at least 2 settings "
                          "({preset: NAME, <section>: {...}})")
    for i, s in enumerate(settings):
        if not isinstance(s, dict) or not isinstance(s.get("preset"), str):
            raise ConfigError(f"{p}: settings[{i}] needs a preset name (preset: NAME), got {s!r}")
    return settings


class MixedTrainer:
    """Round-robin PPO over K settings with one shared controller; the CLI drives it like a
    :class:`PPOTrainer` (``round``, ``train_round``, ``save``, ``init``)."""

    def __init__(self, cfgs: list[TrainingConfig], rounds: int, hub: NissaHub | None = None,
                 profile: TelemetryConfig | None = None) -> None:
        if len(cfgs) < 2:
            raise ConfigError("a mix needs at least 2 settings")
        per = math.ceil(rounds / len(cfgs))  # each setting's own schedule spans its share of rounds
        cfgs = [c.updated(ppo={"rounds": per}) for c in cfgs]
        first = PPOTrainer(cfgs[0], hub=hub, profile=profile)
        self.trainers = [first, *(PPOTrainer(c, hub=hub, profile=profile, share=first) for c in cfgs[1:])]
        self.rounds = rounds
        self.round = 0
        self.history: list[dict[str, Any]] = []

    @property
    def current(self) -> PPOTrainer:
        """The trainer whose setting trains next."""
        return self.trainers[self.round % len(self.trainers)]

    @property
    def device(self) -> Any:
        return self.trainers[0].device

    @property
    def base_env(self) -> Any:
        """The env of the setting that trains next."""
        return self.current.base_env

    @property
    def learner(self) -> Any:
        return self.current.learner

    def add_epoch_callback(self, fn: Any) -> None:
        for t in self.trainers:
            t.base_env.pipeline.callbacks.append(fn)

    def init(self, path: str | Path) -> None:
        """Start every setting from ``path``'s networks and observation normalizer."""
        first = self.trainers[0]
        first.init(path)
        for t in self.trainers[1:]:
            t.optimizer = first.optimizer  # init made a fresh one: share it again
            t.params = first.params
            t.init_from, t.lineage = first.init_from, first.lineage

    def train_round(self) -> RoundStats:
        """The next setting's round; its stats carry ``setting`` (index into the mix)."""
        setting = self.round % len(self.trainers)
        stats = self.trainers[setting].train_round()
        self.round += 1
        self.history.append({**self.trainers[setting].history[-1], "setting": setting,
                             "task": self.trainers[setting].cfg.task.name})
        return stats

    def state(self) -> dict[str, Any]:
        """A PPO checkpoint of the shared controller (its config is the first setting's), with
        every setting's config and the interleaved round history."""
        state = self.trainers[0].state()
        state["round"] = self.round
        state["history"] = list(self.history)
        state["mix"] = [t.cfg.model_dump(mode="json") for t in self.trainers]
        return state

    def save(self, path: str | Path) -> Path:
        return save_checkpoint(path, self.state())
