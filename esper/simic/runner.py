"""Run episodes of any TensorDict policy over the batched env with torchrl's ``Collector``.

The epoch pipeline (one transfer, telemetry, test scoring, plan) lives in the env's step, so
this is only the driver: one collector batch is one episode of every env. PPO collects through
the same ``Collector`` over the same env (:mod:`esper.simic.ppo_round`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from tensordict import TensorDictBase
from torchrl.collectors import Collector
from torchrl.envs import EnvBase

from esper.nissa import NissaHub, TelemetryConfig
from esper.nissa.profiling import phase
from esper.simic.env import MorphogeneticEnv
from esper.simic.pipeline import EpisodeSummary, EpochCallback

__all__ = ["EpisodeRunner", "EpisodeSummary", "PhasedPolicy", "Policy", "collector_for"]


class Policy(Protocol):
    """Anything that reads the env TensorDict and writes ``op, slot, blueprint, tempo``.

    It may also write ``reason`` (an index into ``REASONS``). Per-env state (recurrent hidden
    state, rotation counters) restarts where ``signals.epoch`` is 0: a fresh host.
    """

    def __call__(self, td: TensorDictBase) -> TensorDictBase: ...


class PhasedPolicy:
    """A policy whose calls show as the ``policy`` phase in profiler traces."""

    def __init__(self, policy: Callable[[TensorDictBase], TensorDictBase]) -> None:
        self.policy = policy

    def __call__(self, td: TensorDictBase) -> TensorDictBase:
        with phase("policy"):
            return self.policy(td)


def collector_for(env: EnvBase, policy: Callable[[TensorDictBase], TensorDictBase],
                  episodes: int) -> Collector:
    """torchrl's collector yielding one ``[N, T]`` batch per episode of every env
    (``episodes < 0``: endless).

    Every batch starts with fresh hosts (a reset at each iteration, none mid-batch), so a
    batch is exactly one episode and a checkpoint taken between batches resumes exactly. That
    reset is the only one: the env does not also auto-reset at the episode's end
    (``reset_by_driver``), which advanced every env's episode counter by 2 per episode.
    Trajectory ids are not tracked (the env index and the summaries identify episodes, and
    torchrl's id bookkeeping would read the done flags on the host every step).
    """
    base = env.base_env if hasattr(env, "base_env") else env
    base.reset_by_driver = True
    frames = base.n * base.episode_length
    return Collector(env, PhasedPolicy(policy), frames_per_batch=frames,
                     total_frames=frames * episodes if episodes >= 0 else -1, track_traj_ids=False,
                     reset_at_each_iter=True)


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
        # (observations, actions) are not kept here: drain the collector.
        deque(collector, maxlen=0)
        self.env.pipeline.finish()
        return self.env.pipeline.take_summaries()

