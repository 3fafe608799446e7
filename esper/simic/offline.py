"""Offline pretraining of Tamiyo's LSTM actor-critic from episode packs (:mod:`esper.simic.packs`).

Three methods, all over *whole episodes* through the LSTMs (``set_recurrent_mode(True)``,
``is_init`` at t = 0, zero initial state), minibatched by episode, never by single steps:

* ``bc`` -- behaviour cloning: the factored, masked negative log-likelihood of the pack's
  actions under the actor, ``-sum_h relevant(h, op) * log pi_h(a_h | s[, op])``. The weighting is
  :class:`~esper.tamiyo.lstm_policy.FactoredActionDistribution`'s own ``log_prob`` (heads that
  do not matter for the op add nothing; the slot is scored in the op's row). Steps whose recorded
  action is illegal under the recorded masks (which would score ``-inf``) are skipped and counted.

* ``iql`` -- implicit Q-learning with torchrl's :class:`~torchrl.objectives.DiscreteIQLLoss`,
  adapted to the factored heads (:class:`FactoredIQLLoss`). torchrl supplies the expectile value
  loss, the TD(0) Q loss against the value of the next state, the twin-Q minimum, the target-Q
  parameters (soft-updated with torchrl's ``SoftUpdate``) and the loss plumbing. What it lacks and
  is written here:

  - a Q-network over the joint factored action would need ``5 * S * B * tempos`` outputs; instead
    ``Q(s, op)`` scores the op only (two MLP heads over the observation) and ``V(s)`` is an MLP;
  - the actor loss (``actor_loss`` override): advantage-weighted regression per head. The op head
    is weighted by ``exp(beta * (min Q(s, op) - V(s)))`` (IQL's extraction step); the sub-heads
    (slot, blueprint, tempo), which Q does not see, by the one-step advantage of the whole action,
    ``exp(beta * (r + gamma * V(s') - V(s)))`` (AWR); weights are clamped at 100, steps with an
    illegal recorded action are skipped, and the actor runs recurrent over the episode.

  The Q/V networks read the observation only (not the LSTM state): the observation carries the
  accuracy/loss history and the lifecycle counters, so it is close to Markov for the value.

* ``cql`` -- conservative Q-learning on torchrl's :class:`~torchrl.objectives.DiscreteCQLLoss`
  (:class:`esper.simic.cql.FactoredCQLLoss`): ``Q(s, op)`` with a conservative penalty over the
  legal ops, and an actor distilled from it (see that module).

Both methods also fit the PPO critic (recurrent, value-normalized as in PPO) to the pack's
discounted returns, so PPO started from the checkpoint (``esper.train --init``) has a useful
value function from its first round. The output is a checkpoint in :meth:`~esper.simic.ppo.PPOTrainer.state`'s
format (round 0) with the pack's ``obs_norm``: ``load_policy``/``esper.evaluate --policies
ppo=CKPT`` load it, and :meth:`PPOTrainer.init` starts PPO from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import nn
from torchrl.modules import set_recurrent_mode
from torchrl.modules.value_norm import RunningValueNorm
from torchrl.objectives import SoftUpdate

from esper.kasmina.blueprints import blueprint_catalogue
from esper.simic.checkpoint import CHECKPOINT_VERSION, save_checkpoint
from esper.simic.cli import build_config
from esper.simic.config import TrainingConfig
from esper.simic.cql import FactoredCQLLoss, with_next_masks
from esper.simic.errors import ConfigError, PackError
from esper.simic.offline_losses import (
    FactoredIQLLoss,
    action_agreement,
    factored_log_prob,
    prepare_episodes,
)
from esper.simic.packs import read_pack
from esper.simic.ppo_loss import WAIT_BIAS
from esper.simic.preflight import check_fresh_checkpoint
from esper.tamiyo.lstm_policy import (
    CRITIC_STATE,
    HEAD_KEYS,
    PolicyShape,
    TamiyoModules,
)

METHODS: tuple[str, ...] = ("bc", "iql", "cql")

__all__ = ["METHODS", "OfflineConfig", "OfflineTrainer", "train_offline"]


@dataclass(slots=True)
class OfflineConfig:
    """Settings of offline pretraining (``esper.train --policy bc|iql|cql``)."""

    method: str = "bc"
    epochs: int = 100  # passes over the training episodes
    minibatch_episodes: int = 16
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    critic_coef: float = 0.5
    holdout: float = 0.2  # fraction of episodes held out for the agreement score
    observation_key: str = "observation_final"  # normalized by the pack's final obs_norm
    expectile: float = 0.7
    temperature: float = 3.0  # IQL's inverse temperature beta
    tau: float = 0.005  # target-Q soft update
    q_hidden: int = 128
    cql_alpha: float = 1.0  # weight of CQL's conservative term
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown offline method {self.method!r}; allowed: {list(METHODS)}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")


@dataclass(slots=True)
class EpochStats:
    epoch: int
    loss: float
    actor: float
    critic: float
    q: float = float("nan")
    v: float = float("nan")
    skipped_steps: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        s = f"epoch {self.epoch:4d}  loss {self.loss:+.4f}  actor {self.actor:+.4f}  critic {self.critic:.4f}"
        if not math.isnan(self.q):
            s += f"  q {self.q:.4f}"
        if not math.isnan(self.v):
            s += f"  v {self.v:.4f}"
        for k, v in self.extra.items():
            s += f"  {k} {v:.4f}"
        return s


def policy_shape_for(meta: dict[str, Any], cfg: TrainingConfig) -> PolicyShape:
    actions = meta["actions"]
    catalogue = blueprint_catalogue()
    return PolicyShape(
        obs_size=int(meta["schema"]["size"]),
        n_slots=len(actions["slots"]),
        n_blueprints=len(catalogue),
        n_tempos=len(actions["tempos"]),
        hidden_size=cfg.ppo.hidden_size,
        lstm_hidden_size=cfg.ppo.lstm_hidden_size,
        blueprints=catalogue,
    )


class OfflineTrainer:
    """Behaviour cloning or IQL from one pack; :meth:`state` is a PPO-format checkpoint.

    ``cfg`` sizes the networks (``ppo.hidden_size``/``lstm_hidden_size``) and is stored in the
    checkpoint; the pack's config is used when ``cfg`` is None (what ``esper.train --data``
    does unless a config is given).
    """

    def __init__(self, pack: str | Path, ocfg: OfflineConfig | None = None,
                 cfg: TrainingConfig | None = None, data: tuple[TensorDictBase, dict[str, Any]] | None = None) -> None:
        self.ocfg = ocfg or OfflineConfig()
        self.pack = str(pack)
        raw, meta = data if data is not None else read_pack(pack)
        self.meta = meta
        self.cfg = cfg if cfg is not None else TrainingConfig.from_dict(meta["config"], f"{pack}: config")
        torch.manual_seed(self.ocfg.seed)
        self.shape = policy_shape_for(meta, self.cfg)
        self.gamma = float(meta.get("gamma", self.cfg.ppo.gamma))
        self.obs_norm = {k: v.clone() for k, v in meta.get("obs_norm_state", {}).items()}
        td = prepare_episodes(raw, self.shape, self.gamma, self.ocfg.observation_key)
        e = td.batch_size[0]
        gen = torch.Generator().manual_seed(self.ocfg.seed)
        order = torch.randperm(e, generator=gen)
        n_hold = min(e - 1, math.ceil(self.ocfg.holdout * e)) if self.ocfg.holdout > 0 else 0
        self.holdout_idx = order[:n_hold].sort().values
        self.train_idx = order[n_hold:].sort().values
        self.train_data = td[self.train_idx]
        self.holdout_data = td[self.holdout_idx] if n_hold else None
        self.skipped_steps = int((~td.get("legal")).sum())
        self.value_norm = RunningValueNorm(shape=1)
        self.modules = TamiyoModules(self.shape, self.value_norm, wait_bias=WAIT_BIAS)
        self.modules.use_blueprints(meta["actions"]["blueprints"])
        self.value_norm.update(self.train_data.get("return_to_go").reshape(-1, 1))
        self.iql: FactoredIQLLoss | None = None
        self.cql: FactoredCQLLoss | None = None
        if self.ocfg.method == "cql":
            with_next_masks(self.train_data)
            if self.holdout_data is not None:
                with_next_masks(self.holdout_data)
            self.cql = FactoredCQLLoss(self.modules, self.shape.obs_size, self.ocfg.q_hidden, gamma=self.gamma,
                                       temperature=self.ocfg.temperature)
            self.qv_params = [p for n, p in self.cql.named_parameters() if n.startswith("value_network_params")]
            self.qv_optimizer = torch.optim.Adam(self.qv_params, lr=self.ocfg.lr)
            self.target_update = SoftUpdate(self.cql, tau=self.ocfg.tau)
        if self.ocfg.method == "iql":
            self.iql = FactoredIQLLoss(self.modules, self.shape.obs_size, self.ocfg.q_hidden, gamma=self.gamma,
                                       expectile=self.ocfg.expectile, temperature=self.ocfg.temperature)
            self.qv_params = [p for n, p in self.iql.named_parameters()
                              if n.startswith(("qvalue_network_params", "value_network_params"))]
            self.qv_optimizer = torch.optim.Adam(self.qv_params, lr=self.ocfg.lr)
            self.target_update = SoftUpdate(self.iql, tau=self.ocfg.tau)
        # After the IQL loss is built (torchrl's functional conversion): the actor's own parameters.
        self.params = [p for p in self.modules.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=self.ocfg.lr, eps=1e-5)
        self.shuffle = torch.Generator().manual_seed(self.ocfg.seed + 1)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------- losses
    def critic_loss(self, td: TensorDictBase) -> torch.Tensor:
        inp = td.select("observation", *CRITIC_STATE, "is_init")
        with set_recurrent_mode(True):
            value = self.modules.critic(inp).get("state_value")
        vn = self.value_norm
        return (vn.normalize(value) - vn.normalize(td.get("return_to_go"))).pow(2).mean()

    def bc_loss(self, td: TensorDictBase) -> torch.Tensor:
        lp, _ = factored_log_prob(self.modules, td)
        legal = td.get("legal")
        total = sum(lp.get(f"{h}_log_prob") for h in HEAD_KEYS)
        return -(total * legal).sum() / legal.sum().clamp_min(1)

    def step(self, mb: TensorDictBase) -> dict[str, torch.Tensor]:
        """One gradient step on a minibatch of whole episodes."""
        critic = self.critic_loss(mb)
        out: dict[str, torch.Tensor] = {"critic": critic.detach()}
        if self.cql is not None:
            losses = self.cql(mb.clone(False))
            actor = losses["loss_actor"]
            self.optimizer.zero_grad(set_to_none=True)
            self.qv_optimizer.zero_grad(set_to_none=True)
            (actor + self.ocfg.critic_coef * critic + losses["loss_qvalue"]
             + self.ocfg.cql_alpha * losses["loss_cql"]).backward()
            nn.utils.clip_grad_norm_(self.qv_params, self.ocfg.max_grad_norm)
            self.qv_optimizer.step()
            self.target_update.step()
            out |= {"q": losses["loss_qvalue"].detach(), "cql": losses["loss_cql"].detach()}
        elif self.iql is None:
            actor = self.bc_loss(mb)
            self.optimizer.zero_grad(set_to_none=True)
            (actor + self.ocfg.critic_coef * critic).backward()
        else:
            with set_recurrent_mode(True):
                losses = self.iql(mb.clone(False))
            actor = losses["loss_actor"]
            self.optimizer.zero_grad(set_to_none=True)
            self.qv_optimizer.zero_grad(set_to_none=True)
            (actor + self.ocfg.critic_coef * critic + losses["loss_qvalue"] + losses["loss_value"]).backward()
            nn.utils.clip_grad_norm_(self.qv_params, self.ocfg.max_grad_norm)
            self.qv_optimizer.step()
            self.target_update.step()
            out |= {"q": losses["loss_qvalue"].detach(), "v": losses["loss_value"].detach()}
        nn.utils.clip_grad_norm_(self.params, self.ocfg.max_grad_norm)
        self.optimizer.step()
        out["actor"] = actor.detach()
        return out

    def train_epoch(self) -> EpochStats:
        self.modules.train()
        e = self.train_data.batch_size[0]
        order = torch.randperm(e, generator=self.shuffle)
        sums: dict[str, float] = {}
        count = 0
        for idx in order.split(self.ocfg.minibatch_episodes):
            out = self.step(self.train_data[idx])
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
        self.epoch += 1
        m = {k: v / count for k, v in sums.items()}
        stats = EpochStats(epoch=self.epoch, loss=m["actor"] + self.ocfg.critic_coef * m["critic"] + m.get("q", 0.0)
                           + m.get("v", 0.0) + self.ocfg.cql_alpha * m.get("cql", 0.0), actor=m["actor"],
                           critic=m["critic"], q=m.get("q", float("nan")), v=m.get("v", float("nan")),
                           skipped_steps=self.skipped_steps, extra={"cql": m["cql"]} if "cql" in m else {})
        self.history.append(asdict(stats))
        return stats

    def train(self, epochs: int | None = None, on_epoch: Callable[[EpochStats], None] | None = None) -> list[EpochStats]:
        out = []
        for _ in range(epochs if epochs is not None else self.ocfg.epochs):
            stats = self.train_epoch()
            out.append(stats)
            if on_epoch is not None:
                on_epoch(stats)
        return out

    def agreement(self, held_out: bool = True) -> dict[str, float]:
        """Greedy-actor agreement with the pack on held-out (or training) episodes."""
        td = self.holdout_data if held_out and self.holdout_data is not None else self.train_data
        self.modules.eval()
        return action_agreement(self.modules, td)

    # ------------------------------------------------------------------------- checkpoint
    def state(self) -> dict[str, Any]:
        """A checkpoint in :meth:`~esper.simic.ppo.PPOTrainer.state`'s format (round 0), plus an ``offline`` record."""
        return {
            "version": CHECKPOINT_VERSION,
            "round": 0,
            "config": self.cfg.model_dump(mode="json"),
            "policy_shape": asdict(self.shape),
            "modules": self.modules.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "obs_norm": self.obs_norm,
            "env_episode": torch.zeros(self.cfg.episode.envs, dtype=torch.long),
            "rng": {"torch": torch.get_rng_state(), "shuffle": self.shuffle.get_state()},
            "history": [],
            "offline": {
                "method": self.ocfg.method,
                "settings": asdict(self.ocfg),
                "pack": self.pack,
                "pack_id": self.meta.get("pack_id"),
                "pack_command": self.meta.get("command"),
                "pack_policies": self.meta.get("policies"),
                "pack_created": self.meta.get("created"),
                "epochs": self.epoch,
                "history": list(self.history),
            },
        }

    def save(self, path: str | Path) -> Path:
        return save_checkpoint(path, self.state())


