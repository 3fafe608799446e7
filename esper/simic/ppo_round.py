"""One PPO round, read top to bottom: collect, GAE, minibatch epochs with the KL stop, stats.

One round = one episode of every env (``episode.length`` host epochs, all envs in step),
collected by torchrl's ``Collector`` through a ``TransformedEnv(InitTracker, LSTM primer)`` over
the same env, hence the same epoch pipeline (telemetry profile, plan, test scoring, one
transfer per epoch) as every other controller; GAE over the whole ``[N, T]`` batch with the
recurrent critic in recurrent mode (``shifted=True``); then ``ppo.epochs`` passes over
minibatches of *whole env sequences* (never single steps), each loss evaluated in recurrent
mode from the sequence start. The episode's last step is treated as terminal (the horizon is
fixed and the observation carries the epoch), so GAE never bootstraps across it; a step the env
governor rolled back is masked out of GAE and every loss term
(:class:`~esper.simic.ppo_loss.StepMaskedGAE`). Actions are drawn from per-env keyed noise
(:mod:`esper.simic.sampling`), and under torchrun each rank holds a block of envs and DDP
averages the gradients, with minibatches and normalizations taken over the whole run
(:mod:`esper.simic.ppo_ranks`): K ranks update the policy as one process would.

What owns a round (:class:`esper.simic.ppo.PPOTrainer`) keeps the schedule, judges the updated
policy and rolls it back, and writes checkpoints; telemetry and fault drills attach as
:class:`RoundHook`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import InteractionType, set_interaction_type
from torch import nn
from torchrl.modules import set_recurrent_mode
from torchrl.modules.value_norm import RunningValueNorm

from esper.leyline import NUM_OPS, EventKind, Op
from esper.leyline.events import AnomalyEvent
from esper.nissa import AnomalyMonitor, materialize
from esper.nissa.anomaly import PPO_SCOPE, lstm_hidden_stats
from esper.simic.config import TrainingConfig
from esper.simic.env import MorphogeneticEnv
from esper.simic.episodes import EpisodeSummary
from esper.simic.ppo_loss import VALID_KEY, FactoredPPOLoss, StepMaskedGAE, explained_variance
from esper.simic.ppo_ranks import ShardedLearner
from esper.tamiyo.lstm_policy import ACTOR_STATE, HEAD_KEYS, TamiyoModules


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


class RoundParts(Protocol):
    """What a round uses of the trainer that owns it (:class:`esper.simic.ppo.PPOTrainer`)."""

    cfg: TrainingConfig
    device: torch.device
    base_env: MorphogeneticEnv
    modules: TamiyoModules
    batches: Iterator[TensorDictBase]  # torchrl's Collector: one episode of every env per item
    gae: StepMaskedGAE
    loss: FactoredPPOLoss
    loss_fn: Callable[[TensorDictBase], TensorDictBase]  # the loss (under DDP with several ranks)
    value_norm: RunningValueNorm
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]
    actor_params: list[torch.Tensor]
    critic_params: list[torch.Tensor]
    learner: ShardedLearner  # the whole run's batch, minibatches and sums over ranks
    shuffle: torch.Generator  # minibatch order
    monitor: AnomalyMonitor


@dataclass(slots=True)
class RoundResult:
    """A round's stats, the learner's host numbers (the guard judges ``judged_*`` and
    ``policy_nonfinite``), the anomaly checks' inputs and the anomalies found."""

    stats: RoundStats
    metrics: dict[str, float]
    checks: dict[str, float]
    anomalies: list[AnomalyEvent] = field(default_factory=list)


class RoundHook(Protocol):
    """Attaches to every round: ``after_update`` between the update and the measurement of the
    updated policy (fault drills), ``after_round`` once the round is judged (telemetry)."""

    def after_update(self, parts: RoundParts, number: int) -> None: ...

    def after_round(self, result: RoundResult) -> None: ...


