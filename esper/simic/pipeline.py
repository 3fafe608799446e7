"""The one epoch pipeline every controller runs, inside the env's step.

actions -> train -> validate (counterfactuals) -> gates -> signals -> reward -> ONE materialize
-> telemetry (diagnostics, narratives, anomalies, decisions, lifecycle, episodes) -> plan.

Kasmina does the first half on the device; :class:`EpochPipeline` does the rest. Because it
runs inside :meth:`MorphogeneticEnv._step`, every driver (the episode runner, torchrl's
``Collector`` during PPO, ``env.rollout``) gets the same telemetry profile, the same
group-by-blueprint plan, the same held-out test scoring and the same transfer count.

Test accuracy is scored on the test split when an episode ends (known on the host from the
previous snapshot, so deciding costs no sync); it rides in the epoch's one transfer and lands
in the episode summary, never in anything a controller reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase

from esper.leyline import (
    LIVE_STAGES,
    REASONS,
    SCORE_KEYS,
    DecisionEvent,
    EventKind,
    LifecycleEvent,
    Op,
    Reason,
    SeedStage,
    TelemetryEvent,
)
from esper.nissa import NissaHub, TelemetryConfig, epoch_event, load_profile, materialize
from esper.nissa.decisions import Hindsight, decision_context
from esper.nissa.narratives import reason_text
from esper.nissa.profiling import phase
from esper.simic.env_view import EpochEnv
from esper.simic.episodes import EpisodeSummary, Track, outcome
from esper.simic.governor import Governor
from esper.simic.telemetry import EpochTelemetry

if TYPE_CHECKING:
    from esper.leyline.events import AnomalyEvent

S = SeedStage
EpochCallback = Callable[[int, dict[str, np.ndarray]], None]


class SnapshotView(Protocol):
    """The run's view of an epoch when its envs are sharded over ranks
    (:class:`esper.simic.sharding.GlobalSnapshots`): ``envs`` in all, and the gather of every
    rank's snapshot, rollback events and governed flags, in env order."""

    envs: int

    def __call__(self, snap: dict[str, np.ndarray], rollbacks: list[AnomalyEvent],
                 governed: np.ndarray) -> tuple[dict[str, np.ndarray], list[AnomalyEvent], np.ndarray]: ...


