"""Run episodes of any TensorDict policy over the batched env, with Nissa telemetry.

Per epoch the runner does exactly one device-to-host transfer (``esper.nissa.materialize``
of one TensorDict holding everything the summaries and telemetry need); everything else it
reads comes from that host snapshot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.envs.utils import step_mdp

from esper.leyline import (
    LIVE_STAGES,
    DecisionEvent,
    EventKind,
    LifecycleEvent,
    Op,
    SeedStage,
    TelemetryEvent,
)
from esper.nissa import NissaHub, TelemetryConfig, epoch_event, load_profile, materialize
from esper.nissa.profiling import phase
from esper.simic.env import ACTION_KEYS, MorphogeneticEnv
from esper.simic.telemetry import EpochTelemetry
from esper.tamiyo.heuristic import REASONS, Reason

S = SeedStage


class Policy(Protocol):
    """Anything that reads the env TensorDict and writes ``op, slot, blueprint, tempo``.

    It may also write ``reason`` (an index into ``REASONS``) and implement ``reset(mask)``
    (per-env state such as recurrent hidden state or rotation counters).
    """

    def __call__(self, td: TensorDictBase) -> TensorDictBase: ...


@dataclass(slots=True)
class EpisodeSummary:
    """One env's episode, on the host."""

    env: int
    episode: int
    trajectory: str
    final_val_acc: float
    best_val_acc: float
    params_added: float
    fossilized: int
    culled: int
    germinated: int
    total_reward: float
    reward_components: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "env": self.env,
            "episode": self.episode,
            "trajectory": self.trajectory,
            "final_val_acc": self.final_val_acc,
            "best_val_acc": self.best_val_acc,
            "params_added": self.params_added,
            "fossilized": self.fossilized,
            "culled": self.culled,
            "germinated": self.germinated,
            "total_reward": self.total_reward,
            "reward_components": dict(self.reward_components),
        }