def ppo_round(parts: RoundParts, number: int, sched: dict[str, float],
              hooks: Sequence[RoundHook] = ()) -> RoundResult:
    """Round ``number`` (counted from 1) at this round's ``sched`` (lr, entropy scale).

    The learner's numbers leave the device in one transfer; the episode outcomes (test
    accuracy, return, growth) come from the pipeline's host summaries.
    """
    # 1. collect: one episode of every env from the current policy
    t0 = time.perf_counter()
    batch = collect(parts)
    summaries = parts.base_env.pipeline.take_summaries()
    t1 = time.perf_counter()

    # 2. GAE over whole sequences; the value normalizer takes the round's valid targets
    parts.modules.train()
    advantages(parts, batch)
    full = parts.learner.full  # the whole run's values, targets and valid steps
    valid = full.get(VALID_KEY, None)
    ev = explained_variance(full.get("state_value"), full.get("value_target"), valid)

    # 3. minibatch epochs over whole env sequences, stopped early by the target KL
    metrics = update(parts, batch, sched)
    t2 = time.perf_counter()
    for hook in hooks:
        hook.after_update(parts, number)

    # 4. stats: the updated policy on the round's batch (what the guard judges), one transfer
    n, t = parts.learner.total, batch.batch_size[1]
    ops = parts.learner.sum(torch.bincount(batch.get("op").reshape(-1), minlength=NUM_OPS).float())
    h = health(parts, batch)
    judged = parts.learner.sum(torch.stack([h.pop("op_entropy_sum"), h.pop("valid_steps")]))
    value = parts.learner.gather_rows(h.pop("value"), "PPO batch (updated values)")
    accepted = batch.get(("next", "signals", "action_accepted")).float()
    device_metrics = TensorDict(
        {**{k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)},
         **parts.learner.health(h),
         "explained_variance": ev,
         "value_variance": full.get("state_value").float().var(),
         "policy_nonfinite": sum((~torch.isfinite(q)).sum() for q in parts.params).float(),
         "judged_op_entropy": judged[0] / judged[1].clamp_min(1.0),
         "judged_explained_variance": explained_variance(value, full.get("value_target"), valid),
         "accepted": parts.learner.sum(accepted.sum()) / (n * t),
         "op_freq": ops / (n * t)},
        batch_size=[],
    )
    host = materialize(device_metrics)  # one transfer per round for the learner's numbers
    m = {k: float(v) for k, v in host.items() if k != "op_freq"}
    m |= {k: float(metrics[k]) for k in ("passes", "lr", "entropy_scale")}
    stats = round_stats(number, summaries, host["op_freq"], m, t1 - t0, t2 - t1, n * t,
                        lm=parts.cfg.task.family == "lm")
    checks = {"explained_variance": m["explained_variance"], "grad_norm": m["grad_norm_max"],
              **{k: m[k] for k in ("ratio_max", "ratio_min", "lstm_h_norm", "lstm_c_norm", "lstm_nonfinite")}}
    anomalies = parts.monitor.check_ppo_update(checks, number)
    if any(a.detector == "ratio_explosion" for a in anomalies):  # debug telemetry: name them
        anomalies.append(ratio_outliers(parts, batch, number))
    return RoundResult(stats, m, checks, anomalies)


# ----------------------------------------------------------------------------- phases
@torch.no_grad()
def collect(parts: RoundParts) -> TensorDictBase:
    """One episode of every env, sampled from the current policy: a ``[N, T]`` TensorDict."""
    with set_interaction_type(InteractionType.RANDOM), set_recurrent_mode(False):
        batch = next(parts.batches)
    # Fixed horizon with the epoch observed: the episode end is terminal for the learner.
    batch.set(("next", "terminated"), batch.get(("next", "done")).clone())
    return batch


@torch.no_grad()
def advantages(parts: RoundParts, batch: TensorDictBase) -> TensorDictBase:
    """GAE over whole sequences (recurrent critic, shifted), then fold the valid steps'
    targets into the norm (a rolled-back step's target is a placeholder 0)."""
    with set_recurrent_mode(True):
        parts.gae(batch)
    full = parts.learner.gather(batch)  # every rank's envs (the batch itself with one rank)
    target = full.get("value_target")
    valid = full.get(VALID_KEY, None)
    parts.value_norm.update(target if valid is None else target[valid.reshape(target.shape[:-1])])
    return batch


def update(parts: RoundParts, batch: TensorDictBase, sched: dict[str, float]) -> dict[str, Any]:
    """Up to ``ppo.epochs`` passes over minibatches of whole env sequences.

    The pass stops early once its mean approximate KL exceeds ``ppo.target_kl`` (one host
    read per pass, outside the env's epoch loop). Returns mean metrics (device tensors) and
    ``passes``, the number of passes run.
    """
    p = parts.cfg.ppo
    for group in parts.optimizer.param_groups:
        group["lr"] = sched["lr"]
    n = parts.learner.total  # minibatches by the run's env index, whichever rank holds them
    sums: dict[str, torch.Tensor] = {}
    count = 0
    passes = 0
    for _ in range(p.epochs):
        order = torch.randperm(n, generator=parts.shuffle)
        pass_kl = torch.zeros((), device=parts.device)
        chunks = order.split(p.minibatch_envs)
        for idx in chunks:
            mine = parts.learner.part(idx, parts.loss._standardize_advantage)
            mb = batch[mine.rows]  # [envs, T]: whole sequences, hidden state from their start
            mb.set("advantage", mine.advantage)
            with set_recurrent_mode(True):
                out = parts.loss_fn(mb)
            total = out["loss_objective"] + out["loss_critic"] + sched["entropy_scale"] * out["loss_entropy"]
            if mine.loss_weight is not None:  # this rank's share of the minibatch's mean loss
                total = total * mine.loss_weight
            parts.optimizer.zero_grad(set_to_none=True)
            total.backward()
            for part, params in (("actor_grad_norm", parts.actor_params), ("critic_grad_norm", parts.critic_params)):
                norm = torch.linalg.vector_norm(torch.stack([
                    torch.linalg.vector_norm(q.grad) for q in params if q.grad is not None]))
                sums[part] = sums.get(part, 0.0) + norm.detach()
            grad_norm = nn.utils.clip_grad_norm_(parts.params, p.max_grad_norm)
            parts.optimizer.step()
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
        pass_kl = parts.learner.sum(pass_kl, "PPO target-KL test") / len(chunks)  # the same on every rank
        if p.target_kl is not None and float(pass_kl) > p.target_kl:
            break
    shared = [k for k in sums if k not in ("grad_norm_max", "actor_grad_norm", "critic_grad_norm")]
    if shared:  # rank-weighted means summed over ranks (gradient norms are already global)
        sums |= dict(zip(shared, parts.learner.sum(torch.stack([sums[k] for k in shared])), strict=True))
    means = {k: v / count if k != "grad_norm_max" else v for k, v in sums.items()}
    return {**means, "passes": passes, **sched}


