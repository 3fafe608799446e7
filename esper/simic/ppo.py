"""LSTM-PPO over the batched morphogenetic env with torchrl's ClipPPOLoss and GAE.

One round = one episode of every env (``episode.length`` host epochs, all envs in step),
collected by torchrl's ``Collector`` through a ``TransformedEnv(InitTracker, LSTM primer)`` over
the same env, hence the same epoch pipeline (telemetry profile, plan, test scoring, one
transfer per epoch) as every other controller; GAE over the
whole ``[N, T]`` batch with the recurrent critic in recurrent mode (``shifted=True``); then
``ppo.epochs`` passes over minibatches of *whole env sequences* (never single steps), each
loss evaluated in recurrent mode from the sequence start. The episode's last step is treated as
terminal (the horizon is fixed and the observation carries the epoch), so GAE never bootstraps
across it; a step the env governor rolled back is masked out of GAE and every loss term
(:class:`StepMaskedGAE`). After the update the updated policy is judged on the round's batch
(:func:`~esper.simic.governor.policy_divergence`) and a diverged one is replaced by the policy
that collected the round. Actions are drawn from per-env keyed noise (:mod:`esper.simic.sampling`), and under
torchrun each rank holds a block of envs and DDP averages the gradients, with minibatches and
normalizations taken over the whole run (:mod:`esper.simic.ppo_ranks`): K ranks update the
policy as one process would.

Hand-written here only what torchrl lacks: the per-head entropy of the factored distribution
(:class:`FactoredPPOLoss`), value-target normalization inside the critic loss (the hook
torchrl's MAPPO uses), the rolled-back steps' validity fed to torchrl's ``shifted_valid``, the
whole-sequence minibatching and the round bookkeeping.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import InteractionType, set_interaction_type
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrl.envs import Compose, InitTracker, TransformedEnv
from torchrl.modules import set_recurrent_mode
from torchrl.modules.value_norm import RunningValueNorm
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from esper.kasmina.blueprints import blueprint_catalogue
from esper.leyline import NUM_OPS, EventKind, Op, TelemetryEvent
from esper.leyline.events import AnomalyEvent
from esper.nissa import AnomalyMonitor, NissaHub, TelemetryConfig, materialize
from esper.nissa.anomaly import PPO_SCOPE, lstm_hidden_stats
from esper.simic.checkpoint import (
    CHECKPOINT_VERSION,
    check_matches,
    load_checkpoint,
    provenance,
    save_checkpoint,
)
from esper.simic.config import TrainingConfig
from esper.simic.distributed import Ranks
from esper.simic.env import MorphogeneticEnv
from esper.simic.errors import CheckpointError
from esper.simic.faults import checkpoint_saver, poison_policy
from esper.simic.governor import policy_divergence
from esper.simic.pipeline import EpisodeSummary
from esper.simic.ppo_ranks import ShardedLearner
from esper.simic.runner import collector_for
from esper.simic.sampling import keyed_actor
from esper.simic.sharding import run_env
from esper.tamiyo.lstm_policy import (
    ACTOR_STATE,
    HEAD_KEYS,
    FactoredActionDistribution,
    PolicyShape,
    RecurrentPolicy,
    TamiyoModules,
)
from esper.tamiyo.policies import PolicyEnv, register_policy

WAIT_BIAS = 1.0


class FactoredPPOLoss(ClipPPOLoss):
    """ClipPPOLoss with the factored distribution's own per-head entropy and a value normalizer.

    torchrl's composite entropy calls each component's ``entropy()`` independently, which would
    count heads irrelevant to the op; the factored distribution weights them itself. The critic
    loss is computed on normalized targets and predictions (``_critic_loss_inputs``, the hook
    torchrl's MAPPO uses for value normalization); the normalizer is updated once per batch by
    the trainer, not per minibatch.
    """

    def __init__(self, *args: Any, value_norm: RunningValueNorm, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.value_norm = value_norm

    def _get_entropy(self, dist: torch.distributions.Distribution, adv_shape: torch.Size) -> Any:
        if isinstance(dist, FactoredActionDistribution):
            entropy = dist.entropy()
            entropy.batch_size = adv_shape
            return entropy.unsqueeze(-1)
        return super()._get_entropy(dist, adv_shape)

    def _critic_loss_inputs(
        self, target_return: torch.Tensor, state_value: torch.Tensor, old_state_value: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        vn = self.value_norm
        old = vn.normalize(old_state_value) if old_state_value is not None else None
        return vn.normalize(target_return.detach()), vn.normalize(state_value), old


VALID_KEY = "shifted_valid"  # torchrl's per-step validity: GAE truncates before it, the loss masks by it


class StepMaskedGAE(GAE):
    """torchrl's GAE with the steps the governor rolled back (``("next", "rolled_back")``) marked
    invalid, through torchrl's own ``shifted_valid`` path: the step before an invalid one is
    truncated (it bootstraps from the value of the state the rolled-back step started in), the
    invalid step's advantage and target are 0, and ClipPPOLoss leaves it out of every loss term."""

    def _call_value_nets(self, data: TensorDictBase, *args: Any, **kwargs: Any) -> Any:
        value, next_value, valid = super()._call_value_nets(data, *args, **kwargs)
        rolled = data.get(("next", "rolled_back"), None)
        if rolled is not None:
            ok = ~rolled.reshape(value.shape[:-1])
            valid = ok if valid is None else valid & ok
        return value, next_value, valid


class RecurrentEnv(TransformedEnv):
    """The env as the policy sees it (recurrent-state primer, init tracker).

    torchrl's auto-reset test is answered by the base env's host snapshot, as without the
    transforms, so collection keeps one device-to-host transfer per epoch.
    """

    def any_done(self, tensordict: TensorDictBase) -> bool:
        return self.base_env.any_done(tensordict)

    def _reset_check_done(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> None:
        self.base_env._reset_check_done(tensordict, tensordict_reset)


@dataclass(slots=True)
class RoundStats:
    """What one round did and learned (host-side floats).

    ``test_acc`` is the held-out test accuracy at the end of the round's episodes: what the
    controller is for. ``final_val_acc`` is what it decided from. ``mean_return`` is the plain
    sum of rewards per episode; ``discounted_return`` (``sum_t gamma^t r_t``) is what PPO
    maximizes, the one in which the potential-based shaping cancels whatever the policy does.
    ``accepted`` is the fraction of the round's decisions (every env, every epoch) applied.
    """

    round: int
    mean_return: float
    test_acc: float
    final_val_acc: float
    fossilized: float
    params_added: float
    op_freq: list[float]
    accepted: float
    kl: float
    clip_fraction: float
    entropy: dict[str, float]
    explained_variance: float
    value_loss: float
    value_variance: float  # of the critic's predictions over the round: ~0 is a value collapse
    actor_grad_norm: float  # mean pre-clip gradient norms over the round's minibatches
    critic_grad_norm: float
    lr: float
    entropy_scale: float
    passes: int
    env_epochs_per_s: float
    collect_s: float
    update_s: float
    reward_components: dict[str, float] = field(default_factory=dict)
    anomalies: list[str] = field(default_factory=list)
    rolled_back: str | None = None  # why this round's update was undone (policy_divergence)
    test_perplexity: float | None = None  # language-model tasks: mean over hosts of exp(test loss)
    discounted_return: float = float("nan")

    def line(self) -> str:
        ops = " ".join(f"{o.name[:4].lower()}={f:.2f}" for o, f in zip(Op, self.op_freq, strict=True))
        ent = " ".join(f"{h}={v:.2f}" for h, v in self.entropy.items())
        return (
            f"round {self.round:3d}  return {self.mean_return:+.3f} (discounted {self.discounted_return:+.3f})  "
            + (f"test ppl {self.test_perplexity:.3f}  " if self.test_perplexity is not None else "")
            + f"test {self.test_acc:5.2f}  "
            f"val {self.final_val_acc:5.2f}  fossil {self.fossilized:.2f}  params+ {self.params_added:.0f}  "
            f"ops[{ops}] ok={self.accepted:.2f}  kl {self.kl:.4f}  "
            f"clip {self.clip_fraction:.3f}  H[{ent}]  EV {self.explained_variance:+.2f}  "
            f"Vvar {self.value_variance:.3f}  |g| actor {self.actor_grad_norm:.2f} critic {self.critic_grad_norm:.2f}  "
            f"lr {self.lr:.1e} Hx{self.entropy_scale:.2f} passes {self.passes}  "
            f"{self.env_epochs_per_s:.1f} env-epochs/s"
            + ("".join(f"\n    anomaly: {a}" for a in self.anomalies))
            + (f"\n    rolled back: {self.rolled_back}" if self.rolled_back else "")
        )


def policy_shape(cfg: TrainingConfig, env: MorphogeneticEnv) -> PolicyShape:
    """Network sizes for ``env`` under ``cfg``."""
    sizes = env.action_spec
    catalogue = blueprint_catalogue()
    return PolicyShape(
        obs_size=env.schema.size,
        n_slots=int(sizes["slot"].space.n),
        n_blueprints=len(catalogue),
        n_tempos=int(sizes["tempo"].space.n),
        hidden_size=cfg.ppo.hidden_size,
        lstm_hidden_size=cfg.ppo.lstm_hidden_size,
        blueprints=catalogue,
    )


def explained_variance(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - Var(target - pred) / Var(target)`` over the ``valid`` steps (0 when the target is
    constant), on the device."""
    w = torch.ones_like(target) if valid is None else valid.to(target.dtype)
    while w.dim() < target.dim():
        w = w.unsqueeze(-1)
    w = w.expand_as(target)
    count = w.sum().clamp_min(2.0)

    def var(x: torch.Tensor) -> torch.Tensor:
        mean = (x * w).sum() / count
        return ((x - mean).pow(2) * w).sum() / (count - 1)

    v = var(target)
    ev = 1.0 - var(target - pred) / v.clamp_min(1e-12)
    return torch.where(v > 1e-12, ev, torch.zeros_like(ev))


def check_resumable(path: str | Path, ckpt: dict[str, Any], cfg: TrainingConfig, envs: int) -> None:
    """The run stored in ``ckpt`` can go on as ``cfg`` over ``envs`` envs: the same env count and
    the same learning setting (more rounds allowed). Needs no env, so the CLI checks it before
    any work (``preflight.check_resume``); :meth:`PPOTrainer.resume` checks it again."""
    saved = TrainingConfig.from_dict(ckpt["config"], str(path)).model_dump(mode="json")
    now = cfg.model_dump(mode="json")
    # the episode length scales observations and rewards, its seed names the envs; the features
    # section builds the observations the policy learned on
    learn = ("task", "kasmina", "reward", "ppo", "history_length", "episode", "features")
    for c in (saved, now):
        c["ppo"].pop("rounds")  # a resumed run may train for more rounds (same schedule horizon)
        c["episode"].pop("envs")  # checked apart, against the checkpoint's env rows
        c["episode"].pop("episodes")  # episodes per env of a controller run, not read by PPO
    check_matches(path, "env count", {"envs": int(ckpt["env_episode"].numel())}, {"envs": envs})
    check_matches(path, "config", {k: saved[k] for k in learn}, {k: now[k] for k in learn})


class PPOTrainer:
    """Builds the env, the LSTM actor-critic, ClipPPOLoss, GAE and Adam; runs rounds; checkpoints."""

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
        self._batches = iter(self.collector)
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
        self._actor_params = [q for q in self.modules.actor.parameters() if q.requires_grad]
        self._critic_params = [q for q in self.modules.critic.parameters() if q.requires_grad]
        self.optimizer = share.optimizer if share is not None else torch.optim.Adam(self.params, lr=p.lr, eps=1e-5)
        self.shuffle = torch.Generator().manual_seed(cfg.episode.seed + 1)
        self.round = 0
        self.horizon = p.rounds  # rounds the lr/entropy schedules decay over; a resume keeps its run's
        self.history: list[dict[str, Any]] = []
        self.init_from: str | None = None  # the checkpoint this run started from (--init)
        self.lineage: list[dict[str, Any]] = []  # that checkpoint's own provenance / offline record
        self._loss_fn: Callable[[TensorDictBase], TensorDictBase] = self.loss
        if self.ranks.world > 1:  # gradients averaged over ranks in backward; the buffers (value
            # normalizer) are updated alike on every rank from gathered targets, not re-sent per forward
            self._loss_fn = DistributedDataParallel(self.loss, forward_sync_buffers=False)
        # ``compile`` compiles the env's training step, not this loss: measured on the CPU (16 envs
        # x 20 epochs), compiling it took 78 s cold to save 0.06 s per update (0.25 -> 0.19 s).

    # ------------------------------------------------------------------------- data
    @torch.no_grad()
    def collect(self) -> TensorDictBase:
        """One episode of every env, sampled from the current policy: a ``[N, T]`` TensorDict."""
        with set_interaction_type(InteractionType.RANDOM), set_recurrent_mode(False):
            batch = next(self._batches)
        # Fixed horizon with the epoch observed: the episode end is terminal for the learner.
        batch.set(("next", "terminated"), batch.get(("next", "done")).clone())
        return batch

    @torch.no_grad()
    def advantages(self, batch: TensorDictBase) -> TensorDictBase:
        """GAE over whole sequences (recurrent critic, shifted), then fold the valid steps'
        targets into the norm (a rolled-back step's target is a placeholder 0)."""
        with set_recurrent_mode(True):
            self.gae(batch)
        full = self.learner.gather(batch)  # every rank's envs (the batch itself with one rank)
        target = full.get("value_target")
        valid = full.get(VALID_KEY, None)
        self.value_norm.update(target if valid is None else target[valid.reshape(target.shape[:-1])])
        return batch

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

    def update(self, batch: TensorDictBase) -> dict[str, Any]:
        """Up to ``ppo.epochs`` passes over minibatches of whole env sequences.

        The pass stops early once its mean approximate KL exceeds ``ppo.target_kl`` (one host
        read per pass, outside the env's epoch loop). Returns mean metrics (device tensors) and
        ``passes``, the number of passes run.
        """
        p = self.cfg.ppo
        sched = self.schedule()
        for group in self.optimizer.param_groups:
            group["lr"] = sched["lr"]
        n = self.learner.total  # minibatches by the run's env index, whichever rank holds them
        sums: dict[str, torch.Tensor] = {}
        count = 0
        passes = 0
        for _ in range(p.epochs):
            order = torch.randperm(n, generator=self.shuffle)
            pass_kl = torch.zeros((), device=self.device)
            chunks = order.split(p.minibatch_envs)
            for idx in chunks:
                mine = self.learner.part(idx, self.loss._standardize_advantage)
                mb = batch[mine.rows]  # [envs, T]: whole sequences, hidden state from their start
                mb.set("advantage", mine.advantage)
                with set_recurrent_mode(True):
                    out = self._loss_fn(mb)
                total = out["loss_objective"] + out["loss_critic"] + sched["entropy_scale"] * out["loss_entropy"]
                if mine.loss_weight is not None:  # this rank's share of the minibatch's mean loss
                    total = total * mine.loss_weight
                self.optimizer.zero_grad(set_to_none=True)
                total.backward()
                for part, params in (("actor_grad_norm", self._actor_params), ("critic_grad_norm", self._critic_params)):
                    norm = torch.linalg.vector_norm(torch.stack([
                        torch.linalg.vector_norm(q.grad) for q in params if q.grad is not None]))
                    sums[part] = sums.get(part, 0.0) + norm.detach()
                grad_norm = nn.utils.clip_grad_norm_(self.params, p.max_grad_norm)
                self.optimizer.step()
                sums["grad_norm_max"] = torch.maximum(sums.get("grad_norm_max", grad_norm), grad_norm)
                logged = {
                    "kl": out["kl_approx"], "clip_fraction": out["clip_fraction"],
                    "value_loss": out["loss_critic"],
                    **{h: out["composite_entropy", f"{h}_entropy"].mean() for h in HEAD_KEYS},
                }
                for k, v in logged.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() * mine.share
                pass_kl = pass_kl + out["kl_approx"].detach().float() * mine.share
                count += 1
            passes += 1
            pass_kl = self.learner.sum(pass_kl, "PPO target-KL test") / len(chunks)  # the same on every rank
            if p.target_kl is not None and float(pass_kl) > p.target_kl:
                break
        shared = [k for k in sums if k not in ("grad_norm_max", "actor_grad_norm", "critic_grad_norm")]
        if shared:  # rank-weighted means summed over ranks (gradient norms are already global)
            sums |= dict(zip(shared, self.learner.sum(torch.stack([sums[k] for k in shared])), strict=True))
        means = {k: v / count if k != "grad_norm_max" else v for k, v in sums.items()}
        return {**means, "passes": passes, **sched}

    @torch.no_grad()
    def health(self, batch: TensorDictBase) -> dict[str, torch.Tensor]:
        """The updated policy on the round's batch: importance ratios and the actor's LSTM state
        for the anomaly checks; its op entropy (summed over the valid steps, with their count)
        and its critic's values, which the policy governor judges."""
        with set_recurrent_mode(True):
            log_weight, dist = self.loss._log_weight(batch, batch.batch_size)[:2]
            value = self.modules.critic(batch.clone(False)).get("state_value")
        ratio = log_weight.exp()
        lstm = lstm_hidden_stats(batch.get(("next", ACTOR_STATE[0]))[:, -1],
                                 batch.get(("next", ACTOR_STATE[1]))[:, -1], env_dim=0)
        valid = batch.get(VALID_KEY, None)
        op_entropy = dist.entropy()["op_entropy"].reshape(batch.batch_size)
        w = torch.ones_like(op_entropy) if valid is None else valid.reshape(batch.batch_size).to(op_entropy.dtype)
        return {"ratio_max": ratio.max(), "ratio_min": ratio.min(), "lstm_h_norm": lstm["h_norm"].max(),
                "lstm_c_norm": lstm["c_norm"].max(), "lstm_nonfinite": lstm["nonfinite"].sum().float(),
                "op_entropy_sum": (op_entropy * w).sum(), "valid_steps": w.sum(), "value": value}

    @torch.no_grad()
    def ratio_outliers(self, batch: TensorDictBase, k: int = 8) -> AnomalyEvent:
        """The (at most ``k``) transitions whose importance ratio left the monitor's bounds,
        furthest first: env, step, action, old and new log-probability. Debug telemetry: run
        only when the ratio check fired, with one extra transfer."""
        lo, hi = self.monitor.ratio_bounds
        with set_recurrent_mode(True):
            log_weight = self.loss._log_weight(batch, batch.batch_size)[0]
        n, t = batch.batch_size
        lw = log_weight.reshape(n * t)
        outside = (lw < math.log(lo)) | (lw > math.log(hi)) | ~torch.isfinite(lw)
        score = torch.where(outside, lw.abs().nan_to_num(nan=1e30, posinf=1e30), torch.full_like(lw, -1.0))
        top = score.topk(min(k, n * t)).indices
        old = sum(batch.get(key).reshape(n * t) for key in self.loss.tensor_keys.sample_log_prob)
        host = materialize(TensorDict({
            "index": top, "outside": score[top] >= 0, "old": old[top], "new": old[top] + lw[top],
            **{h: batch.get(h).reshape(n * t)[top] for h in HEAD_KEYS}}, batch_size=[]))
        rows = []
        for j, idx in enumerate(host["index"].tolist()):
            if not host["outside"][j]:
                continue
            env_i, step = divmod(int(idx), t)
            env_i += self.base_env.env_offset  # the run's env index (this rank's envs only)
            action = self.base_env.describe(*(int(host[h][j]) for h in HEAD_KEYS))
            rows.append({"env": env_i, "step": step, "action": action, "old_log_prob": float(host["old"][j]),
                         "new_log_prob": float(host["new"][j]), "ratio": float(np.exp(host["new"][j] - host["old"][j]))})
        named = "; ".join(f"env {r['env']} step {r['step']} {r['action']} ratio {r['ratio']:.3g}" for r in rows)
        return AnomalyEvent(kind=EventKind.ANOMALY, epoch=self.round, detector="ratio_debug", severity="info",
                            message=f"PPO transitions outside the ratio bounds [{lo}, {hi}]: {named}",
                            payload={"scope": PPO_SCOPE, "transitions": rows})

    def train_round(self) -> RoundStats:
        """Collect, estimate advantages, update; the round counter advances.

        The round's learner metrics leave the device in one transfer; the episode outcomes
        (test accuracy, return, growth) come from the pipeline's host summaries.
        """
        t0 = time.perf_counter()
        self.modules.use_blueprints(self.base_env.blueprint_names)  # shared networks: this setting's set
        batch = self.collect()
        summaries = self.base_env.pipeline.take_summaries()
        t1 = time.perf_counter()
        self.modules.train()
        previous = self._snapshot()  # what a diverged update is rolled back to
        self.advantages(batch)
        full = self.learner.full  # the whole run's values, targets and valid steps
        valid = full.get(VALID_KEY, None)
        ev = explained_variance(full.get("state_value"), full.get("value_target"), valid)
        metrics = self.update(batch)
        t2 = time.perf_counter()
        self.round += 1
        poison_policy(self.params, self.cfg.faults, self.round)  # fault drill: a diverged update
        n, t = self.learner.total, batch.batch_size[1]
        ops = self.learner.sum(torch.bincount(batch.get("op").reshape(-1), minlength=NUM_OPS).float())
        health = self.health(batch)  # the updated policy, which the governor judges
        judged = self.learner.sum(torch.stack([health.pop("op_entropy_sum"), health.pop("valid_steps")]))
        value = self.learner.gather_rows(health.pop("value"), "PPO batch (updated values)")
        accepted = batch.get(("next", "signals", "action_accepted")).float()
        device_metrics = TensorDict(
            {**{k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)},
             **self.learner.health(health),
             "explained_variance": ev,
             "value_variance": full.get("state_value").float().var(),
             "policy_nonfinite": sum((~torch.isfinite(q)).sum() for q in self.params).float(),
             "judged_op_entropy": judged[0] / judged[1].clamp_min(1.0),
             "judged_explained_variance": explained_variance(value, full.get("value_target"), valid),
             "accepted": self.learner.sum(accepted.sum()) / (n * t),
             "op_freq": ops / (n * t)},
            batch_size=[],
        )
        host = materialize(device_metrics)  # one transfer per round for the learner's numbers
        m = {k: float(v) for k, v in host.items() if k != "op_freq"}
        m |= {k: float(metrics[k]) for k in ("passes", "lr", "entropy_scale")}
        stats = self._stats(summaries, host["op_freq"], m, t1 - t0, t2 - t1, n * t)
        checks = {"explained_variance": m["explained_variance"], "grad_norm": m["grad_norm_max"],
                  **{k: m[k] for k in ("ratio_max", "ratio_min", "lstm_h_norm", "lstm_c_norm", "lstm_nonfinite")}}
        anomalies = self.monitor.check_ppo_update(checks, self.round)
        if any(a.detector == "ratio_explosion" for a in anomalies):  # debug telemetry: name them
            anomalies.append(self.ratio_outliers(batch))
        # Judged after the update, on the updated policy: a collapsing update is undone in the
        # round it happens, back to the policy that collected (judged healthy a round ago).
        stats.rolled_back = policy_divergence(m["judged_op_entropy"], m["judged_explained_variance"],
                                              m["policy_nonfinite"])
        if stats.rolled_back is not None:
            self._restore(previous)
            anomalies.append(AnomalyEvent(
                kind=EventKind.ANOMALY, epoch=self.round, detector="policy_governor", severity="severe",
                message=f"the policy update of round {self.round} diverged ({stats.rolled_back}): rolled back "
                        f"to the policy and optimizer state of round {self.round - 1}",
                payload={"scope": PPO_SCOPE, "cause": stats.rolled_back, "action": "rollback"},
            ))
        stats.anomalies = [a.message for a in anomalies]
        self.history.append(asdict(stats))
        if self.hub is not None:
            self.hub.emit(TelemetryEvent(kind=EventKind.PPO_UPDATE, epoch=self.round,
                                         payload={**asdict(stats), **checks}))
            self.hub.emit_many(anomalies)
            self.hub.flush()  # the round is on disk before its checkpoint is (survives SIGKILL)
        return stats

    def _snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Device copies of the policy (value normalizer included) and the optimizer state."""
        return ({k: v.detach().clone() for k, v in self.modules.state_dict().items()},
                copy.deepcopy(self.optimizer.state_dict()))

    def _restore(self, snapshot: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
        modules, optimizer = snapshot
        self.modules.load_state_dict(modules)
        self.optimizer.load_state_dict(optimizer)

    def _stats(self, summaries: list[EpisodeSummary], op_freq: np.ndarray, m: dict[str, float],
               tc: float, tu: float, frames: int) -> RoundStats:
        summaries = [s for s in summaries if not s.governed]  # an env the governor rolled back is no result

        def mean(key: str) -> float:
            return float(np.mean([getattr(s, key) for s in summaries])) if summaries else float("nan")

        comps = sorted({k for s in summaries for k in s.reward_components})
        return RoundStats(
            round=self.round,
            mean_return=mean("total_reward"),
            discounted_return=mean("discounted_return"),
            test_acc=mean("test_acc"),
            test_perplexity=(float(np.mean([np.exp(s.test_loss) for s in summaries])) if summaries else float("nan"))
            if self.cfg.task.family == "lm" else None,
            final_val_acc=mean("final_val_acc"),
            fossilized=mean("fossilized"),
            params_added=mean("params_added"),
            op_freq=[float(x) for x in op_freq],
            accepted=m["accepted"],
            kl=m["kl"],
            clip_fraction=m["clip_fraction"],
            entropy={h: m[h] for h in HEAD_KEYS},
            explained_variance=m["explained_variance"],
            value_loss=m["value_loss"],
            value_variance=m["value_variance"],
            actor_grad_norm=m["actor_grad_norm"],
            critic_grad_norm=m["critic_grad_norm"],
            lr=m["lr"],
            entropy_scale=m["entropy_scale"],
            passes=int(m["passes"]),
            env_epochs_per_s=frames / max(tc, 1e-9),
            collect_s=tc,
            update_s=tu,
            reward_components={k: float(np.mean([s.reward_components.get(k, 0.0) for s in summaries]))
                               for k in comps},
        )

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


# ----------------------------------------------------------------------------- evaluation
def load_policy(path: str | Path, env: MorphogeneticEnv, deterministic: bool) -> RecurrentPolicy:
    """A trained actor for ``simic.runner``; the env's observation normalizer takes the
    checkpoint's statistics and is frozen, so observations match what the policy learned on."""
    ckpt = load_checkpoint(path)
    saved = PolicyShape(**ckpt["policy_shape"])
    observe = ckpt["config"].get("features", {}).get("observe", "minimal")
    check_matches(path, "observation (features.observe)", {"observe": observe},
                  {"observe": env.cfg.features.observe})
    current = {"obs_size": env.schema.size, "n_slots": len(env.slots)}
    check_matches(path, "env layout", {k: getattr(saved, k) for k in current}, current)
    norm = env.features.norm
    if norm is not None:
        norm.load_state_dict(ckpt["obs_norm"])
        norm.eval()
    modules = TamiyoModules(saved, RunningValueNorm(shape=1)).to(env.device)
    modules.load_state_dict(ckpt["modules"])
    try:
        modules.use_blueprints(env.blueprint_names)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    modules.eval()
    return RecurrentPolicy(modules, env.n, deterministic=deterministic)


def shipped_controller() -> Path | None:
    """The trained Tamiyo that ships as package data (``esper/simic/controllers/tamiyo.pt``),
    or None in an install without one (``bench/train_controller.sh`` reproduces it)."""
    path = Path(str(resources.files("esper.simic") / "controllers" / "tamiyo.pt"))
    return path if path.is_file() else None


def checkpoint_for(arg: str | None, name: str) -> str:
    """``name=PATH``'s path; a bare ``ppo`` is the shipped controller."""
    if arg:
        return arg
    shipped = shipped_controller()
    if shipped is None:
        raise ValueError(f"policy {name!r} needs a checkpoint ({name}=PATH): this install ships none")
    return str(shipped)


@register_policy("ppo")
def _ppo(env: PolicyEnv, cfg: Any, arg: str | None, seed: int) -> RecurrentPolicy:
    """Trained LSTM policy, greedy (per-head mode, op first); bare ``ppo`` is the shipped one."""
    try:
        return load_policy(checkpoint_for(arg, "ppo"), env, deterministic=True)  # type: ignore[arg-type]
    except CheckpointError as err:
        raise ValueError(str(err)) from err


@register_policy("ppo_sample")
def _ppo_sample(env: PolicyEnv, cfg: Any, arg: str | None, seed: int) -> RecurrentPolicy:
    """Trained LSTM policy, sampled actions (seeded from ``seed``)."""
    torch.manual_seed(seed)
    try:
        return load_policy(checkpoint_for(arg, "ppo_sample"), env, deterministic=False)  # type: ignore[arg-type]
    except CheckpointError as err:
        raise ValueError(str(err)) from err
