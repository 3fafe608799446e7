"""What offline learning reads from a pack and the IQL loss: legal steps, episodes prepared
for the recurrent networks, the factored log-probability and the action agreement
(:mod:`esper.simic.offline` trains with them; :mod:`esper.simic.cql` reuses the first three)."""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import InteractionType, TensorDictModule, set_interaction_type
from torch import nn
from torchrl.modules import set_recurrent_mode
from torchrl.objectives import DiscreteIQLLoss, ValueEstimators

from esper.leyline import NUM_OPS
from esper.simic.packs import MASK_KEYS
from esper.tamiyo.lstm_policy import (
    ACTOR_STATE,
    CRITIC_STATE,
    HEAD_KEYS,
    PolicyShape,
    TamiyoModules,
    relevance_table,
)


def legal_steps(td: TensorDictBase) -> torch.Tensor:
    """``[E, T]`` bool: the recorded action is legal under the recorded masks (relevant heads)."""
    op = td.get("op").long()
    rel = relevance_table(op.device)[:, op]  # [4, E, T]
    ok = td.get("op_mask").gather(-1, op.unsqueeze(-1)).squeeze(-1)
    slot_rows = td.get("slot_mask").gather(
        -2, op[..., None, None].expand(*op.shape, 1, td.get("slot_mask").shape[-1])
    ).squeeze(-2)
    for i, (head, mask) in enumerate((("slot", slot_rows), ("blueprint", td.get("blueprint_mask")),
                                      ("tempo", td.get("tempo_mask")))):
        legal = mask.gather(-1, td.get(head).long().unsqueeze(-1)).squeeze(-1)
        ok = ok & (legal | ~rel[i + 1])
    return ok


def prepare_episodes(data: TensorDictBase, shape: PolicyShape, gamma: float,
                     observation_key: str = "observation_final") -> TensorDict:
    """Pack data -> the TensorDict the losses read (in memory): ``observation`` from
    ``observation_key``, masks, actions, zero LSTM states with ``is_init`` at t = 0, the next
    observation (the episode's last step is terminal: ``terminated = done``), discounted returns
    ``return_to_go`` and the ``legal`` step mask."""
    e, t = data.batch_size
    obs = data.get(observation_key).float().clone()
    lh = shape.lstm_hidden_size
    td = TensorDict(
        {
            "observation": obs,
            **{k: data.get(k).clone() for k in MASK_KEYS},
            **{h: data.get(h).long().clone() for h in HEAD_KEYS},
            "is_init": data.get("is_init").clone(),
            **{k: torch.zeros(e, t, 1, lh) for k in (*ACTOR_STATE, *CRITIC_STATE)},
        },
        batch_size=[e, t],
    )
    reward = data.get(("next", "reward")).float().clone()
    done = data.get(("next", "done")).clone()
    next_obs = torch.cat([obs[:, 1:], obs[:, -1:]], dim=1)  # last step: terminal, never bootstrapped
    td.set(("next", "observation"), next_obs)
    td.set(("next", "reward"), reward)
    td.set(("next", "done"), done)
    td.set(("next", "terminated"), done.clone())
    td.set(("next", "truncated"), torch.zeros_like(done))
    ret = torch.zeros_like(reward)
    running = torch.zeros_like(reward[:, 0])
    for i in range(t - 1, -1, -1):
        running = reward[:, i] + gamma * running * (~done[:, i]).float()
        ret[:, i] = running
    td.set("return_to_go", ret)
    td.set("legal", legal_steps(td))
    return td


def factored_log_prob(modules: TamiyoModules, td: TensorDictBase) -> tuple[TensorDictBase, Any]:
    """Per-head log-probabilities (``<head>_log_prob``, irrelevant heads 0) of the recorded
    actions under the actor, run recurrent over whole episodes; and the distribution."""
    inp = td.select("observation", *MASK_KEYS, *ACTOR_STATE, "is_init")
    with set_recurrent_mode(True):
        dist = modules.actor.get_dist(inp)
    legal = td.get("legal")
    # An illegal recorded action would score -inf (and NaN gradients): score a legal stand-in
    # (first legal op, first legal entry of each head) and drop the step.
    op = torch.where(legal, td.get("op"), td.get("op_mask").float().argmax(-1))
    slot_rows = td.get("slot_mask").gather(
        -2, op[..., None, None].expand(*op.shape, 1, td.get("slot_mask").shape[-1])).squeeze(-2)
    stand_in = {"op": op, "slot": slot_rows.float().argmax(-1),
                "blueprint": td.get("blueprint_mask").float().argmax(-1),
                "tempo": td.get("tempo_mask").float().argmax(-1)}
    actions = TensorDict({h: torch.where(legal, td.get(h), stand_in[h]) if h != "op" else op for h in HEAD_KEYS},
                         batch_size=td.batch_size)
    lp = dist.log_prob_composite(actions, include_sum=False)
    out = lp.apply(lambda x: torch.where(legal, x, torch.zeros_like(x)))
    return out, dist


