"""Host-side episode bookkeeping: the summary, key moments, outcome and decision records.

Seed 003 asks an episode pack to tell people what happened in each episode (a trajectory, its
key moments with their epochs, an outcome) and, per decision, what the controller saw, what it
did, why and how it turned out. The pipeline fills these from the epoch snapshots it already
has; :class:`esper.simic.packs.PackBuilder` writes them into ``meta.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

OUTCOMES = ("rolled_back", "successful_intervention", "failed_intervention", "unfinished_intervention",
            "no_intervention")


def outcome(germinated: int, fossilized: int, culled: int, governed: bool) -> str:
    """One word for an episode: a rolled-back env is no valid result; a fossilized seed is a
    success; only culls a failure; a seed still live at the end is unfinished."""
    if governed:
        return "rolled_back"
    if fossilized > 0:
        return "successful_intervention"
    if germinated == 0:
        return "no_intervention"
    return "failed_intervention" if culled > 0 else "unfinished_intervention"


@dataclass(slots=True)
class EpisodeSummary:
    """One env's episode, on the host. ``test_acc`` is on the held-out test split.

    ``decisions`` (one record per epoch: action, context, hindsight) is for the pack, not for
    the episode event: the JSONL carries each as its own decision and hindsight event."""

    env: int
    episode: int
    trajectory: str
    final_val_acc: float
    best_val_acc: float
    test_acc: float
    test_loss: float
    params_added: float
    fossilized: int
    culled: int
    germinated: int
    total_reward: float
    # sum_t gamma^t r_t, what PPO maximizes and what the shaping leaves invariant (total_reward is
    # the plain sum, in which the shaping terms do not cancel)
    discounted_return: float = 0.0
    reward_components: dict[str, float] = field(default_factory=dict)
    governed: bool = False  # the governor rolled this env back during the episode: not a valid result
    key_moments: list[dict[str, Any]] = field(default_factory=list)
    outcome: str = ""
    decisions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "env": self.env,
            "episode": self.episode,
            "trajectory": self.trajectory,
            "final_val_acc": self.final_val_acc,
            "best_val_acc": self.best_val_acc,
            "test_acc": self.test_acc,
            "test_loss": self.test_loss,
            "params_added": self.params_added,
            "fossilized": self.fossilized,
            "culled": self.culled,
            "germinated": self.germinated,
            "total_reward": self.total_reward,
            "discounted_return": self.discounted_return,
            "reward_components": dict(self.reward_components),
            "governed": self.governed,
            "key_moments": [dict(m) for m in self.key_moments],
            "outcome": self.outcome,
        }


class Track:
    """Per-env episode bookkeeping, fed from snapshots: trajectory tokens, key moments,
    decision records, reward sums, best accuracy, germinations."""

    def __init__(self, n: int) -> None:
        self.tokens: list[list[str]] = [[] for _ in range(n)]
        self.moments: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.decisions: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.reward = np.zeros(n)
        self.discounted = np.zeros(n)
        self.components: dict[str, np.ndarray] = {}
        self.best = np.zeros(n)
        self.germinated = np.zeros(n, dtype=np.int64)

    def clear(self, env: int) -> None:
        self.tokens[env] = []
        self.moments[env] = []
        self.decisions[env] = []
        self.reward[env] = 0.0
        self.discounted[env] = 0.0
        self.best[env] = 0.0
        self.germinated[env] = 0
        for v in self.components.values():
            v[env] = 0.0

    def moment(self, env: int, epoch: int, event: str, token: str | None = None, **extra: Any) -> None:
        """A key moment (and its trajectory token, when it has one)."""
        self.moments[env].append({"epoch": epoch, "event": event, **extra})
        if token is not None:
            self.tokens[env].append(token)
