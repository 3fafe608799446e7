"""Conservative Q-learning (CQL) for the factored Tamiyo actor, on torchrl's discrete CQL loss.

torchrl's :class:`~torchrl.objectives.DiscreteCQLLoss` supplies the TD(0) Q loss against a
target Q-network (the greedy next-state value, via :class:`~torchrl.modules.QValueActor`) and
the conservative term ``logsumexp_a Q(s, a) - Q(s, a_data)`` that pushes down the values of
actions the data never took. Adapted here to Esper's action space, as the IQL loss is:

* ``Q(s, op)`` over the five ops only (the joint factored action has ``5 * S * B * tempos``);
  the greedy next-state value and the conservative logsumexp range over the *legal* ops only
  (``op_mask``): an op Kasmina would refuse is no alternative to push down, nor to bootstrap from;
* the actor (which the checkpoint ships, not Q) is extracted from the conservative Q: the op
  head is distilled from the masked Boltzmann policy ``softmax(temperature * Q(s, .))``; the
  sub-heads (slot, blueprint, tempo), which Q does not see, are cloned with weights
  ``exp(temperature * (Q(s, op) - V_Q(s)))`` (clamped at 100), ``V_Q`` the Boltzmann value.
  Steps whose recorded action is illegal under the recorded masks are skipped.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torchrl.modules import QValueActor
from torchrl.objectives import DiscreteCQLLoss, ValueEstimators

from esper.leyline import NUM_OPS
from esper.simic.offline_losses import factored_log_prob
from esper.tamiyo.lstm_policy import HEAD_KEYS, TamiyoModules

MAX_WEIGHT = 100.0


def _mlp(inp: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inp, hidden), nn.LayerNorm(hidden), nn.Tanh(),
                         nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out))


def with_next_masks(td: TensorDictBase) -> TensorDictBase:
    """Add ``("next", "op_mask")`` (the next step's legal ops; the last step is terminal and
    never bootstrapped, so it repeats its own) for the greedy target over legal ops."""
    mask = td.get("op_mask")
    td.set(("next", "op_mask"), torch.cat([mask[:, 1:], mask[:, -1:]], dim=1))
    return td


class FactoredCQLLoss(DiscreteCQLLoss):
    """torchrl's discrete CQL over ``Q(s, op)`` with legal-op masking and a factored actor loss.

    Input: the offline TensorDict (:func:`esper.simic.offline_losses.prepare_episodes` then
    :func:`with_next_masks`). Output keys: ``loss_qvalue``, ``loss_cql`` (torchrl's) and
    ``loss_actor`` (this class's), each a scalar.
    """

    def __init__(self, modules: TamiyoModules, obs_size: int, q_hidden: int, *, gamma: float,
                 temperature: float, qnet: nn.Module | None = None) -> None:
        net = qnet if qnet is not None else _mlp(obs_size, q_hidden, NUM_OPS)  # ``qnet``: obs -> Q [.., 5]
        qnet = QValueActor(net, in_keys=["observation"], action_space="categorical",
                           action_mask_key="op_mask")  # writes the greedy op as "action"
        super().__init__(qnet, action_space="categorical", delay_value=True, loss_function="l2")
        self.set_keys(action="op")
        self.make_value_estimator(ValueEstimators.TD0, gamma=gamma)
        self.temperature = temperature
        self.modules_ref = [modules]  # not a submodule: its parameters stay the actor's

    def cql_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict]:
        """torchrl's conservative term with the logsumexp over legal ops, on legal steps."""
        q = tensordict.get(self.tensor_keys.pred_val)
        mask, legal = tensordict.get("op_mask"), tensordict.get("legal")
        lse = torch.logsumexp(q.masked_fill(~mask, float("-inf")), dim=-1)
        q_a = q.gather(-1, tensordict.get("op").long().unsqueeze(-1)).squeeze(-1)
        gap = torch.where(legal, lse - q_a, torch.zeros_like(q_a))
        return gap.sum() / legal.sum().clamp_min(1), {}

    def q_values(self, tensordict: TensorDictBase) -> torch.Tensor:
        """``Q(s, .)`` ``[E, T, 5]`` of the current (not target) network, no gradient."""
        with torch.no_grad(), self.value_network_params.to_module(self.value_network, preserve_module_state=False):
            return self.value_network(tensordict.select("observation", "op_mask").clone()).get("action_value")

    def actor_loss(self, tensordict: TensorDictBase) -> torch.Tensor:
        lp, dist = factored_log_prob(self.modules_ref[0], tensordict)
        legal, mask = tensordict.get("legal"), tensordict.get("op_mask")
        q = self.q_values(tensordict)
        target = torch.softmax((self.temperature * q).masked_fill(~mask, float("-inf")), dim=-1)
        log_pi = dist.dists["op"].logits
        op_ce = -torch.where(mask, target * log_pi, torch.zeros_like(log_pi)).sum(-1)
        v = (target * q.masked_fill(~mask, 0.0)).sum(-1)
        q_op = q.gather(-1, tensordict.get("op").long().unsqueeze(-1)).squeeze(-1)
        w = torch.exp(self.temperature * (q_op - v)).clamp_max(MAX_WEIGHT)
        sub = sum(lp.get(f"{h}_log_prob") for h in HEAD_KEYS[1:])
        per_step = op_ce - w * sub
        return (per_step * legal).sum() / legal.sum().clamp_min(1)

    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        out = super().forward(tensordict)
        out.set("loss_actor", self.actor_loss(tensordict))
        return out
