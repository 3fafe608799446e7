"""The PPO trainer: owns the networks, the schedule, the guard and the checkpoints; a round
itself is :func:`esper.simic.ppo_round.ppo_round`.

The guard judges the updated policy on the round's batch
(:func:`~esper.simic.governor.policy_divergence`) and replaces a diverged one by the policy that
collected the round. Telemetry (:class:`RoundTelemetry`) and the policy fault drill
(:class:`PolicyDrill`) attach to every round as hooks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from torch.nn.parallel import DistributedDataParallel
from torchrl.envs import Compose, InitTracker
from torchrl.modules.value_norm import RunningValueNorm

from esper.leyline import EventKind, TelemetryEvent
from esper.leyline.events import AnomalyEvent
from esper.nissa import AnomalyMonitor, NissaHub, TelemetryConfig
from esper.nissa.anomaly import PPO_SCOPE
from esper.simic.checkpoint import (
    CHECKPOINT_VERSION,
    check_matches,
    check_resumable,
    load_checkpoint,
    provenance,
    save_checkpoint,
)
from esper.simic.config import TrainingConfig
from esper.simic.distributed import Ranks
from esper.simic.env import MorphogeneticEnv
from esper.simic.faults import checkpoint_saver, poison_policy
from esper.simic.governor import policy_divergence
from esper.simic.ppo_loss import (
    WAIT_BIAS,
    FactoredPPOLoss,
    RecurrentEnv,
    StepMaskedGAE,
    policy_shape,
)
from esper.simic.ppo_ranks import ShardedLearner
from esper.simic.ppo_round import RoundHook, RoundParts, RoundResult, RoundStats, ppo_round
from esper.simic.runner import collector_for
from esper.simic.sampling import keyed_actor
from esper.simic.sharding import run_env
from esper.tamiyo.lstm_policy import HEAD_KEYS, TamiyoModules

Snapshot = tuple[dict[str, torch.Tensor], dict[str, Any]]  # policy and optimizer state, on the device


class PPOTrainer:
    """Builds the env, the LSTM actor-critic, ClipPPOLoss, GAE and Adam; runs rounds
    (:func:`~esper.simic.ppo_round.ppo_round`) on its schedule, rolls a diverged update back,
    and checkpoints. ``hooks`` attach to every round (telemetry, fault drills)."""

    def __init__(
        self, cfg: TrainingConfig, env: MorphogeneticEnv | None = None, hub: NissaHub | None = None,
        profile: TelemetryConfig | None = None, ranks: Ranks | None = None, share: PPOTrainer | None = None,
    ) -> None:
        """``share``: train the same controller as that trainer (its networks, value and observation
        normalizers, optimizer) on this trainer's setting (``simic.mix``)."""
        self.cfg = cfg
        self.hub = hub
        self.monitor = AnomalyMonitor()  # value collapse, ratio explosion, LSTM health, drift
        p = cfg.ppo
        torch.manual_seed(cfg.episode.seed)
        if env is None:  # under torchrun: this rank's block of envs, on its own device
            env = run_env(cfg, ranks, profile=profile, hub=hub)
        self.base_env = env
        self.device = self.base_env.device
        self.ranks = ranks if ranks is not None else Ranks(device=self.device)
        total = cfg.episode.envs if self.ranks.world > 1 else env.n
        self.learner = ShardedLearner(self.ranks, env.env_offset, env.n, total)
        self.shape = policy_shape(cfg, self.base_env)
        if share is not None:
            check_matches("the first setting", "policy shape", asdict(share.shape), asdict(self.shape))
            self.value_norm, self.modules = share.value_norm, share.modules
            if share.base_env.features.norm is not None:
                self.base_env.features.norm = share.base_env.features.norm
        else:
            self.value_norm = RunningValueNorm(shape=1, device=self.device)
            self.modules = TamiyoModules(self.shape, self.value_norm, wait_bias=WAIT_BIAS).to(self.device)
        self.modules.use_blueprints(env.blueprint_names)
        self.env = RecurrentEnv(self.base_env, Compose(InitTracker(), self.modules.primer()))
        # Actions drawn from per-env keyed noise: env i samples alike on any rank (simic.sampling).
        self.collector = collector_for(self.env, keyed_actor(self.modules, env.kasmina, cfg.episode.seed),
                                       episodes=-1)
        self.batches = iter(self.collector)
        self.gae = StepMaskedGAE(gamma=p.gamma, lmbda=p.gae_lambda, value_network=self.modules.critic,
                       shifted=True, deactivate_vmap=True)
        self.loss = FactoredPPOLoss(
            self.modules.actor,
            self.modules.critic,
            value_norm=self.value_norm,
            clip_epsilon=p.clip_epsilon,
            entropy_coeff={f"{h}_entropy": float(p.entropy_coef.get(h, 0.0)) for h in HEAD_KEYS},
            critic_coeff=p.value_coef,
            loss_critic_type="l2",
            normalize_advantage=False,  # per minibatch over all ranks' envs, in update (ppo_ranks)
            functional=False,
        )
        self.params = [q for q in self.modules.parameters() if q.requires_grad]
        # RL health reports the actor's and the critic's gradient norms apart (one can explode alone).
        self.actor_params = [q for q in self.modules.actor.parameters() if q.requires_grad]
        self.critic_params = [q for q in self.modules.critic.parameters() if q.requires_grad]
        self.optimizer = share.optimizer if share is not None else torch.optim.Adam(self.params, lr=p.lr, eps=1e-5)
        self.shuffle = torch.Generator().manual_seed(cfg.episode.seed + 1)
        self.round = 0
        self.horizon = p.rounds  # rounds the lr/entropy schedules decay over; a resume keeps its run's
        self.history: list[dict[str, Any]] = []
        self.init_from: str | None = None  # the checkpoint this run started from (--init)
        self.lineage: list[dict[str, Any]] = []  # that checkpoint's own provenance / offline record
        self.hooks: list[RoundHook] = [PolicyDrill(cfg)]  # the drill first: telemetry sees its round
        if hub is not None:
            self.hooks.append(RoundTelemetry(hub))
        self.loss_fn: Callable[[TensorDictBase], TensorDictBase] = self.loss
        if self.ranks.world > 1:  # gradients averaged over ranks in backward; the buffers (value
            # normalizer) are updated alike on every rank from gathered targets, not re-sent per forward
            self.loss_fn = DistributedDataParallel(self.loss, forward_sync_buffers=False)
        # ``compile`` compiles the env's training step, not this loss: measured on the CPU (16 envs
        # x 20 epochs), compiling it took 78 s cold to save 0.06 s per update (0.25 -> 0.19 s).

    # ------------------------------------------------------------------------- rounds
    def schedule(self) -> dict[str, float]:
        """This round's learning rate and entropy scale: linear from 1 to their final
        fractions over the run's first ``ppo.rounds`` (``horizon``, stored in the checkpoint: a
        run resumed with more rounds stays at the final fractions instead of jumping back)."""
        p = self.cfg.ppo
        progress = min(self.round / max(self.horizon - 1, 1), 1.0)
        return {
            "lr": p.lr * (1.0 - (1.0 - p.lr_final_frac) * progress),
            "entropy_scale": 1.0 - (1.0 - p.entropy_final_frac) * progress,
        }

    def train_round(self) -> RoundStats:
        """One round (:func:`~esper.simic.ppo_round.ppo_round`), judged after its update: a
        collapsing update is undone in the round it happens, back to the policy that collected
        (judged healthy a round ago). The round counter advances."""
        self.modules.use_blueprints(self.base_env.blueprint_names)  # shared networks: this setting's set
        previous = self._snapshot()  # what a diverged update is rolled back to
        result = ppo_round(self, self.round + 1, self.schedule(), self.hooks)
        self.round += 1
        stats = result.stats
        stats.rolled_back = self._guard(result, previous)
        stats.anomalies = [a.message for a in result.anomalies]
        self.history.append(asdict(stats))
        for hook in self.hooks:
            hook.after_round(result)
        return stats

    def _guard(self, result: RoundResult, previous: Snapshot) -> str | None:
        """Why the updated policy diverged (None when it did not); a diverged one is replaced
        by ``previous`` and the rollback reported as an anomaly."""
        m = result.metrics
        why = policy_divergence(m["judged_op_entropy"], m["judged_explained_variance"], m["policy_nonfinite"])
        if why is not None:
            self._restore(previous)
            result.anomalies.append(AnomalyEvent(
                kind=EventKind.ANOMALY, epoch=self.round, detector="policy_governor", severity="severe",
                message=f"the policy update of round {self.round} diverged ({why}): rolled back "
                        f"to the policy and optimizer state of round {self.round - 1}",
                payload={"scope": PPO_SCOPE, "cause": why, "action": "rollback"},
            ))
        return why

    def _snapshot(self) -> Snapshot:
        """Device copies of the policy (value normalizer included) and the optimizer state."""
        return ({k: v.detach().clone() for k, v in self.modules.state_dict().items()},
                copy.deepcopy(self.optimizer.state_dict()))

    def _restore(self, snapshot: Snapshot) -> None:
        modules, optimizer = snapshot
        self.modules.load_state_dict(modules)
        self.optimizer.load_state_dict(optimizer)


    def train(self, rounds: int, on_round: Callable[[RoundStats], None] | None = None,
              save: str | Path | None = None) -> list[RoundStats]:
        """Run until ``rounds`` rounds are done in total (a resumed run continues its count)."""
        out = []
        while self.round < rounds:
            stats = self.train_round()
            out.append(stats)
            if on_round is not None:
                on_round(stats)
            if save is not None:
                self.save(save)
        return out

    # ------------------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        norm = self.base_env.features.norm
        return {
            "version": CHECKPOINT_VERSION,
            "round": self.round,
            "schedule_rounds": self.horizon,
            "config": self.cfg.model_dump(mode="json"),
            "policy_shape": asdict(self.shape),
            "modules": self.modules.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "obs_norm": norm.state_dict() if norm is not None else {},
            # every env's episode counter (gathered from all ranks: a collective, so every rank calls this)
            "env_episode": self.learner.gather_rows(self.base_env.kasmina.episode.clone(), "checkpoint"),
            "rng": {"torch": torch.get_rng_state(), "shuffle": self.shuffle.get_state()},
            "history": list(self.history),
            # what made it: this run's command and code, and the checkpoint it started from
            # (an offline one records its data pack)
            "provenance": {**provenance(), "init_from": self.init_from, "lineage": self.lineage},
        }

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint atomically (an OSError leaves the previous one in place).
        Every rank calls this; rank 0 alone writes."""
        state = self.state()
        if not self.ranks.main:
            return Path(path)
        save = checkpoint_saver(self.cfg.faults, self.round) or save_checkpoint  # drill: disk full
        return save(path, state)

    def resume(self, path: str | Path) -> None:
        """Continue the run stored in ``path`` (same round counter, weights, optimizer, RNG)."""
        ckpt = load_checkpoint(path)
        check_matches(path, "policy shape", ckpt["policy_shape"], asdict(self.shape))
        check_resumable(path, ckpt, self.cfg, self.learner.total)
        self.modules.load_state_dict(ckpt["modules"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        norm = self.base_env.features.norm
        if norm is not None:
            norm.load_state_dict(ckpt["obs_norm"])
        mine = slice(self.learner.offset, self.learner.offset + self.learner.count)  # this rank's envs
        self.base_env.kasmina.episode = ckpt["env_episode"][mine].to(self.device)
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.shuffle.set_state(ckpt["rng"]["shuffle"])
        self.round = int(ckpt["round"])
        self.horizon = int(ckpt.get("schedule_rounds", ckpt["config"]["ppo"]["rounds"]))
        self.history = list(ckpt["history"])
        saved_prov = ckpt.get("provenance") or {}
        self.init_from = saved_prov.get("init_from")
        self.lineage = list(saved_prov.get("lineage", []))

    def init(self, path: str | Path) -> None:
        """Start from the actor/critic weights (value normalizer included) and observation
        normalizer of ``path`` (a PPO or offline checkpoint, e.g. ``esper.train --policy bc``);
        a fresh run otherwise: new optimizer, round 0, empty history."""
        ckpt = load_checkpoint(path)
        check_matches(path, "policy shape", ckpt["policy_shape"], asdict(self.shape))
        self.modules.load_state_dict(ckpt["modules"])
        self.optimizer = torch.optim.Adam(self.params, lr=self.cfg.ppo.lr, eps=1e-5)
        norm = self.base_env.features.norm
        if norm is not None and ckpt["obs_norm"]:
            norm.load_state_dict(ckpt["obs_norm"])
        self.round = 0
        self.horizon = self.cfg.ppo.rounds
        self.history = []
        self.init_from = str(path)
        self.lineage = [x for x in (ckpt.get("provenance"), ckpt.get("offline")) if x is not None]


class PolicyDrill:
    """Fault drill ``faults.policy_nan_at_round``: a NaN in the updated policy of that round,
    which the guard must roll back."""

    def __init__(self, cfg: TrainingConfig) -> None:
        self.faults = cfg.faults

    def after_update(self, parts: RoundParts, number: int) -> None:
        poison_policy(parts.params, self.faults, number)

    def after_round(self, result: RoundResult) -> None:
        pass


class RoundTelemetry:
    """The round's ``ppo_update`` event and its anomalies into the hub, flushed: the round is
    on disk before its checkpoint is (survives SIGKILL)."""

    def __init__(self, hub: NissaHub) -> None:
        self.hub = hub

    def after_update(self, parts: RoundParts, number: int) -> None:
        pass

    def after_round(self, result: RoundResult) -> None:
        self.hub.emit(TelemetryEvent(kind=EventKind.PPO_UPDATE, epoch=result.stats.round,
                                     payload={**asdict(result.stats), **result.checks}))
        self.hub.emit_many(result.anomalies)
        self.hub.flush()
