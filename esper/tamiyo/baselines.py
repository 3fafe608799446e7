"""Baseline controllers: static (always WAIT), random legal actions, a fixed growth schedule.

Each is a TensorDict policy like the heuristic: it reads the env's TensorDict and writes
``op, slot, blueprint, tempo, reason``, for all envs at once.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from esper import rng
from esper.leyline import TEMPOS, Op, Reason
from esper.tamiyo.heuristic import first_true, fresh_hosts, pick, preferred_slot


def _write(td: TensorDictBase, op: torch.Tensor, slot: torch.Tensor, blueprint: torch.Tensor,
           tempo: torch.Tensor, reason: torch.Tensor) -> TensorDictBase:
    for key, value in (("op", op), ("slot", slot), ("blueprint", blueprint), ("tempo", tempo),
                       ("reason", reason)):
        td.set(key, value.long())
    return td


class StaticPolicy:
    """Never grows the host: WAIT every epoch."""

    def __call__(self, td: TensorDictBase) -> TensorDictBase:
        n = td.batch_size[0]
        zero = torch.zeros(n, dtype=torch.long, device=td.device)
        return _write(td, zero, zero, zero, zero, torch.full_like(zero, int(Reason.STATIC)))


def masked_uniform(keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One uniform draw per row among the True entries of ``mask [N, K]`` (0 if none)."""
    u = rng.uniform(keys, (mask.shape[-1],))
    return torch.where(mask, u, torch.full_like(u, -1.0)).argmax(dim=-1)


class RandomPolicy:
    """Uniform over legal actions, head by head; per-env counter-based randomness."""

    def __init__(self, n_envs: int, seed: int = 0, env_offset: int = 0,
                 device: torch.device | str = "cpu") -> None:
        dev = torch.device(device)
        ids = torch.arange(env_offset, env_offset + n_envs, device=dev)
        self.keys = rng.stream_key(torch.full((n_envs,), seed, device=dev), ids, 0x7A)
        self.episode = torch.zeros(n_envs, dtype=torch.long, device=dev)
        self.calls = torch.zeros(n_envs, dtype=torch.long, device=dev)

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """New draws for a new episode of the envs in ``mask``."""
        m = torch.ones_like(self.episode, dtype=torch.bool) if mask is None else mask
        self.episode = self.episode + m.long()
        self.calls = torch.where(m, torch.zeros_like(self.calls), self.calls)

    def __call__(self, td: TensorDictBase) -> TensorDictBase:
        self.reset(fresh_hosts(td))
        k = rng.stream_key(self.keys, self.episode, self.calls)
        self.calls = self.calls + 1
        op = masked_uniform(rng.stream_key(k, 1), td["op_mask"])
        slot_legal = td["slot_mask"].gather(
            1, op.view(-1, 1, 1).expand(-1, 1, td["slot_mask"].shape[-1])
        ).squeeze(1)
        slot = masked_uniform(rng.stream_key(k, 2), slot_legal)
        blueprint = masked_uniform(rng.stream_key(k, 3), td["blueprint_mask"])
        tempo = masked_uniform(rng.stream_key(k, 4), td["tempo_mask"])
        return _write(td, op, slot, blueprint, tempo, torch.full_like(op, int(Reason.RANDOM)))


class FixedSchedulePolicy:
    """Germinate ``blueprint`` at the given epochs into the first free slot; advance and
    fossilize whenever the gates pass (the reference system's fixed growth schedule)."""

    def __init__(
        self, blueprint: int, epochs: tuple[int, ...], tempo_index: int = 1, slot_preference: str = "deepest"
    ) -> None:
        if not epochs:
            raise ValueError("the fixed schedule needs at least one germination epoch")
        if not 0 <= tempo_index < len(TEMPOS):
            raise ValueError(f"tempo_index must be in 0..{len(TEMPOS) - 1}")
        self.blueprint = blueprint
        self.epochs = tuple(sorted(set(epochs)))
        self.tempo_index = tempo_index
        self.slot_preference = slot_preference
        self._due: torch.Tensor | None = None

    def __call__(self, td: TensorDictBase) -> TensorDictBase:
        sig = td["signals"]
        epoch = sig["epoch"]
        n, dev = epoch.shape[0], epoch.device
        if self._due is None or self._due.device != dev:
            self._due = torch.tensor(self.epochs, device=dev)
        slot_mask = td["slot_mask"]
        due = (epoch[:, None] == self._due[None, :]).any(1)
        bp_ok = pick(td["blueprint_mask"], torch.full((n,), self.blueprint, device=dev))
        germ = due & slot_mask[:, Op.GERMINATE].any(1) & bp_ok
        adv = slot_mask[:, Op.ADVANCE]
        foss = slot_mask[:, Op.FOSSILIZE]
        op = torch.full((n,), int(Op.WAIT), dtype=torch.long, device=dev)
        slot = torch.zeros(n, dtype=torch.long, device=dev)
        reason = torch.full((n,), int(Reason.WAIT_SCHEDULE), dtype=torch.long, device=dev)
        for when, where, o, r in (
            (germ, preferred_slot(slot_mask[:, Op.GERMINATE], self.slot_preference), Op.GERMINATE,
             Reason.GERMINATE_SCHEDULE),
            (adv.any(1), first_true(adv), Op.ADVANCE, Reason.ADVANCE_GATE_PASSED),
            (foss.any(1), first_true(foss), Op.FOSSILIZE, Reason.FOSSILIZE_CONTRIBUTION),
        ):
            op = torch.where(when, int(o), op)
            slot = torch.where(when, where, slot)
            reason = torch.where(when, int(r), reason)
        blueprint = torch.full((n,), self.blueprint, dtype=torch.long, device=dev)
        tempo = torch.full((n,), self.tempo_index, dtype=torch.long, device=dev)
        return _write(td, op, slot, blueprint, tempo, reason)