class EpochPipeline:
    """The host half of every epoch of one env: captures, scoring, transfer, telemetry, plan."""

    def __init__(self, env: EpochEnv, profile: TelemetryConfig | None = None,
                 hub: NissaHub | None = None) -> None:
        self.env = env
        self.reasons: tuple[str, ...] = REASONS
        self.callbacks: list[EpochCallback] = []
        self.governor = Governor(env)  # judges every epoch's snapshot; rolls diverging envs back
        self.view: SnapshotView | None = None  # sharded run: the host half sees every rank's envs
        self.configure(profile=profile, hub=hub)

    def shard(self, view: SnapshotView) -> None:
        """Record and report the whole run's envs (gathered by ``view``) from now on."""
        self.view = view
        self.configure(profile=self.profile, hub=self.hub)

    def configure(self, profile: TelemetryConfig | None = None, hub: NissaHub | None = None) -> None:
        """(Re)start the pipeline's telemetry with ``profile`` (minimal if None) into ``hub``."""
        n, s = self.env.n, len(self.env.slots)
        run_n = self.view.envs if self.view is not None else n  # envs the host bookkeeping covers
        self.hub = hub
        self.profile = profile if profile is not None else load_profile("minimal")
        self.telemetry = EpochTelemetry(self.profile, self.env.kasmina, envs=run_n)
        self.hindsight = Hindsight(run_n, self.profile.hindsight_epochs, self.env.slots)
        self.track = Track(run_n)
        self._seen: list = []  # the narratives of the epoch this epoch's decisions were made from
        self.summaries: list[EpisodeSummary] = []
        self.epochs = 0  # epochs run by this pipeline (all envs step together)
        self.transfers = 0  # device-to-host transfers it made (materialize calls)
        self.host_epoch = np.zeros(n, dtype=np.int64)  # >= each env's true epoch, no sync needed
        self.host_done = np.zeros(n, dtype=bool)  # done flags of the last snapshot
        self._reset_mask = np.ones(n, dtype=bool)  # envs of the last reset (host side)
        self.episode = np.zeros(run_n, dtype=np.int64)  # episode index per env, from the snapshot
        self.completed = np.zeros(run_n, dtype=np.int64)  # finished episodes per env
        self.last: dict[str, np.ndarray] = {}
        self._governed = np.zeros(run_n, dtype=bool)
        self._prev_contribution = np.zeros((run_n, s))

    def _emit(self, event: TelemetryEvent) -> None:
        if self.hub is not None:
            self.hub.emit(event)

    # ------------------------------------------------------------------------- device side
    def begin(self) -> tuple[frozenset[str], bool]:
        """Kasmina's captures for this epoch's profile, and whether any episode ends now."""
        capture = self.telemetry.begin_epoch(self.epochs)
        test = bool((self.host_epoch + 1 >= self.env.episode_length).any())
        return capture, test

    def on_reset(self, full: bool) -> None:
        """Envs were reset: all of them, or (a torchrl partial reset) those that were done."""
        mask = np.ones_like(self.host_done) if full else self.host_done.copy()
        self.host_epoch[mask] = 0
        self.host_done[mask] = False
        self._reset_mask = mask

    def after_reset(self, mask: torch.Tensor) -> None:
        """The reset envs' fresh state (``mask`` on the device, the same envs as the last
        :meth:`on_reset` on the host) is their last healthy one, for the governor."""
        self.governor.after_reset(mask, self._reset_mask)

    def end(self, actions: TensorDictBase, raw: TensorDictBase, out: TensorDictBase,
            decided: TensorDictBase | None = None) -> dict[str, np.ndarray]:
        """Materialize the epoch (one transfer), then telemetry and the next epoch's plan.
        ``decided``: what the controller decided from (``MorphogeneticEnv._decided``), for the
        decisions' context; it rides in the same transfer."""
        n, kas = self.env.n, self.env.kasmina
        with phase("telemetry"):
            packet = TensorDict(
                {
                    "action": actions,
                    "signals": out["signals"],
                    "tracker": out["tracker"].select("plateau_epochs", "seeds_fossilized", "seeds_culled"),
                    "reward": out["reward"].squeeze(-1),
                    "reward_components": out["reward_components"],
                    "done": out["done"].squeeze(-1),
                    "episode": kas.episode,
                    "diag": self.telemetry.diagnostics(raw),
                },
                batch_size=[n],
            )
            if SCORE_KEYS[0] in raw:
                packet.set("score", raw.select(*SCORE_KEYS))
            if decided is not None:
                packet.set("decided", decided)
            snap = materialize(packet)  # the one device-to-host transfer of this epoch
            rollbacks = self.governor.judge(snap, out, int(snap["signals.epoch"].max()))
        self.transfers += 1
        self.epochs += 1
        self.host_epoch = snap["signals.epoch"].astype(np.int64)
        self.host_done = snap["done"].astype(bool)
        # This epoch's germinations get fresh seeds (named by the snapshot: no mask crosses
        # to the host, no index list to the device), then group-by-blueprint for the next.
        kas.reinit_germinated(snap["signals.germinated"], snap["signals.blueprint"])
        # The plan from the rows the envs compute next: a rolled-back env's restored seeds.
        kas.set_plan(*self.governor.planned(snap), snap["signals.germinated"])
        self._governed = self.governor.governed
        if self.view is not None:  # sharded: from here on, every rank's envs (one collective)
            snap, rollbacks, self._governed = self.view(snap, rollbacks, self._governed)
        self.last = snap
        with phase("telemetry"):
            for event in rollbacks:
                self._emit(event)
                self.track.moment(event.env, event.epoch, "rollback", f"rollback@{event.epoch}")
            self._record(snap)
            if self.hub is not None:
                self.hub.flush()  # every finished epoch is on disk (survives SIGKILL)
        for callback in self.callbacks:
            callback(self.epochs, snap)
        return snap

    # ------------------------------------------------------------------------- host side
    def _record(self, snap: dict[str, np.ndarray]) -> None:
        track = self.track
        n = len(track.reward)  # envs recorded: the whole run's when sharded
        fresh = snap["episode"].astype(np.int64) != self.episode
        if fresh.any():  # envs on a new host: bookkeeping and anomaly baselines start over
            for i in np.flatnonzero(fresh):
                track.clear(int(i))
            self.telemetry.episode_restarted(fresh)
            self.episode = snap["episode"].astype(np.int64)
        epoch = snap["signals.epoch"]
        self._emit(epoch_event({k: v for k, v in snap.items() if not k.startswith("decided.")}, int(epoch.max())))
        stage = snap["signals.stage"]
        free_slots = (stage == S.DORMANT).sum(axis=1)
        self._seen = list(getattr(self.telemetry, "briefs", []))  # before this epoch's replace them
        for event in self.telemetry.epoch_events(self.telemetry.host_view(snap), int(epoch.max()), free_slots):
            self._emit(event)
        val_acc = snap["signals.val_acc"]
        track.reward += snap["reward"]
        track.discounted += self.env.reward_fn.gamma ** (epoch.astype(np.float64) - 1) * snap["reward"]
        for key, value in snap.items():
            if key.startswith("reward_components."):
                name = key.split(".", 1)[1]
                track.components.setdefault(name, np.zeros(n))
                track.components[name] += value
        track.best = np.maximum(track.best, val_acc)
        for i in range(n):  # host-side bookkeeping on the materialized snapshot
            self._record_env(snap, i)
        for event in self.hindsight.check(snap, self.episode):
            self._emit(event)
        for i in np.flatnonzero(snap["done"]):  # after the hindsight: an episode's event closes it
            self._finish_episode(snap, int(i))
        # The latest measured contribution per slot: what a fossilize or cull decided on.
        measured = snap["signals.alpha"] > 0
        self._prev_contribution = np.where(
            measured, snap["signals.contribution"],
            np.where(stage == S.DORMANT, 0.0, self._prev_contribution),
        )

    def _record_env(self, snap: dict[str, np.ndarray], i: int) -> None:
        env, track, kas = self.env, self.track, self.env.kasmina
        e = int(snap["signals.epoch"][i])
        op, slot, bp = int(snap["action.op"][i]), int(snap["action.slot"][i]), int(snap["action.blueprint"][i])
        reason = int(snap["action.reason"][i])
        accepted = bool(snap["signals.action_accepted"][i])
        stage, before = snap["signals.stage"][i], snap["signals.stage_before"][i]
        val_acc = float(snap["signals.val_acc"][i])
        if self.hub is not None:
            self._decision(snap, i, e, op, slot, bp, reason, accepted)
        if op == Op.GERMINATE and accepted:
            track.germinated[i] += 1
            if reason == Reason.GERMINATE_PLATEAU:  # seen in the epoch the controller decided from
                track.moment(i, e - 1, "plateau_detected", "plateau")
            track.moment(i, e, "germinate", f"germinate({env.blueprint_names[bp]}@{env.slots[slot]})",
                         slot=env.slots[slot], blueprint=env.blueprint_names[bp])
        for k in np.nonzero(stage != before)[0]:
            src, dst = S(int(before[k])), S(int(stage[k]))
            # Culls pass CULLED -> EMBARGOED and germinations GERMINATED -> TRAINING within
            # one epoch; report the decisive step.
            if dst is S.EMBARGOED and src in LIVE_STAGES:
                dst = S.CULLED
            if src is S.DORMANT and dst is S.TRAINING:
                dst = S.GERMINATED
            name = env.blueprint_names[int(snap["signals.blueprint"][i, k])]
            payload: dict[str, float] = {"val_acc": val_acc}
            if dst is S.GERMINATED:
                c = kas.arch.spec.slot_channels(env.slots[k])
                hw = kas.arch.spec.slot_positions(env.slots[k], kas.sample_shape)
                bp_obj = kas.arch.blueprints[int(snap["signals.blueprint"][i, k])]
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
            if token == "blend":
                track.moment(i, e, token, token, slot=env.slots[k])
            elif token is not None:
                delta = payload["accuracy_delta"]
                track.moment(i, e, token, f"{token}({env.slots[k]})", slot=env.slots[k], blueprint=name,
                             improvement=f"{delta:+.1f}%", accuracy_delta=delta)

    def _finish_episode(self, snap: dict[str, np.ndarray], i: int) -> None:
        """Env ``i``'s episode ended this epoch: its summary and episode event."""
        track = self.track
        e, val_acc = int(snap["signals.epoch"][i]), float(snap["signals.val_acc"][i])
        test_acc = snap.get("score.test_acc")
        test_loss = snap.get("score.test_loss")
        summary = EpisodeSummary(
            env=i,
            episode=int(self.completed[i]),
            trajectory=" → ".join(track.tokens[i]) or "no growth",
            final_val_acc=val_acc,
            best_val_acc=float(track.best[i]),
            test_acc=float(test_acc[i]) if test_acc is not None else float("nan"),
            test_loss=float(test_loss[i]) if test_loss is not None else float("nan"),
            params_added=float(snap["signals.params_added"][i]),
            fossilized=int(snap["tracker.seeds_fossilized"][i]),
            culled=int(snap["tracker.seeds_culled"][i]),
            germinated=int(track.germinated[i]),
            total_reward=float(track.reward[i]),
            discounted_return=float(track.discounted[i]),
            reward_components={k: float(v[i]) for k, v in track.components.items()},
            governed=bool(self._governed[i]),
            key_moments=list(track.moments[i]),
            outcome=outcome(int(track.germinated[i]), int(snap["tracker.seeds_fossilized"][i]),
                            int(snap["tracker.seeds_culled"][i]), bool(self._governed[i])),
            decisions=track.decisions[i],
        )
        self.summaries.append(summary)
        self._emit(TelemetryEvent(kind=EventKind.EPISODE, env=i, epoch=e, payload=summary.to_dict()))
        self.completed[i] += 1

    def _decision(self, snap: dict[str, np.ndarray], i: int, e: int, op: int, slot: int, bp: int, reason: int,
                  accepted: bool) -> None:
        """Env ``i``'s decision event with its context, its record for the pack, and its hindsight."""
        env = self.env
        why = self.reasons[reason] if 0 <= reason < len(self.reasons) else ""
        tempo = int(snap["action.tempo"][i])
        action = env.describe(op, slot, bp, tempo)
        decided = {k[len("decided."):]: v[i] for k, v in snap.items() if k.startswith("decided.")}
        brief = self._seen[i] if e > 1 and i < len(self._seen) else None  # none before an episode's first epoch
        context = decision_context(op, reason_text(why) if why else "", decided, env.slots, brief) if decided else {}
        decision = DecisionEvent(kind=EventKind.DECISION, env=i, epoch=e, action=action,
                                 accepted=accepted, reason=why, payload={"context": context} if context else {})
        self._emit(decision)
        record = {
            "epoch": e,
            "action": {"op": Op(op).name.lower(), "slot": env.slots[slot], "blueprint": env.blueprint_names[bp],
                       "tempo": tempo, "text": action, "accepted": accepted, "reason": why},
            "decision_context": context,
            "hindsight": None,
        }
        self.track.decisions[i].append(record)
        if decided:
            self.hindsight.record(i, int(self.episode[i]), e, op, slot, action, float(decided["val_acc"]),
                                  accepted, record)
        if op != Op.WAIT:
            self._emit(self.telemetry.explain(decision, why))

    def finish(self) -> None:
        """Emit the run's blueprint analytics (call once at the end of a run)."""
        self._emit(self.telemetry.analytics.to_event(self.epochs))

    def take_summaries(self) -> list[EpisodeSummary]:
        """Episode summaries finished since the last call (oldest first)."""
        out, self.summaries = self.summaries, []
        return out


def reason_or_unknown(td: TensorDictBase, n: int, device: torch.device) -> torch.Tensor:
    """The policy's ``reason`` codes, or -1 (no reason given) for policies that write none."""
    reason = td.get("reason", None)
    if reason is None:
        return torch.full((n,), -1, dtype=torch.long, device=device)
    return reason.reshape(n).long()