# ----------------------------------------------------------------------------- command line
def train_offline(args: Any, console: Any) -> int:
    """``python -m esper.train --policy bc|iql|cql --data PACK [--save CKPT] [--offline-epochs N]``.

    The networks are sized and the checkpoint's config taken from the pack's config, unless
    ``--preset``/``--config`` is given. Per-epoch loss lines, then the greedy actor's agreement
    with the pack on held-out episodes. An existing ``--save`` file is kept unless ``--force``.
    Errors: ``error: what (where); allowed`` on stderr, 2, before any pass over the pack.
    """
    import sys


    def fail(what: str, where: str, allowed: str) -> int:
        print(f"error: {what} ({where}); {allowed}", file=sys.stderr)
        return 2

    if args.data is None:
        return fail(f"--policy {args.policy} needs a pack", "--data", "a directory written by esper.generate")
    if getattr(args, "resume", None) is not None or getattr(args, "init", None) is not None:
        return fail("--resume/--init apply to PPO only", "--policy", "train PPO with --init CKPT afterwards")
    try:
        pack = read_pack(args.data)
    except PackError as err:
        return fail(str(err), "--data", "a pack written by esper.generate with this code's observation schema")
    try:
        cfg = build_config(args) if (args.config is not None or args.preset not in (None, "default")) else None
        epochs = getattr(args, "offline_epochs", None)
        ocfg = OfflineConfig(method=args.policy, **({"epochs": epochs} if epochs is not None else {}))
    except (ConfigError, ValueError) as err:
        return fail(str(err), "configuration", "see --preset/--config and the flags")
    run_dir = Path(cfg.run_dir if cfg is not None else pack[1]["config"].get("run_dir", "runs/latest"))
    save = Path(args.save) if args.save is not None else run_dir / f"{args.policy}.pt"
    check_fresh_checkpoint(save, None, args.force, resumable=False)  # a directory, unwritable, or a file
    trainer = OfflineTrainer(args.data, ocfg, cfg=cfg, data=pack)
    e, t = pack[0].batch_size
    console.print(f"{args.policy} from {args.data}: {e} episodes x {t} steps ({len(trainer.train_idx)} train, "
                  f"{len(trainer.holdout_idx)} held out) from {pack[1].get('policies')}; {ocfg.epochs} epochs; "
                  f"{trainer.skipped_steps} steps with illegal recorded actions skipped", highlight=False)
    trainer.train(on_epoch=lambda s: console.print(s.line(), highlight=False, markup=False))
    trainer.save(save)
    held = trainer.holdout_data is not None
    agree = trainer.agreement(held_out=held)
    console.print(
        f"action agreement with the pack on {'held-out' if held else 'training (nothing held out)'} episodes: "
        f"op {agree['op']:.3f}, full action {agree['action']:.3f}, non-wait steps {agree['action_nonwait']:.3f} "
        f"({agree['steps']} steps, {agree['nonwait_steps']} non-wait); checkpoint {save}",
        highlight=False, markup=False,
    )
    return 0
