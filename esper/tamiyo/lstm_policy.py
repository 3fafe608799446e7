"""Tamiyo's learned controller: observation MLP -> LSTM -> factored, masked action heads.

The actor is a probabilistic TensorDict module whose distribution is a ``CompositeDistribution``
of ``MaskedCategorical`` heads (``op, slot, blueprint, tempo``). Two things the stock composite
cannot express are added by :class:`FactoredActionDistribution`, a small subclass:

* the slot head's legal set depends on the sampled op (``slot_mask[N, op, S]``), so the op is
  sampled first and the slot is drawn from the op's row (slot logits are per op, too);
* heads that do not matter for an op (``leyline.HEADS_FOR_OP``) add nothing to the
  log-probability of that action, and a head's entropy is weighted by the probability of the
  ops for which it matters (``E_op[relevant * H(head | op)]``, the op probabilities detached),
  so e.g. the blueprint entropy vanishes when germinating is impossible.

The critic is separate (its own encoder and LSTM) and outputs a value in the normalized space
of a running value normalizer; :class:`DenormalizedValue` turns it into real-scale
``state_value`` for GAE. The recurrent state of the actor lives in the env TensorDict under
``rs_h``/``rs_c`` (a ``TensorDictPrimer`` from :meth:`TamiyoModules.primer`); the critic only
runs over whole sequences (recurrent mode), starting from zeros at ``is_init``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import (
    CompositeDistribution,
    InteractionType,
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    TensorDictModule,
    TensorDictSequential,
    composite_lp_aggregate,
    set_interaction_type,
)
from torch import nn
from torchrl.envs import TensorDictPrimer
from torchrl.modules import LSTMModule, MaskedCategorical, set_recurrent_mode
from torchrl.modules.value_norm import ValueNorm

from esper.kasmina.blueprints import catalogue_index
from esper.leyline import HEADS, NUM_OPS, Op, head_relevance

HEAD_KEYS: tuple[str, ...] = HEADS
MASK_OF: dict[str, str] = {h: f"{h}_mask" for h in HEAD_KEYS}
ACTOR_STATE: tuple[str, str] = ("rs_h", "rs_c")
CRITIC_STATE: tuple[str, str] = ("critic_h", "critic_c")


_RELEVANCE: dict[torch.device, torch.Tensor] = {}


def relevance_table(device: torch.device | str | None = None) -> torch.Tensor:
    """``[len(HEADS), NUM_OPS]`` bool: does head ``h`` matter for op ``o``?

    A read-only constant, cached per device: every action distribution reads it, and a fresh
    one per policy step would be a host-to-device copy each epoch (traced code makes its own).
    """
    rel = head_relevance()
    if torch.compiler.is_compiling():
        return torch.tensor([rel[h] for h in HEAD_KEYS], dtype=torch.bool, device=device)
    dev = torch.device(device if device is not None else "cpu")
    if dev not in _RELEVANCE:
        _RELEVANCE[dev] = torch.tensor([rel[h] for h in HEAD_KEYS], dtype=torch.bool, device=dev)
    return _RELEVANCE[dev]


def _nonempty(mask: torch.Tensor) -> torch.Tensor:
    """Rows with no legal entry become all-legal (they belong to illegal ops: never used)."""
    return mask | ~mask.any(dim=-1, keepdim=True)


class FactoredActionDistribution(CompositeDistribution):
    """``op -> slot | op``, ``blueprint``, ``tempo`` as masked categoricals (see module doc).

    ``params`` holds ``op: {logits [.., 5], mask}``, ``slot: {logits [.., 5, S], mask [.., 5, S]}``,
    ``blueprint: {logits, mask}``, ``tempo: {logits, mask}``. ``log_prob`` and ``entropy`` return
    TensorDicts keyed ``<head>_log_prob`` / ``<head>_entropy`` (torchrl's composite layout).
    """

    def __init__(
        self,
        params: TensorDictBase,
        distribution_map: Mapping[str, type] | None = None,
        *,
        name_map: Mapping[str, str] | None = None,
        extra_kwargs: Mapping[str, object] | None = None,
        log_prob_key: str | None = None,
        entropy_key: str | None = None,
    ) -> None:
        self._batch_shape = params.shape
        self.log_prob_key = log_prob_key or "sample_log_prob"
        self.entropy_key = entropy_key or "entropy"
        self.aggregate_probabilities = None

        def cat(head: str, mask: torch.Tensor) -> MaskedCategorical:
            return MaskedCategorical(logits=params[head, "logits"], mask=mask, use_cross_entropy=False)

        # ``slot`` is the family of per-op conditionals: batch [.., 5], support S.
        self.dists = {
            "op": cat("op", params["op", "mask"]),
            "slot": cat("slot", _nonempty(params["slot", "mask"])),
            "blueprint": cat("blueprint", _nonempty(params["blueprint", "mask"])),
            "tempo": cat("tempo", _nonempty(params["tempo", "mask"])),
        }
        self.relevance = relevance_table(params["op", "logits"].device)

    # ------------------------------------------------------------------------- helpers
    def _slot_logits_for(self, op: torch.Tensor) -> torch.Tensor:
        logits = self.dists["slot"].logits  # masked, normalized, [.., 5, S]
        idx = op.unsqueeze(-1).unsqueeze(-1).expand(*op.shape, 1, logits.shape[-1])
        return logits.gather(-2, idx).squeeze(-2)

    def _relevant(self, op: torch.Tensor) -> dict[str, torch.Tensor]:
        return {h: self.relevance[i][op] for i, h in enumerate(HEAD_KEYS)}

    def _assemble(self, op: torch.Tensor, slot: torch.Tensor, bp: torch.Tensor, tempo: torch.Tensor) -> TensorDict:
        return TensorDict({"op": op, "slot": slot, "blueprint": bp, "tempo": tempo}, batch_size=op.shape)

    # ------------------------------------------------------------------------- sampling
    def sample(self, shape: torch.Size | None = None) -> TensorDictBase:
        shape = torch.Size(shape or ())
        op = self.dists["op"].sample(shape)
        slot = torch.distributions.Categorical(logits=self._slot_logits_for(op)).sample()
        return self._assemble(op, slot, self.dists["blueprint"].sample(shape), self.dists["tempo"].sample(shape))

    @property
    def mode(self) -> TensorDictBase:
        op = self.dists["op"].logits.argmax(-1)
        slot = self._slot_logits_for(op).argmax(-1)
        return self._assemble(
            op, slot, self.dists["blueprint"].logits.argmax(-1), self.dists["tempo"].logits.argmax(-1)
        )

    @property
    def deterministic_sample(self) -> TensorDictBase:
        return self.mode

    def rsample(self, shape: torch.Size | None = None) -> TensorDictBase:
        raise NotImplementedError("categorical heads have no reparameterized sample")

    # ------------------------------------------------------------------------- densities
    def log_prob_composite(self, sample: TensorDictBase, *, include_sum: bool | None = None) -> TensorDictBase:
        op = sample.get("op").long()
        rel = self._relevant(op)
        lp_slot = torch.log_softmax(self._slot_logits_for(op), -1).gather(
            -1, sample.get("slot").long().unsqueeze(-1)
        ).squeeze(-1)
        raw = {
            "op": self.dists["op"].log_prob(op),
            "slot": lp_slot,
            "blueprint": self.dists["blueprint"].log_prob(sample.get("blueprint").long()),
            "tempo": self.dists["tempo"].log_prob(sample.get("tempo").long()),
        }
        zero = torch.zeros((), dtype=raw["op"].dtype, device=op.device)
        out = TensorDict(
            {f"{h}_log_prob": torch.where(rel[h], raw[h], zero) for h in HEAD_KEYS}, batch_size=op.shape
        )
        if include_sum:
            out.set(self.log_prob_key, sum(out[f"{h}_log_prob"] for h in HEAD_KEYS))
        return out

    def log_prob(self, sample: TensorDictBase) -> torch.Tensor | TensorDictBase:
        lp = self.log_prob_composite(sample, include_sum=False)
        if composite_lp_aggregate(nowarn=True):
            return sum(lp[f"{h}_log_prob"] for h in HEAD_KEYS)
        return lp

    def entropy(self, *args: object, **kwargs: object) -> TensorDictBase:
        """Per-head ``E_op[relevant(op) * H(head | op)]`` (op probabilities detached)."""
        p_op = self.dists["op"].probs.detach()  # [.., 5]
        rel = self.relevance.to(p_op.dtype)  # [4, 5]
        h_slot = self.dists["slot"].entropy()  # [.., 5]
        out = {
            "op_entropy": self.dists["op"].entropy(),
            "slot_entropy": (p_op * rel[1] * h_slot).sum(-1),
            "blueprint_entropy": (p_op * rel[2]).sum(-1) * self.dists["blueprint"].entropy(),
            "tempo_entropy": (p_op * rel[3]).sum(-1) * self.dists["tempo"].entropy(),
        }
        return TensorDict(out, batch_size=self.batch_shape)


class _Heads(nn.Module):
    """LSTM features -> per-head logits; masks pass through into the distribution params."""

    def __init__(self, hidden: int, n_slots: int, n_blueprints: int, n_tempos: int, wait_bias: float) -> None:
        super().__init__()
        self.n_slots = n_slots
        self.op = nn.Linear(hidden, NUM_OPS)
        self.slot = nn.Linear(hidden, NUM_OPS * n_slots)
        self.blueprint = nn.Linear(hidden, n_blueprints)
        self.tempo = nn.Linear(hidden, n_tempos)
        # The blueprint head scores the whole catalogue; a run offers a subset, gathered here
        # (``TamiyoModules.use_blueprints``), so logits and masks are in the run's own order.
        self.register_buffer("bp_index", torch.arange(n_blueprints), persistent=False)
        for layer in (self.op, self.slot, self.blueprint, self.tempo):
            nn.init.orthogonal_(layer.weight, gain=0.01)
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.op.bias[Op.WAIT] = wait_bias

    def forward(
        self,
        x: torch.Tensor,
        op_mask: torch.Tensor,
        slot_mask: torch.Tensor,
        blueprint_mask: torch.Tensor,
        tempo_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        slot = self.slot(x).unflatten(-1, (NUM_OPS, self.n_slots))
        blueprint = self.blueprint(x).index_select(-1, self.bp_index)
        return (self.op(x), op_mask, slot, slot_mask, blueprint, blueprint_mask,
                self.tempo(x), tempo_mask)


def _mlp(inp: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.LayerNorm(hidden), nn.Tanh(),
                         nn.Linear(hidden, hidden), nn.Tanh())


class DenormalizedValue(nn.Module):
    """Critic head: a normalized value, returned in the reward scale of ``value_norm``."""

    def __init__(self, hidden: int, value_norm: ValueNorm) -> None:
        super().__init__()
        self.head = nn.Linear(hidden, 1)
        nn.init.orthogonal_(self.head.weight, gain=1.0)
        nn.init.zeros_(self.head.bias)
        self.value_norm = value_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value_norm.denormalize(self.head(x))


@dataclass(frozen=True, slots=True)
class PolicyShape:
    """What the networks are sized by (stored in checkpoints and checked on load)."""

    obs_size: int
    n_slots: int
    n_blueprints: int
    n_tempos: int
    hidden_size: int = 128
    lstm_hidden_size: int = 128
    blueprints: tuple[str, ...] = ()  # the blueprint head's catalogue (empty: the run's own set)


class ZeroStatePrimer(TensorDictPrimer):
    """The LSTM-state primer, resetting without reading the reset mask on the host.

    torchrl's primer asks ``_reset.any()`` at every reset (a device sync per episode); this one
    writes zero state for every env, and torchrl's reset merge keeps only the rows that were
    reset (``InitTracker``'s ``is_init`` restarts the recurrence there anyway).
    """

    def _reset_func(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        parent = self.parent
        if parent is not None and self.primers.shape[: len(parent.shape)] != parent.batch_size:
            self.primers = self._expand_shape(self.primers)
        for key, spec in self.primers.items(True, True):
            tensordict_reset.set(key, spec.zero())
        return tensordict_reset


class TamiyoModules(nn.Module):
    """Actor (probabilistic, factored heads) and critic (``TensorDictSequential``) over the env TensorDict."""

    def __init__(self, shape: PolicyShape, value_norm: ValueNorm, wait_bias: float = 1.0) -> None:
        super().__init__()
        self.shape = shape
        h, lh = shape.hidden_size, shape.lstm_hidden_size
        self.actor_lstm = LSTMModule(
            input_size=h, hidden_size=lh, recurrent_backend="pad",
            in_keys=["actor_embed", *ACTOR_STATE, "is_init"],
            out_keys=["actor_features", *(("next", k) for k in ACTOR_STATE)],
        )
        self.critic_lstm = LSTMModule(
            input_size=h, hidden_size=lh, recurrent_backend="pad",
            in_keys=["critic_embed", *CRITIC_STATE, "is_init"],
            out_keys=["critic_features", *(("next", k) for k in CRITIC_STATE)],
        )
        heads = _Heads(lh, shape.n_slots, shape.n_blueprints, shape.n_tempos, wait_bias)
        self.heads = heads
        param_keys = [("params", h, part) for h in HEAD_KEYS for part in ("logits", "mask")]
        backbone = TensorDictSequential(
            TensorDictModule(_mlp(shape.obs_size, h), in_keys=["observation"], out_keys=["actor_embed"]),
            self.actor_lstm,
            TensorDictModule(heads, in_keys=["actor_features", *MASK_OF.values()], out_keys=param_keys),
        )
        # tensordict's probabilistic module, not torchrl's ProbabilisticActor: the latter's
        # sampling fast path draws each composite component independently (bypassing
        # ``FactoredActionDistribution.sample``), which would ignore slot|op.
        self.actor = ProbabilisticTensorDictSequential(
            backbone,
            ProbabilisticTensorDictModule(
                in_keys=["params"],
                out_keys=list(HEAD_KEYS),
                distribution_class=FactoredActionDistribution,
                distribution_kwargs={"distribution_map": dict.fromkeys(HEAD_KEYS, MaskedCategorical)},
                return_log_prob=True,
                default_interaction_type=InteractionType.RANDOM,
            ),
        )
        self.critic = TensorDictSequential(
            TensorDictModule(_mlp(shape.obs_size, h), in_keys=["observation"], out_keys=["critic_embed"]),
            self.critic_lstm,
            TensorDictModule(DenormalizedValue(lh, value_norm), in_keys=["critic_features"],
                             out_keys=["state_value"]),
        )

    def use_blueprints(self, names: tuple[str, ...] | list[str]) -> TamiyoModules:
        """Offer the run's blueprints ``names`` (its action order) from the head's catalogue.

        A policy without a catalogue (``shape.blueprints`` empty) needs exactly its own count."""
        if self.shape.blueprints:
            index = catalogue_index(list(names), self.shape.blueprints)
        elif len(names) == self.shape.n_blueprints:
            index = list(range(len(names)))
        else:
            raise ValueError(f"this controller has {self.shape.n_blueprints} blueprint outputs and no catalogue; "
                             f"the run offers {len(names)} blueprints {list(names)}")
        dev = self.heads.bp_index.device
        self.heads.bp_index = torch.tensor(index, dtype=torch.long, device=dev)
        return self

    def primer(self) -> TensorDictPrimer:
        """The env transform that carries the actor's hidden state between steps."""
        base = self.actor_lstm.make_tensordict_primer()
        return ZeroStatePrimer(dict(base.primers.items(True, True)), expand_specs=True)

    def log_prob_keys(self) -> list[str]:
        return [f"{h}_log_prob" for h in HEAD_KEYS]


class RecurrentPolicy:
    """The actor as a stateful TensorDict policy for ``simic.runner`` (no primer needed there).

    Keeps each env's hidden state itself and starts it afresh on a fresh host (``signals.epoch``
    0) or on ``reset(mask)``. Actions are sampled (``deterministic=False``) or the per-head
    mode, op first. It also writes the op head's logits and the critic's value estimate, which
    telemetry reports as the decision's "why this action".
    """

    def __init__(self, modules: TamiyoModules, n_envs: int, deterministic: bool = False) -> None:
        self.modules = modules
        self.deterministic = deterministic
        lh = modules.shape.lstm_hidden_size
        dev = next(modules.parameters()).device
        self.state = {k: torch.zeros(n_envs, 1, lh, device=dev) for k in (*ACTOR_STATE, *CRITIC_STATE)}
        self.is_init = torch.ones(n_envs, 1, dtype=torch.bool, device=dev)

    def reset(self, mask: torch.Tensor | None = None) -> None:
        m = torch.ones_like(self.is_init[:, 0]) if mask is None else mask.reshape(-1).to(torch.bool)
        self.is_init = self.is_init | m.unsqueeze(-1)

    @torch.no_grad()
    def __call__(self, td: TensorDictBase) -> TensorDictBase:
        self.reset(td["signals", "epoch"] == 0)
        inp = td.select("observation", *MASK_OF.values()).clone(False)
        for k, v in self.state.items():
            inp.set(k, v)
        inp.set("is_init", self.is_init)
        mode = InteractionType.DETERMINISTIC if self.deterministic else InteractionType.RANDOM
        with set_interaction_type(mode), set_recurrent_mode(False):
            out = self.modules.actor(inp)
            value = self.modules.critic(inp.clone(False))
        self.state = {k: out.get(("next", k)) for k in ACTOR_STATE} | {
            k: value.get(("next", k)) for k in CRITIC_STATE}
        td.set(("params", "op", "logits"), out.get(("params", "op", "logits")))
        td.set("state_value", value.get("state_value"))
        self.is_init = torch.zeros_like(self.is_init)
        for h in HEAD_KEYS:
            td.set(h, out.get(h).long())
        for k in self.modules.log_prob_keys():  # recorded by episode packs (esper.generate)
            lp = out.get(k, None)
            if lp is not None:
                td.set(k, lp)
        return td


__all__ = [
    "ACTOR_STATE",
    "CRITIC_STATE",
    "HEAD_KEYS",
    "DenormalizedValue",
    "FactoredActionDistribution",
    "PolicyShape",
    "RecurrentPolicy",
    "TamiyoModules",
    "relevance_table",
]
