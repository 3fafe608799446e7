"""Run episodes of any TensorDict policy over the batched env with torchrl's ``Collector``.

The epoch pipeline (one transfer, telemetry, test scoring, plan) lives in the env's step, so
this is only the driver: one collector batch is one episode of every env. PPO collects through
the same ``Collector`` over the same env (:mod:`esper.simic.ppo`).
"""

from __future__ import annotations

from typing import Protocol

from tensordict import TensorDictBase
from torchrl.collectors import Collector

from esper.nissa import NissaHub, TelemetryConfig
from esper.simic.env import MorphogeneticEnv
from esper.simic.pipeline import EpisodeSummary, EpochCallback

__all__ = ["EpisodeRunner", "EpisodeSummary", "Policy", "collector_for"]


class Policy(Protocol):
    """Anything that reads the env TensorDict and writes ``op, slot, blueprint, tempo``.

    It may also write ``reason`` (an index into ``REASONS``). Per-env state (recurrent hidden
    state, rotation counters) restarts where ``signals.epoch`` is 0: a fresh host.
    """

    def __call__(self, td: TensorDictBase) -> TensorDictBase: ...


def collector_for(env: MorphogeneticEnv, policy: object, episodes: int) -> Collector:
    """torchrl's collector yielding one ``[N, T]`` batch per episode of every env.

    Trajectory ids are not tracked (the env index and the summaries identify episodes, and
    torchrl's id bookkeeping would read the done flags on the host every step).
    """
    frames = env.n * env.episode_length
    return Collector(env, policy, frames_per_batch=frames, total_frames=frames * episodes,
                     track_traj_ids=False)


class EpisodeRunner:
    """Runs ``episodes`` episodes per env of ``policy`` on ``env``, emitting telemetry."""

    def __init__(
        self,
        env: MorphogeneticEnv,
        policy: Policy,
        hub: NissaHub | None = None,
        profile: TelemetryConfig | None = None,
        on_epoch: EpochCallback | None = None,
    ) -> None:
        self.env = env
        self.policy = policy
        self.frames = 0
        env.pipeline.configure(profile=profile, hub=hub)
        if on_epoch is not None:
            env.pipeline.callbacks.append(on_epoch)

    @property
    def transfers(self) -> int:
        """Device-to-host transfers the pipeline made (one per epoch)."""
        return self.env.pipeline.transfers

    @property
    def epochs(self) -> int:
        return self.env.pipeline.epochs

    def run(self, episodes: int) -> list[EpisodeSummary]:
        """Every env plays ``episodes`` episodes; their summaries, in completion order."""
        collector = collector_for(self.env, self.policy, episodes)
        # The pipeline inside env.step records everything each epoch; the batches themselves
        # (observations, actions) are only counted here.
        self.frames = sum(batch.numel() for batch in collector)
        self.env.pipeline.finish()
        return self.env.pipeline.take_summaries()

