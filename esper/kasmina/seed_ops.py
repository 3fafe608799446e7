"""The controller's lifecycle actions on :class:`~esper.kasmina.epoch.MorphogeneticBatch` and
its per-env state queries (gates, stacked slot state, parameters and FLOPs added).

A mixin of the batch: its methods read the batch's state, arch, lifecycle and pending
germinations. Everything stays on the device.
"""

from __future__ import annotations

import numpy as np
import torch
from tensordict import TensorDict

from esper.kasmina.gates import evaluate_gates
from esper.kasmina.state import init_seeds, init_state, where_envs
from esper.leyline import GateId, Op, SeedStage

S = SeedStage


class SeedOps:
    """Lifecycle actions (germinate, advance, fossilize, cull), env resets, seed
    re-initialization, queries."""

    def reinit_germinated(self, germinated: np.ndarray, blueprint: np.ndarray) -> None:
        """Re-initialize the seeds germinated this epoch, from its host snapshot.

        ``germinated`` and ``blueprint`` ``[N, S]`` are the snapshot's: only the (slot,
        blueprint) pairs that germinated are initialized, and nothing at all in an epoch
        without a germination. Call it after every epoch's transfer (the pipeline does), or
        the next epoch re-initializes every blueprint of every slot, masked.
        """
        self._reinit_listed(germinated, blueprint)

    def _reinit_listed(self, germinated: np.ndarray, blueprint: np.ndarray | None = None) -> None:
        """Fresh parameters and momentum for the pending germinations a host snapshot lists.

        The host picks which (slot, blueprint) pairs to make (every blueprint of the slot when
        ``blueprint`` is not given); the device's pending mask picks the envs, so no index list
        is copied to the device. Germinations the snapshot does not list are dropped: it must
        be the snapshot of the epoch that made them.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        for k, slot in enumerate(self.arch.slots):
            listed = np.asarray(germinated[:, k], dtype=bool)
            if not listed.any():
                continue
            if blueprint is None:
                self._reinit_seeds(slot, pending[:, k])
                continue
            current = self.state["slots", slot, "blueprint"]
            for b in np.unique(blueprint[listed, k]).tolist():
                self._reinit_seeds(slot, pending[:, k] & (current == b), (b,))

    def reset_envs(self, mask: torch.Tensor) -> None:
        """Fresh hosts (new per-env keys) for envs in ``mask``; the others continue untouched."""
        self.episode = self.episode + mask.long()
        self.epoch = torch.where(mask, torch.zeros_like(self.epoch), self.epoch)
        self.keys = self._env_keys()
        fresh = init_state(self.arch, self.keys, self.sample_shape, self.num_classes, self._adam)
        where_envs(mask, fresh, self.state)
        where_envs(mask, self._initial_signals(), self.last)

    # ----------------------------------------------------------------------------- actions
    def apply_actions(self, actions: TensorDict) -> dict[str, torch.Tensor]:
        """Lifecycle ops requested by the controller: ``op, slot, blueprint, tempo`` ``[N]``.

        Returns ``accepted [N]`` (WAIT always succeeds) and per-slot ``germinated [N, S]``.
        """
        op, slot_idx = actions["op"], actions["slot"]
        accepted = op == Op.WAIT
        germinated = []
        gates = self.last["gate_pass"]
        for k, slot in enumerate(self.arch.slots):
            st = self.state["slots", slot]
            here = slot_idx == k
            g = self.lifecycle.germinate(
                st, (op == Op.GERMINATE) & here, actions["blueprint"], actions["tempo"],
                len(self.arch.blueprints), self.last["val_acc"],
            )
            a = self.lifecycle.advance(st, (op == Op.ADVANCE) & here, gates[:, k])
            f = self.lifecycle.fossilize(st, (op == Op.FOSSILIZE) & here, gates[:, k, GateId.G5_FOSSILIZE])
            c = self.lifecycle.cull(st, (op == Op.CULL) & here)
            accepted = accepted | g | a | f | c
            germinated.append(g)
        fresh = torch.stack(germinated, dim=1)
        # A germinated seed first computes next epoch (GERMINATED trains nothing), so its
        # fresh parameters wait for the epoch's host snapshot, which names the germinations
        # (reinit_germinated, or set_plan); without a snapshot the next epoch re-initializes
        # them masked. Deciding here would need the device's mask on the host: a sync.
        self._pending = fresh if self._pending is None else self._pending | fresh
        return {"accepted": accepted, "germinated": fresh}

    def _reinit_pending(self) -> None:
        """Masked re-initialization (every blueprint, all envs) of the pending germinations:
        the fallback when no host snapshot says which ones there are."""
        mask, self._pending = self._pending, None
        if mask is None:
            return
        for k, slot in enumerate(self.arch.slots):
            self._reinit_seeds(slot, mask[:, k])

    def _reinit_seeds(self, slot: str, mask: torch.Tensor, only: tuple[int, ...] | None = None) -> None:
        """Fresh parameters, zero momentum for envs in ``mask`` (blueprints ``only``, or all)."""
        fresh = init_seeds(self.arch, self.keys, slot, self.state["slots", slot, "germinations"], only)
        where_envs(mask, fresh, self.state["seeds", slot])
        where_envs(mask, fresh.apply(torch.zeros_like), self.state["seed_mom", slot])
        if self._adam:
            where_envs(mask, fresh.apply(torch.zeros_like), self.state["seed_sq", slot])

    # ----------------------------------------------------------------------------- queries
    def gates(self, val_acc: torch.Tensor, seed_grad_norm: torch.Tensor, host_grad_norm: torch.Tensor):
        return evaluate_gates(
            self.cfg.gates,
            stage=self._stacked("stage"),
            epochs_in_stage=self._stacked("epochs_in_stage"),
            alpha=self._stacked("alpha"),
            seed_grad_norm=seed_grad_norm,
            host_grad_norm=host_grad_norm.unsqueeze(1).expand_as(seed_grad_norm),
            contribution=self._stacked("contribution"),
            acc_gain=val_acc.unsqueeze(1) - self._stacked("acc_at_germination"),
        )

    def _stacked(self, key: str) -> torch.Tensor:
        return torch.stack([self.state["slots", s, key] for s in self.arch.slots], dim=1)

    def _present(self) -> torch.Tensor:
        stage = self._stacked("stage")
        return self.lifecycle.live[stage] | (stage == S.FOSSILIZED)

    def params_added(self) -> torch.Tensor:
        """Parameters of live and fossilized seeds per env ``[N]``."""
        per_slot = self._param_table.gather(1, self._stacked("blueprint").T).T  # [N, S]
        return (per_slot * self._present()).sum(dim=1)

    def flops_added(self) -> torch.Tensor:
        per_slot = self._flop_table.gather(1, self._stacked("blueprint").T).T
        return (per_slot * self._present()).sum(dim=1)