class _Track:
    """Host-side per-env episode bookkeeping, fed from snapshots."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.tokens: list[list[str]] = [[] for _ in range(n)]
        self.reward = np.zeros(n)
        self.components: dict[str, np.ndarray] = {}
        self.best = np.zeros(n)
        self.germinated = np.zeros(n, dtype=np.int64)

    def clear(self, env: int) -> None:
        self.tokens[env] = []
        self.reward[env] = 0.0
        self.best[env] = 0.0
        self.germinated[env] = 0
        for v in self.components.values():
            v[env] = 0.0


class EpisodeRunner:
    """Runs ``episodes`` episodes per env of ``policy`` on ``env``, emitting telemetry."""

    def __init__(
        self,
        env: MorphogeneticEnv,
        policy: Policy,
        hub: NissaHub | None = None,
        profile: TelemetryConfig | None = None,
        reasons: tuple[str, ...] = REASONS,
        on_epoch: Callable[[int, dict[str, np.ndarray]], None] | None = None,
    ) -> None:
        self.env = env
        self.policy = policy
        self.hub = hub
        self.profile = profile if profile is not None else load_profile("minimal")
        self.telemetry = EpochTelemetry(self.profile, env.kasmina)
        self.reasons = reasons
        self.on_epoch = on_epoch
        self.syncs = 0
        self._episodes = 0

    def _reset_policy(self, mask: torch.Tensor) -> None:
        reset = getattr(self.policy, "reset", None)
        if callable(reset):
            reset(mask)

    def _emit(self, event: TelemetryEvent) -> None:
        if self.hub is not None:
            self.hub.emit(event)

    def run(self, episodes: int) -> list[EpisodeSummary]:
        env, n = self.env, self.env.n
        self._episodes = episodes
        td = env.reset()
        self._reset_policy(torch.ones(n, dtype=torch.bool, device=env.device))
        track = _Track(n)
        done_episodes = np.zeros(n, dtype=np.int64)
        summaries: list[EpisodeSummary] = []
        step = 0
        self._prev_contribution = np.zeros((n, len(env.slots)))
        while (done_episodes < episodes).any():
            env.capture = self.telemetry.begin_epoch(step)
            with phase("policy"):
                td = self.policy(td)
            if "reason" not in td:
                td.set("reason", torch.full((n,), -1, dtype=torch.long, device=env.device))
            td = env.step(td)
            nxt = td["next"]
            with phase("telemetry"):
                packet = TensorDict(
                    {
                        "action": td.select(*ACTION_KEYS, "reason"),
                        "signals": nxt["signals"],
                        "tracker": nxt["tracker"].select("plateau_epochs", "seeds_fossilized", "seeds_culled"),
                        "reward": nxt["reward"].squeeze(-1),
                        "reward_components": nxt["reward_components"],
                        "done": nxt["done"].squeeze(-1),
                        "diag": self.telemetry.diagnostics(nxt["signals"]),
                    },
                    batch_size=[n],
                )
                snap = materialize(packet)  # the one device-to-host transfer of this epoch
                self.syncs += 1
            # Group-by-blueprint for the next epoch from this snapshot (eager engines only).
            env.kasmina.set_plan(snap["signals.stage"], snap["signals.blueprint"], snap["signals.germinated"])
            step += 1
            with phase("telemetry"):
                self._record(snap, track, done_episodes, summaries)
            if self.on_epoch is not None:
                self.on_epoch(step, snap)
            td = step_mdp(td)
            done = snap["done"]
            if done.any():
                self.telemetry.episode_restarted(done)
                mask = torch.as_tensor(done, device=env.device)
                td.set("_reset", mask.unsqueeze(-1))
                td = env.reset(td)
                self._reset_policy(mask)
        self.analytics_table = self.telemetry.analytics.summary()
        self._emit(self.telemetry.analytics.to_event(step))
        return summaries

    # ------------------------------------------------------------------------- host side
    def _record(
        self,
        snap: dict[str, np.ndarray],
        track: _Track,
        done_episodes: np.ndarray,
        summaries: list[EpisodeSummary],
    ) -> None:
        env = self.env
        n = env.n
        epoch = snap["signals.epoch"]
        self._emit(epoch_event(snap, int(epoch.max())))
        stage_now = snap["signals.stage"]
        free_slots = (stage_now == S.DORMANT).sum(axis=1)
        for event in self.telemetry.epoch_events(self.telemetry.host_view(snap), int(epoch.max()), free_slots):
            self._emit(event)
        contribution = snap["signals.contribution"]
        kas = env.kasmina
        op, slot = snap["action.op"], snap["action.slot"]
        bp, tempo, reason = snap["action.blueprint"], snap["action.tempo"], snap["action.reason"]
        accepted = snap["signals.action_accepted"]
        stage, before = snap["signals.stage"], snap["signals.stage_before"]
        blueprint = snap["signals.blueprint"]
        val_acc = snap["signals.val_acc"]
        track.reward += snap["reward"]
        for key, value in snap.items():
            if key.startswith("reward_components."):
                name = key.split(".", 1)[1]
                track.components.setdefault(name, np.zeros(n))
                track.components[name] += value
        track.best = np.maximum(track.best, val_acc)
        for i in range(n):  # host-side bookkeeping on the materialized snapshot
            e = int(epoch[i])
            why = self.reasons[int(reason[i])] if 0 <= int(reason[i]) < len(self.reasons) else ""
            action = env.describe(int(op[i]), int(slot[i]), int(bp[i]), int(tempo[i]))
            decision = DecisionEvent(kind=EventKind.DECISION, env=i, epoch=e, action=action,
                                     accepted=bool(accepted[i]), reason=why)
            self._emit(decision)
            if int(op[i]) != Op.WAIT:
                self._emit(self.telemetry.explain(decision, why))
            if int(op[i]) == Op.GERMINATE and bool(accepted[i]):
                track.germinated[i] += 1
                if int(reason[i]) == Reason.GERMINATE_PLATEAU:
                    track.tokens[i].append("plateau")
                track.tokens[i].append(
                    f"germinate({env.blueprint_names[int(bp[i])]}@{env.slots[int(slot[i])]})"
                )
            for k in np.nonzero(stage[i] != before[i])[0]:
                src, dst = S(int(before[i, k])), S(int(stage[i, k]))
                # Culls pass CULLED -> EMBARGOED and germinations GERMINATED -> TRAINING within
                # one epoch; report the decisive step.
                if dst is S.EMBARGOED and src in LIVE_STAGES:
                    dst = S.CULLED
                if src is S.DORMANT and dst is S.TRAINING:
                    dst = S.GERMINATED
                name = env.blueprint_names[int(blueprint[i, k])]
                payload: dict[str, float] = {"val_acc": float(val_acc[i])}
                if dst is S.GERMINATED:
                    c = kas.arch.spec.slot_channels(env.slots[k])
                    hw = kas.arch.spec.slot_spatial(env.slots[k], kas.task.image_shape[1]) ** 2
                    bp_obj = kas.arch.blueprints[int(blueprint[i, k])]
                    payload |= {"params": float(bp_obj.param_count(c)), "flops": float(bp_obj.flops(c, hw))}
                if dst in (S.FOSSILIZED, S.CULLED):
                    payload["accuracy_delta"] = float(self._prev_contribution[i, k])
                event = LifecycleEvent(
                    kind=EventKind.LIFECYCLE, env=i, epoch=e, slot=env.slots[k], blueprint=name,
                    from_stage=src.name, to_stage=dst.name, payload=payload,
                )
                self._emit(event)
                self.telemetry.lifecycle(event, [i] if dst is S.FOSSILIZED else [])
                token = {S.BLENDING: "blend", S.FOSSILIZED: "fossilize", S.CULLED: "cull"}.get(dst)
                if token is not None:
                    track.tokens[i].append(f"{token}({env.slots[k]})" if token != "blend" else token)
            if bool(snap["done"][i]) and done_episodes[i] < self._episodes:
                summary = EpisodeSummary(
                    env=i,
                    episode=int(done_episodes[i]),
                    trajectory=" → ".join(track.tokens[i]) or "no growth",
                    final_val_acc=float(val_acc[i]),
                    best_val_acc=float(track.best[i]),
                    params_added=float(snap["signals.params_added"][i]),
                    fossilized=int(snap["tracker.seeds_fossilized"][i]),
                    culled=int(snap["tracker.seeds_culled"][i]),
                    germinated=int(track.germinated[i]),
                    total_reward=float(track.reward[i]),
                    reward_components={k: float(v[i]) for k, v in track.components.items()},
                )
                summaries.append(summary)
                self._emit(TelemetryEvent(kind=EventKind.EPISODE, env=i, epoch=e, payload=summary.to_dict()))
                done_episodes[i] += 1
            if bool(snap["done"][i]):
                track.clear(i)
        # The latest measured contribution per slot: what a fossilize or cull decided on.
        measured = snap["signals.alpha"] > 0
        self._prev_contribution = np.where(
            measured, contribution, np.where(stage == S.DORMANT, 0.0, self._prev_contribution)
        )
