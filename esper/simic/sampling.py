"""PPO's action sampling keyed per env: env i draws the same actions wherever it runs.

torch's global generator hands out numbers in batch order, so a sampled action of env i would
depend on how many envs share its process, hence on the number of ranks. Here the noise of each
decision is a pure function of (host seed, env index in the run, episode, epoch) through
:mod:`esper.rng`, and the factored distribution samples by Gumbel-max, head by head (the slot
given the op): ``argmax(logits + Gumbel noise)`` is an exact draw from the softmax, so the
policy, its log-probabilities and the loss are unchanged; only where the randomness comes from
is.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDictBase
from tensordict.nn import (
    InteractionType,
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    TensorDictModule,
)
from torch import nn

from esper import rng
from esper.kasmina.epoch import MorphogeneticBatch
from esper.leyline import NUM_OPS
from esper.tamiyo.lstm_policy import HEAD_KEYS, FactoredActionDistribution, TamiyoModules

NOISE_KEY = ("params", "noise")
SAMPLING_STREAM = 0x5A3D  # the actions' stream, apart from the hosts' own draws


class KeyedFactoredDistribution(FactoredActionDistribution):
    """:class:`FactoredActionDistribution` sampling by Gumbel-max from ``params["noise"]``
    (``[.., ops + slots + blueprints + tempos]``), when the params carry it."""

    def __init__(self, params: TensorDictBase, *args: Any, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        self.noise = params.get("noise", None)

    def sample(self, shape: torch.Size | None = None) -> TensorDictBase:
        if self.noise is None or (shape is not None and len(shape) > 0):
            return super().sample(shape)
        widths = [self.dists[h].logits.shape[-1] for h in HEAD_KEYS]
        g_op, g_slot, g_bp, g_tempo = self.noise.split(widths, dim=-1)
        op = (self.dists["op"].logits + g_op).argmax(-1)
        slot = (self._slot_logits_for(op) + g_slot).argmax(-1)
        bp = (self.dists["blueprint"].logits + g_bp).argmax(-1)
        tempo = (self.dists["tempo"].logits + g_tempo).argmax(-1)
        return self._assemble(op, slot, bp, tempo)


class EnvNoise(nn.Module):
    """Gumbel noise ``[N, width]`` for each env's decision at ``epoch``, keyed by the env's
    index in the run and its episode counter (read from the batch at call time)."""

    def __init__(self, batch: MorphogeneticBatch, seed: int, width: int) -> None:
        super().__init__()
        self.batch = batch
        self.width = width
        self.key = rng.stream_key(torch.tensor([int(seed)], device=batch.device), SAMPLING_STREAM)

    def forward(self, epoch: torch.Tensor) -> torch.Tensor:
        b = self.batch
        keys = rng.stream_key(self.key.expand(b.n), b.env_ids, b.episode, epoch.reshape(b.n))
        u = rng.uniform(keys, (self.width,)).clamp_min(2.0 ** -25)  # in (0, 1): finite noise
        return -torch.log(-torch.log(u))


def keyed_actor(modules: TamiyoModules, batch: MorphogeneticBatch, seed: int) -> ProbabilisticTensorDictSequential:
    """The actor of ``modules`` (same parameters) sampling with :class:`EnvNoise`: PPO's collector."""
    shape = modules.shape
    backbone, prob = modules.actor.module[0], modules.actor.module[-1]
    width = NUM_OPS + shape.n_slots + len(batch.blueprint_names) + shape.n_tempos  # the run's blueprints
    noise = TensorDictModule(EnvNoise(batch, seed, width), in_keys=[("signals", "epoch")], out_keys=[NOISE_KEY])
    keyed = ProbabilisticTensorDictModule(
        in_keys=["params"],
        out_keys=list(HEAD_KEYS),
        distribution_class=KeyedFactoredDistribution,
        distribution_kwargs=dict(prob.distribution_kwargs),
        return_log_prob=True,
        default_interaction_type=InteractionType.RANDOM,
    )
    return ProbabilisticTensorDictSequential(backbone, noise, keyed)
