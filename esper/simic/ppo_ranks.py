"""PPO over K ranks that updates the policy exactly as one process over all envs would.

Gradients are averaged by DDP: ``(1/K) sum_r grad_r``. Everything else that is not per env is
made global here:

* **Minibatches by global env index.** The shuffle generator is the same on every rank, so every
  rank walks the same minibatches of whole env sequences; rank r evaluates the ones it holds.
  The single-process loss is a mean over the minibatch's valid steps, so rank r scales its own
  mean loss by ``K * valid_r / valid``: the DDP average is then the single-process loss and its
  gradient. A rank holding none of a minibatch still runs forward and backward (DDP's
  all-reduce needs every rank) on one of its envs with weight 0.
* **Statistics over the whole batch.** After GAE the advantages, value targets, values and
  validity masks of all envs are gathered once per round (``[N, T]`` numbers, small beside the
  batch): per-minibatch advantage normalization, the value normalizer's update and explained
  variance then see exactly the tensors one process would. (Gathering is cheaper and exact
  where all-reducing sums and squares would round differently from torch's mean and std.)
* **Metrics and early stopping.** Logged means are weighted by each rank's share and summed
  over ranks: once per pass for the target-KL test (every rank stops at the same pass), once
  per round for the rest.

With one rank all of this is the identity: weights 1, no collective.

Why DDP rather than torchrl's distributed collectors feeding one learner: the update is ~1 % of
a round (measured on the CPU, ``ppo`` preset, 8 envs x 10 epochs: update 0.04-0.15 s, collection
12 s), so the choice does not move throughput; what decides it is that with DDP every rank keeps
its collector in-process over its own envs (the epoch pipeline, its one transfer per epoch and
its telemetry stay as they are), no learner rank idles while others collect, every rank holds
the policy (checkpoints and resume need no weight shipping), and the update is provably the
single-process one. Bytes moved are small either way: per round a central learner would
receive the batch (73 KB per env at the ``ppo`` preset: 4.7 MB for 64 envs), DDP all-reduces
the gradient once per minibatch (90k parameters, 360 KB, 64 minibatches for 64 envs: 23 MB).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase

from esper.simic.distributed import Ranks

GATHERED: tuple[str, ...] = ("advantage", "value_target", "state_value", "shifted_valid")
MAX_KEYS: tuple[str, ...] = ("ratio_max", "lstm_h_norm", "lstm_c_norm")


@dataclass(slots=True)
class Part:
    """This rank's share of one minibatch."""

    rows: torch.Tensor  # local env rows to evaluate (one dummy row when none is held)
    advantage: torch.Tensor  # their advantages, normalized over the whole minibatch
    loss_weight: torch.Tensor | None  # K * valid_r / valid (None with one rank: exactly 1)
    share: float  # this rank's fraction of the minibatch's envs (weights unmasked means)


class ShardedLearner:
    """Rank ``ranks.rank``'s view of the learner's batch: envs ``offset .. offset + count`` of ``total``."""

    def __init__(self, ranks: Ranks, offset: int, count: int, total: int) -> None:
        self.ranks, self.offset, self.count, self.total = ranks, offset, count, total
        self.full: TensorDictBase | None = None

    def gather_rows(self, x: torch.Tensor, what: str) -> torch.Tensor:
        return self.ranks.gather_rows(x, self.total, what)

    def gather(self, batch: TensorDictBase) -> TensorDictBase:
        """The whole run's ``[N, T]`` advantages, value targets, values and validity (after GAE)."""
        keys = [k for k in GATHERED if batch.get(k, None) is not None]
        t = batch.batch_size[1]
        self.full = TensorDict({k: self.gather_rows(batch.get(k), f"PPO batch ({k})") for k in keys},
                               batch_size=[self.total, t], device=batch.device)
        return self.full

    def part(self, chunk: torch.Tensor,
             standardize: Callable[[torch.Tensor, TensorDictBase], torch.Tensor]) -> Part:
        """This rank's rows of the minibatch ``chunk`` (global env indices, on the CPU)."""
        if self.full is None:
            raise RuntimeError("gather() the round's batch before taking minibatches")
        device = self.full.device
        whole = self.full[chunk.to(device)]
        advantage = standardize(whole.get("advantage"), whole)
        if self.ranks.world == 1:
            return Part(rows=chunk.to(device), advantage=advantage, loss_weight=None, share=1.0)
        mine = (chunk >= self.offset) & (chunk < self.offset + self.count)
        held = int(mine.sum())
        if held == 0:
            return Part(rows=torch.zeros(1, dtype=torch.long, device=device),
                        advantage=torch.zeros_like(advantage[:1]), loss_weight=torch.zeros((), device=device),
                        share=0.0)
        mine_d = mine.to(device)
        valid = whole.get("shifted_valid", None)
        if valid is None:
            frac = torch.tensor(held / chunk.numel(), device=device)
        else:
            v = valid.reshape(valid.shape[0], -1).float()
            frac = v[mine_d].sum() / v.sum().clamp_min(1.0)
        return Part(rows=(chunk[mine] - self.offset).to(device), advantage=advantage[mine_d],
                    loss_weight=frac * self.ranks.world, share=held / chunk.numel())

    def sum(self, x: torch.Tensor, what: str = "PPO metrics") -> torch.Tensor:
        return self.ranks.reduce(x, "sum", what)

    def health(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Post-update health over all ranks: maxima, the ratio's minimum, non-finite counts summed."""
        if self.ranks.world == 1:
            return local
        hi = self.ranks.reduce(torch.stack([local[k].float() for k in MAX_KEYS]), "max", "PPO health")
        lo = self.ranks.reduce(local["ratio_min"].float(), "min", "PPO health")
        bad = self.ranks.reduce(local["lstm_nonfinite"].float(), "sum", "PPO health")
        return {**dict(zip(MAX_KEYS, hi, strict=True)), "ratio_min": lo, "lstm_nonfinite": bad}