@torch.no_grad()
def action_agreement(modules: TamiyoModules, td: TensorDictBase) -> dict[str, float]:
    """How often the greedy actor (per-head mode, op first) picks the pack's action:
    ``op`` (op head alone), ``action`` (op and every head relevant to it), and ``action_nonwait``
    (the same on steps where the pack's op is not WAIT)."""
    inp = td.select("observation", *MASK_KEYS, *ACTOR_STATE, "is_init")
    with set_recurrent_mode(True), set_interaction_type(InteractionType.DETERMINISTIC):
        mode = modules.actor.get_dist(inp).mode
    op = td.get("op")
    rel = relevance_table(op.device)[:, op]
    same_op = mode.get("op") == op
    full = same_op.clone()
    for i, h in enumerate(HEAD_KEYS[1:], start=1):
        full &= (mode.get(h) == td.get(h)) | ~rel[i]
    nonwait = op != 0
    n_nonwait = int(nonwait.sum())
    return {
        "op": float(same_op.float().mean()),
        "action": float(full.float().mean()),
        "action_nonwait": float(full[nonwait].float().mean()) if n_nonwait else float("nan"),
        "steps": int(op.numel()),
        "nonwait_steps": n_nonwait,
    }


# ----------------------------------------------------------------------------- IQL
class _QNet(nn.Module):
    def __init__(self, inp: int, hidden: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inp, hidden), nn.LayerNorm(hidden), nn.Tanh(),
                                 nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FactoredIQLLoss(DiscreteIQLLoss):
    """torchrl's discrete IQL with ``Q(s, op)`` and a factored, recurrent, masked actor loss.

    The action key of the Q/V losses is ``op`` (categorical, 5); :meth:`actor_loss` is the
    per-head advantage-weighted regression described in the module docstring. The input
    TensorDict needs ``legal`` ([E, T] bool) and ``("next", "observation")``.
    """

    def __init__(self, modules: TamiyoModules, obs_size: int, q_hidden: int, *, gamma: float,
                 expectile: float, temperature: float) -> None:
        qvalue = TensorDictModule(_QNet(obs_size, q_hidden, NUM_OPS), in_keys=["observation"],
                                  out_keys=["state_action_value"])
        value = TensorDictModule(_QNet(obs_size, q_hidden, 1), in_keys=["observation"],
                                 out_keys=["state_value"])
        super().__init__(modules.actor, qvalue, value, action_space="categorical", num_qvalue_nets=2,
                         expectile=expectile, temperature=temperature, loss_function="l2")
        self.set_keys(action="op")
        self.make_value_estimator(ValueEstimators.TD0, gamma=gamma)
        self.gamma_ = gamma
        self.modules_ref = [modules]  # not a submodule: its parameters stay the actor's

    def actor_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict]:
        modules = self.modules_ref[0]
        lp, _ = factored_log_prob(modules, tensordict)
        legal = tensordict.get("legal")
        with torch.no_grad():
            td_q = tensordict.select(*self.qvalue_network.in_keys, strict=False)
            td_q = self._vmap_qvalue_networkN0(td_q, self.target_qvalue_network_params)
            q = td_q.get(self.tensor_keys.state_action_value).min(0)[0]  # [E, T, 5]
            q_op = q.gather(-1, tensordict.get("op").long().unsqueeze(-1)).squeeze(-1)
            with self.value_network_params.to_module(self.value_network, preserve_module_state=False):
                v = self.value_network(tensordict.select("observation").clone()).get("state_value").squeeze(-1)
                v_next = self.value_network(
                    TensorDict({"observation": tensordict.get(("next", "observation"))},
                               batch_size=tensordict.batch_size)
                ).get("state_value").squeeze(-1)
            reward = tensordict.get(("next", "reward")).squeeze(-1)
            alive = (~tensordict.get(("next", "terminated")).squeeze(-1)).float()
            adv_op = q_op - v
            adv_all = reward + self.gamma_ * alive * v_next - v
            w_op = torch.exp(adv_op * self.temperature).clamp_max(100.0)
            w_sub = torch.exp(adv_all * self.temperature).clamp_max(100.0)
        sub = sum(lp.get(f"{h}_log_prob") for h in HEAD_KEYS[1:])
        per_step = w_op * lp.get("op_log_prob") + w_sub * sub
        loss = -(per_step * legal).sum() / legal.sum().clamp_min(1)
        total_lp = sum(lp.get(f"{h}_log_prob") for h in HEAD_KEYS)
        tensordict.set(self.tensor_keys.log_prob, total_lp.detach())
        return loss, {}


# ----------------------------------------------------------------------------- trainer
