"""An env holding one rank's block of the run's envs, behaving as the whole run would.

Two things an env computes are not per env, and both are made global here:

* the observation normalizer folds the epoch's batch into running statistics: the rows of every
  rank are gathered (one device ``all_gather`` per epoch, no host transfer), so every rank
  normalizes with the statistics a single process over all envs would have (bit for bit on one
  device type);
* the host half of the epoch pipeline (episode bookkeeping, summaries, anomaly detection and its
  profile escalation, narratives, decisions) runs on every rank over the gathered snapshot of
  all envs (one ``all_gather_object`` per epoch): the profile, hence what Kasmina captures,
  stays the same on every rank; rank 0 alone has telemetry backends and writes.

A stop signal seen by any rank rides in the same gather, so every rank stops after the same
epoch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from esper.leyline.events import AnomalyEvent
from esper.simic.config import TrainingConfig
from esper.simic.distributed import Ranks
from esper.simic.env import MorphogeneticEnv, load_config_task
from esper.simic.errors import RankLost
from esper.tamiyo.features import RunningNorm


class GlobalRunningNorm(RunningNorm):
    """:class:`RunningNorm` whose updates see the rows of every rank, in env order."""

    def __init__(self, local: RunningNorm, ranks: Ranks, total: int) -> None:
        super().__init__(local.mean.numel(), eps=local.eps, clip=local.clip)
        self.max_abs = local.max_abs
        self.load_state_dict(local.state_dict())
        self.to(local.mean.device)
        self.train(local.training)
        self.ranks, self.total = ranks, total

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        super().update(self.ranks.gather_rows(x, self.total, "observation statistics"))


class GlobalSnapshots:
    """The pipeline's :class:`~esper.simic.pipeline.SnapshotView` over every rank's envs."""

    def __init__(self, ranks: Ranks, total: int) -> None:
        self.ranks = ranks
        self.envs = total

    def __call__(self, snap: dict[str, np.ndarray], rollbacks: list[AnomalyEvent],
                 governed: np.ndarray) -> tuple[dict[str, np.ndarray], list[AnomalyEvent], np.ndarray]:
        stop = self.ranks.stop
        signum = getattr(stop, "signum", None)
        parts = self.ranks.gather_objects((snap, rollbacks, governed, signum), "epoch snapshot")
        keys = list(parts[0][0])
        for r, part in enumerate(parts):
            if list(part[0]) != keys:
                raise RankLost(f"rank {r} materialized other fields than rank 0 this epoch "
                               f"({sorted(set(part[0]) ^ set(keys))})")
        merged = {k: np.concatenate([p[0][k] for p in parts]) for k in keys}
        events = [e for p in parts for e in p[1]]  # events already name the run's env index
        signals = [p[3] for p in parts if p[3] is not None]
        if signals and stop is not None and stop.signum is None:
            stop.signum = signals[0]  # every rank stops after this epoch
        return merged, events, np.concatenate([p[2] for p in parts])


def shard_env(env: MorphogeneticEnv, ranks: Ranks, total: int) -> MorphogeneticEnv:
    """Make ``env`` (this rank's block of ``total`` envs) normalize and report as the whole run."""
    if ranks.world == 1:
        return env
    norm = env.features.norm
    if norm is not None:
        env.features.norm = GlobalRunningNorm(norm, ranks, total)
    env.pipeline.shard(GlobalSnapshots(ranks, total))
    return env


def run_env(cfg: TrainingConfig, ranks: Ranks | None, **kwargs: Any) -> MorphogeneticEnv:
    """The command's env: every env in one process, or (under torchrun) this rank's block of
    the config's ``episode.envs``, on the rank's device, sharded (:func:`shard_env`)."""
    if ranks is None or ranks.world == 1:
        return MorphogeneticEnv(cfg, **kwargs)
    total = cfg.episode.envs
    offset, count = ranks.shard(total)
    if kwargs.get("task") is None:
        kwargs["task"] = load_config_task(cfg, ranks.device)
    return shard_env(MorphogeneticEnv(cfg, n_envs=count, env_offset=offset, **kwargs), ranks, total)
