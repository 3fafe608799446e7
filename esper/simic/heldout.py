"""Learning you can see: the controller against the heuristic on held-out hosts, every round.

A PPO round's own ``test`` figure comes from sampled actions on that round's hosts, which
change every round, so it cannot show learning. This check plays the greedy controller and the
heuristic on one fixed set of hosts that training never uses (host seeds offset by
:data:`HELDOUT_SEED_OFFSET`), scored on the test split, so a round's number is comparable with
every other round's and the heuristic's difference is paired host by host. The heuristic plays
once; the controller once before training (round 0) and after every round.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from esper.leyline import EventKind
from esper.leyline.events import TelemetryEvent
from esper.simic.config import TrainingConfig
from esper.simic.env import MorphogeneticEnv
from esper.simic.runner import EpisodeRunner
from esper.tamiyo.lstm_policy import RecurrentPolicy, TamiyoModules
from esper.tamiyo.policies import make_policy

HELDOUT_SEED_OFFSET = 1_000_003  # held-out hosts: base seed + this (training uses base seed + env, episode)


@dataclass(frozen=True)
class HeldOutScore:
    """One round's greedy controller against the heuristic on the same ``hosts`` hosts."""

    round: int
    hosts: int
    controller: float  # mean test accuracy %
    controller_std: float
    heuristic: float
    heuristic_std: float
    diff: float  # mean of (controller - heuristic) per host
    diff_sem: float  # its standard error over hosts
    per_host: list[float]

    def verdict(self) -> str:
        """Beat or behind only when the paired difference is beyond two standard errors."""
        if self.diff > 2 * self.diff_sem:
            return "beat"
        if self.diff < -2 * self.diff_sem:
            return "fell behind"
        return "was level with"

    def line(self) -> str:
        return (f"held-out ({self.hosts} hosts, test split): controller {self.controller:.2f} ± {self.controller_std:.2f}"
                f"  heuristic {self.heuristic:.2f} ± {self.heuristic_std:.2f}"
                f"  diff {self.diff:+.2f} ± {self.diff_sem:.2f} (s.e.)")

    def event(self) -> TelemetryEvent:
        return TelemetryEvent(kind=EventKind.HELDOUT, epoch=self.round, payload=asdict(self))


class HeldOutCheck:
    """Plays the heuristic (once) and the current controller on ``hosts`` held-out hosts.

    ``on_epoch`` sees each evaluation epoch (progress). The controller is a greedy copy of the
    trainer's networks with the observation normalizer frozen at the trainer's statistics, so
    the check changes nothing that training uses.
    """

    def __init__(self, cfg: TrainingConfig, hosts: int, task: object,
                 on_epoch: Callable[[int, object], None] | None = None) -> None:
        if hosts < 1:
            raise ValueError(f"held-out hosts must be at least 1, got {hosts}")
        # eager: the check's env count differs from training's, and a compile of its own would
        # cost more than the check
        self.cfg = cfg.updated(compile=False, episode={"envs": hosts, "episodes": 1,
                                                       "seed": cfg.episode.seed + HELDOUT_SEED_OFFSET})
        self.hosts = hosts
        self.task = task
        self.on_epoch = on_epoch
        self._heuristic: np.ndarray | None = None
        self.scores: list[HeldOutScore] = []

    def _env(self) -> MorphogeneticEnv:
        return MorphogeneticEnv(self.cfg, task=self.task)  # type: ignore[arg-type]  (fresh: identical hosts)

    def _play(self, env: MorphogeneticEnv, policy: object) -> np.ndarray:
        runner = EpisodeRunner(env, policy, on_epoch=self.on_epoch)  # type: ignore[arg-type]
        summaries = sorted(runner.run(1), key=lambda s: s.env)
        return np.array([s.test_acc for s in summaries], dtype=np.float64)

    def heuristic(self) -> np.ndarray:
        """The heuristic's test accuracy per held-out host (played on the first call only)."""
        if self._heuristic is None:
            env = self._env()
            self._heuristic = self._play(env, make_policy("heuristic", env, self.cfg, seed=self.cfg.episode.seed))
        return self._heuristic

    def score(self, modules: TamiyoModules, obs_norm: object, round_: int) -> HeldOutScore:
        """The greedy controller (``modules`` copied, not touched) on the held-out hosts."""
        base = self.heuristic()
        env = self._env()
        if env.features.norm is not None and obs_norm is not None:
            env.features.norm.load_state_dict(obs_norm.state_dict())  # type: ignore[attr-defined]
            env.features.norm.eval()
        greedy = copy.deepcopy(modules)
        greedy.use_blueprints(env.blueprint_names)
        greedy.eval()
        acc = self._play(env, RecurrentPolicy(greedy, env.n, deterministic=True))
        diff = acc - base
        sem = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("inf")
        score = HeldOutScore(round=round_, hosts=self.hosts, controller=float(acc.mean()),
                             controller_std=float(acc.std()), heuristic=float(base.mean()),
                             heuristic_std=float(base.std()), diff=float(diff.mean()), diff_sem=sem,
                             per_host=[float(a) for a in acc])
        self.scores.append(score)
        return score

    def summary(self) -> str:
        """The run's closing line: did the controller beat the heuristic, and did it learn."""
        first, last = self.scores[0], self.scores[-1]
        spread = max(first.controller_std, last.controller_std) / math.sqrt(self.hosts)
        moved = last.controller - first.controller
        learned = ("improved" if moved > 2 * spread else "got worse" if moved < -2 * spread else "did not move")
        return (f"held-out verdict: the controller {last.verdict()} the heuristic on {self.hosts} held-out hosts "
                f"({last.controller:.2f} vs {last.heuristic:.2f}, diff {last.diff:+.2f} ± {last.diff_sem:.2f} s.e.); "
                f"over the run it {learned}: round {first.round} {first.controller:.2f} -> round {last.round} "
                f"{last.controller:.2f} (s.e. {spread:.2f})")