@torch.no_grad()
def health(parts: RoundParts, batch: TensorDictBase) -> dict[str, torch.Tensor]:
    """The updated policy on the round's batch: importance ratios and the actor's LSTM state
    for the anomaly checks; its op entropy (summed over the valid steps, with their count)
    and its critic's values, which the policy governor judges."""
    with set_recurrent_mode(True):
        log_weight, dist = parts.loss._log_weight(batch, batch.batch_size)[:2]
        value = parts.modules.critic(batch.clone(False)).get("state_value")
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
def ratio_outliers(parts: RoundParts, batch: TensorDictBase, number: int, k: int = 8) -> AnomalyEvent:
    """The (at most ``k``) transitions whose importance ratio left the monitor's bounds,
    furthest first: env, step, action, old and new log-probability. Debug telemetry: run
    only when the ratio check fired, with one extra transfer."""
    lo, hi = parts.monitor.ratio_bounds
    with set_recurrent_mode(True):
        log_weight = parts.loss._log_weight(batch, batch.batch_size)[0]
    n, t = batch.batch_size
    lw = log_weight.reshape(n * t)
    outside = (lw < math.log(lo)) | (lw > math.log(hi)) | ~torch.isfinite(lw)
    score = torch.where(outside, lw.abs().nan_to_num(nan=1e30, posinf=1e30), torch.full_like(lw, -1.0))
    top = score.topk(min(k, n * t)).indices
    old = sum(batch.get(key).reshape(n * t) for key in parts.loss.tensor_keys.sample_log_prob)
    host = materialize(TensorDict({
        "index": top, "outside": score[top] >= 0, "old": old[top], "new": old[top] + lw[top],
        **{h: batch.get(h).reshape(n * t)[top] for h in HEAD_KEYS}}, batch_size=[]))
    rows = []
    for j, idx in enumerate(host["index"].tolist()):
        if not host["outside"][j]:
            continue
        env_i, step = divmod(int(idx), t)
        env_i += parts.base_env.env_offset  # the run's env index (this rank's envs only)
        action = parts.base_env.describe(*(int(host[h][j]) for h in HEAD_KEYS))
        rows.append({"env": env_i, "step": step, "action": action, "old_log_prob": float(host["old"][j]),
                     "new_log_prob": float(host["new"][j]), "ratio": float(np.exp(host["new"][j] - host["old"][j]))})
    named = "; ".join(f"env {r['env']} step {r['step']} {r['action']} ratio {r['ratio']:.3g}" for r in rows)
    return AnomalyEvent(kind=EventKind.ANOMALY, epoch=number, detector="ratio_debug", severity="info",
                        message=f"PPO transitions outside the ratio bounds [{lo}, {hi}]: {named}",
                        payload={"scope": PPO_SCOPE, "transitions": rows})


def round_stats(number: int, summaries: list[EpisodeSummary], op_freq: np.ndarray, m: dict[str, float],
                tc: float, tu: float, frames: int, lm: bool) -> RoundStats:
    """Round ``number``'s stats from its episodes (an env the governor rolled back counts for
    nothing), the learner's host numbers ``m`` and the collect / update seconds."""
    summaries = [s for s in summaries if not s.governed]  # an env the governor rolled back is no result

    def mean(key: str) -> float:
        return float(np.mean([getattr(s, key) for s in summaries])) if summaries else float("nan")

    comps = sorted({k for s in summaries for k in s.reward_components})
    return RoundStats(
        round=number,
        mean_return=mean("total_reward"),
        discounted_return=mean("discounted_return"),
        test_acc=mean("test_acc"),
        test_perplexity=(float(np.mean([np.exp(s.test_loss) for s in summaries])) if summaries else float("nan"))
        if lm else None,
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
