"""The governor (Tolaria in the reference system): one env's divergence never poisons the others.

Every epoch, inside the epoch pipeline and from the epoch's one host snapshot, each env's
health is judged: a non-finite train or validation loss, or a loss above ``max_loss`` (an
explosion), makes the env *sick*. A sick env is rolled back on the device to its last healthy
state: the governor keeps a device copy of Kasmina's state TensorDict (host and seed weights,
momenta, slot lifecycle) and of the env's tracker, refreshed every epoch for the healthy envs
with ``torch.where`` masks (no loop over envs), and restores the sick rows from it. The epoch
counter keeps running, so episodes stay in lockstep: the sick env simply loses that epoch's
update. The env's episode is marked *governed*: an anomaly event names env, epoch and cause,
the episode summary carries the flag, and its accuracy is not reported as a valid result.
Its observation rows for that epoch are zeroed (the policy never sees a NaN) and the step is
flagged ``rolled_back`` (PPO masks it out of GAE and the loss). Its reward is zero but for the
shaping term of the transition that really happened, back to the restored stages
(``gamma * Phi(restored) - Phi(restored)``), so the discounted shaping still telescopes. The
next epoch's group-by-blueprint plan is built from the restored rows (:meth:`Governor.planned`).

A diverging *policy* (non-finite parameters, or collapsed entropy with explained variance far
below zero) is judged once per PPO round, after the update and on the updated policy, by
:func:`policy_divergence`; the trainer then rolls it back to the policy and optimizer state
that collected the round.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase

from esper.leyline import EventKind, SeedStage
from esper.leyline.events import AnomalyEvent
from esper.nissa.materialize import materialize
from esper.simic.env_view import EpochEnv
from esper.tamiyo.masks import MASK_KEYS, action_masks

LOSS_KEYS: tuple[str, ...] = ("signals.train_loss", "signals.val_loss")
DETECTOR = "governor"


KEEP_RUNNING: frozenset[str] = frozenset({"epoch"})  # counters that are never rolled back


def _where_rows(mask: torch.Tensor, new: TensorDictBase, old: TensorDictBase) -> None:
    """``old[mask] = new[mask]`` leaf by leaf, in place (``mask`` is ``[N]`` bool on the device);
    the epoch counter keeps running."""
    for key, o in old.items(include_nested=True, leaves_only=True):
        if key in KEEP_RUNNING or key not in new.keys(include_nested=True, leaves_only=True):
            continue
        m = mask.view(-1, *([1] * (o.dim() - 1)))
        o.copy_(torch.where(m, new.get(key), o))


class Governor:
    """Per-env health judged from the host snapshot; sick envs rolled back on the device."""

    def __init__(self, env: EpochEnv, max_loss: float = 1e4) -> None:
        self.env = env
        self.max_loss = max_loss
        self.n = env.n
        self.good: dict[str, TensorDictBase] = {}  # last healthy rows, per part of the env state
        self.governed = np.zeros(self.n, dtype=bool)  # this episode of the env was rolled back
        self.rollbacks = np.zeros(self.n, dtype=np.int64)  # rollbacks per env, whole run
        # Host copy of the last healthy stage/blueprint rows (from the snapshots, no sync): what a
        # rolled-back env computes next epoch, for the plan and for the rollback's shaping term.
        s = len(env.slots)
        self.good_stage = np.full((self.n, s), int(SeedStage.DORMANT), dtype=np.int64)
        self.good_blueprint = np.zeros((self.n, s), dtype=np.int64)
        self.last_sick = np.zeros(self.n, dtype=bool)

    def _live(self) -> dict[str, TensorDictBase]:
        """The env's per-env state the governor guards: Kasmina's state (weights, momenta,
        lifecycle), the env's signals (Kasmina's last signals) and tracker."""
        env = self.env
        # env.signals shares its tensors with Kasmina's last signals (what the next actions read)
        return {"state": env.kasmina.state, "signals": env.signals, "tracker": env.tracker}

    @torch.no_grad()
    def after_reset(self, mask: torch.Tensor, host_mask: np.ndarray) -> None:
        """Envs in ``mask`` got fresh hosts: those are their last healthy state; their new
        episodes start ungoverned."""
        self.governed[host_mask] = False
        self.good_stage[host_mask] = int(SeedStage.DORMANT)
        self.good_blueprint[host_mask] = 0
        live = self._live()
        if not self.good:
            self.good = {k: v.clone() for k, v in live.items()}
            return
        for k, v in live.items():
            _where_rows(mask, v, self.good[k])

    def sick(self, snap: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """Which envs diverged this epoch, and why (host arithmetic on the snapshot)."""
        sick = np.zeros(self.n, dtype=bool)
        why = [""] * self.n
        for key in LOSS_KEYS:
            value = snap.get(key)
            if value is None:
                continue
            v = np.asarray(value, dtype=np.float64).reshape(self.n)
            with np.errstate(invalid="ignore"):
                bad = ~np.isfinite(v) | (np.abs(v) > self.max_loss)
            for i in np.flatnonzero(bad & ~sick):
                name = key.split(".", 1)[1]
                why[i] = f"{name} {v[i]:.3g}" + ("" if not math.isfinite(v[i]) else f" > {self.max_loss:g}")
            sick |= bad
        return sick, why

    @torch.no_grad()
    def judge(self, snap: dict[str, np.ndarray], out: TensorDictBase, epoch: int) -> list[AnomalyEvent]:
        """After the epoch's materialize: roll sick envs back, keep healthy envs as the new
        last-good copy, sanitize what the policy and the learner see. Anomaly events returned
        (and the snapshot's reward rows of sick envs zeroed, so no summary counts them)."""
        live = self._live()
        sick, why = self.sick(snap)
        self.last_sick = sick
        if not self.good:  # no reset seen (a driver that never reset): start from now
            self.good = {k: v.clone() for k, v in live.items()}
        if not sick.any():  # the common case: refresh the copy, nothing else
            for k, v in live.items():
                self.good[k].update_(v)
            self.good_stage[:] = snap["signals.stage"]
            self.good_blueprint[:] = snap["signals.blueprint"]
            return []
        self.good_stage[~sick] = snap["signals.stage"][~sick]
        self.good_blueprint[~sick] = snap["signals.blueprint"][~sick]
        nonfinite = self.nonfinite_params(sick)  # debug telemetry, before the restore
        mask = torch.as_tensor(sick, device=self.env.device)
        for k, v in live.items():  # healthy rows become the new copy; sick rows are restored
            _where_rows(~mask, v, self.good[k])
            _where_rows(mask, self.good[k], v)
        # What the policy and the learner see of a sick env this epoch: its last healthy
        # signals and tracker, masks from those, a zero observation and a zero reward.
        _where_rows(mask, self.good["signals"], out.get("signals"))
        _where_rows(mask, self.good["tracker"], out.get("tracker"))
        sig = out.get("signals")
        masks = action_masks(sig["stage"], sig["gate_pass"], len(self.env.blueprint_names))
        for key in MASK_KEYS:
            _where_rows(mask, TensorDict({key: masks[key]}, batch_size=[self.n]), out.select(key))
        obs = out.get("observation")
        obs.copy_(torch.where(mask.unsqueeze(-1) | ~torch.isfinite(obs), torch.zeros_like(obs), obs))
        out.get("rolled_back").copy_(mask)
        shaping = self._rollback_shaping(out.get("truncated").reshape(self.n))
        for key in ("reward", *(("reward_components", k) for k in sorted(out.get("reward_components").keys()))):
            r = out.get(key)
            keep = shaping if key in ("reward", ("reward_components", "shaping"), ("reward_components", "total")) \
                else torch.zeros_like(shaping)
            r.copy_(torch.where(mask.view(-1, *([1] * (r.dim() - 1))), keep.view(-1, *([1] * (r.dim() - 1))), r))
        host_shaping = self._rollback_shaping_host(snap["done"].astype(bool))
        for key in snap:
            if key == "reward" or key.startswith("reward_components."):
                keep = host_shaping if key in ("reward", "reward_components.shaping", "reward_components.total") \
                    else 0.0
                snap[key] = np.where(sick, keep, snap[key]).astype(snap[key].dtype)
        self.governed |= sick
        self.rollbacks += sick
        events = []
        offset = getattr(self.env, "env_offset", 0)  # events name the run's env index (sharded runs)
        for i in np.flatnonzero(sick):
            named = ", ".join(f"{k} ({c})" for k, c in nonfinite[i].items()) or "none"
            events.append(AnomalyEvent(
                kind=EventKind.ANOMALY, env=int(i) + offset, epoch=epoch, detector=DETECTOR, severity="severe",
                message=f"env {int(i) + offset} diverged at epoch {epoch} ({why[i]}): rolled back to its last healthy "
                        f"state; this episode is governed (its accuracy is not a valid result); "
                        f"non-finite parameters: {named}",
                payload={"cause": why[i], "action": "rollback", "rollbacks": int(self.rollbacks[i]),
                         "nonfinite_params": nonfinite[i]},
            ))
        return events

    def planned(self, snap: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``stage, blueprint [N, S]`` the envs compute next epoch: the snapshot's rows, and the
        restored rows of the envs rolled back by the last :meth:`judge`."""
        sick = self.last_sick[:, None]
        return (np.where(sick, self.good_stage, snap["signals.stage"]),
                np.where(sick, self.good_blueprint, snap["signals.blueprint"]))

    def _rollback_shaping(self, end: torch.Tensor) -> torch.Tensor:
        """Shaping of a rolled-back epoch, on the device: from the restored stages back to them
        (``gamma * Phi - Phi``; ``-Phi`` at the episode's end, whose potential is 0)."""
        fn = self.env.reward_fn
        phi = fn.phi(self.good["signals"]["stage"])
        return torch.where(end, 0.0, fn.gamma * phi) - phi

    def _rollback_shaping_host(self, end: np.ndarray) -> np.ndarray:
        """The same on the host, from the host copy of the restored stages (no transfer)."""
        fn = self.env.reward_fn
        phi = fn.host_potential[self.good_stage].sum(axis=1, dtype=np.float32) * np.float32(fn.cfg.shaping)
        return np.where(end, np.float32(0.0), np.float32(fn.gamma) * phi) - phi

    @torch.no_grad()
    def nonfinite_params(self, sick: np.ndarray) -> dict[int, dict[str, int]]:
        """Per sick env, the host and seed parameters holding non-finite values (and how many).

        Debug telemetry: runs only in an epoch with a sick env, as one extra transfer."""
        names, counts = [], []
        for part in ("host", "seeds"):
            for key, v in self.env.kasmina.state[part].items(include_nested=True, leaves_only=True):
                if v.is_floating_point():
                    names.append(".".join((part, *(key if isinstance(key, tuple) else (key,)))))
                    counts.append((~torch.isfinite(v)).reshape(v.shape[0], -1).sum(1))
        host = materialize(TensorDict({"nonfinite": torch.stack(counts, dim=1)}, batch_size=[]))["nonfinite"]
        return {int(i): {names[j]: int(host[i, j]) for j in np.flatnonzero(host[i] > 0)} for i in np.flatnonzero(sick)}


def policy_divergence(op_entropy: float, explained_variance: float, nonfinite_params: float,
                      min_entropy: float = 1e-3, min_explained_variance: float = -10.0) -> str | None:
    """Why this round's PPO update diverged (None when it did not), from host numbers of the
    *updated* policy on the round's batch (judging the policy that collected would restore it).

    The rule: the update left ``nonfinite_params`` > 0 non-finite policy weights, or its op-head
    entropy or explained variance is itself non-finite (a NaN loss), or the policy *collapsed*:
    op entropy below ``min_entropy`` (it always picks one op) **and** explained variance below
    ``min_explained_variance`` (the critic predicts far worse than a constant). Either sign
    alone can be a converged policy or a critic catching up; both together is the signature of
    a broken update (issue 15's run: entropy 0, explained variance -1011).
    """
    if nonfinite_params > 0:
        return f"{int(nonfinite_params)} non-finite policy parameters"
    if not math.isfinite(op_entropy) or not math.isfinite(explained_variance):
        return f"non-finite update (op entropy {op_entropy:.3g}, explained variance {explained_variance:.3g})"
    if op_entropy < min_entropy and explained_variance < min_explained_variance:
        return f"collapsed: op entropy {op_entropy:.3g} with explained variance {explained_variance:.3g}"
    return None
