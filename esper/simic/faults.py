"""Fault drills (the ``faults`` config section): failures injected on purpose, each where it
would really happen, so a user (and the test suite) can rehearse that a run survives them.

- NaN / exploding loss: the named envs' host weights are poisoned on the device just before
  the drill's epoch trains, as a diverged optimizer step would leave them (the governor must
  roll them back; the other envs must not notice).
- A failing telemetry backend: the named backend sits on a disk that fills up (buffered writes
  succeed, flushes fail), the case that used to escape the hub's disabling rule.
- A failing checkpoint write: the save runs out of space half-way through its temp file.
- A diverged policy update: a NaN lands in the policy's weights right after the update.

With no fault configured nothing here runs: the env holds ``None`` and the trainer compares
two host ints per round, so the epoch's one device-to-host transfer stays the only one.
"""

from __future__ import annotations

import errno
import io
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from tensordict import TensorDictBase

from esper.atomic import atomic_write
from esper.leyline.events import TelemetryEvent
from esper.nissa.hub import Backend
from esper.simic.config import FaultsConfig, TrainingConfig

DISK_FULL = "No space left on device (fault drill)"


def problems(cfg: TrainingConfig, trains_ppo: bool) -> list[str]:
    """Drills that cannot apply to this run (refused by preflight rather than ignored)."""
    f, out = cfg.faults, []
    for key in ("nan_loss_envs", "explode_loss_envs"):
        bad = [i for i in getattr(f, key) if not 0 <= i < cfg.episode.envs]
        if bad:
            out.append(f"faults.{key} {bad} are not envs of this run (0..{cfg.episode.envs - 1})")
    if (f.nan_loss_envs or f.explode_loss_envs) and f.at_epoch > cfg.episode.length:
        out.append(f"faults.at_epoch {f.at_epoch} is past episode.length ({cfg.episode.length})")
    backends = [b.strip().lower() for b in cfg.telemetry.backends]
    if f.failing_backend is not None and f.failing_backend not in backends:
        out.append(f"faults.failing_backend {f.failing_backend!r} is not one of the run's backends {backends}")
    if f.ppo_training and not trains_ppo:
        drills = ", ".join(f"faults.{k}" for k in f.ppo_training)
        out.append(f"{drills}: drills of PPO training (esper.train --policy ppo), not of this run")
    if trains_ppo and f.checkpoint_fail_rounds and min(f.checkpoint_fail_rounds) < 1:
        out.append("faults.checkpoint_fail_rounds must be rounds 1, 2, ...")
    return out


# ----------------------------------------------------------------------------- losses
class LossFaults:
    """Poisons the drill's envs' host weights before epoch ``at_epoch`` of every episode:
    NaN (a NaN loss) or scaled by ``explode_scale`` (an exploding, finite loss)."""

    def __init__(self, cfg: FaultsConfig, n: int, device: torch.device, offset: int | None = None) -> None:
        """``offset``: these ``n`` envs are envs ``offset ..`` of a sharded run (drill envs of other
        blocks are skipped); None: the whole run (every drill env must be one of the ``n``)."""
        factor = torch.ones(n, dtype=torch.float64)
        targets = np.zeros(n, dtype=bool)
        for envs, value in ((cfg.explode_loss_envs, cfg.explode_scale), (cfg.nan_loss_envs, float("nan"))):
            for i in envs:
                j = i - (offset or 0)
                if offset is None and not 0 <= j < n:
                    raise ValueError(f"faults: env {i} is not one of the {n} envs")
                if 0 <= j < n:
                    factor[j], targets[j] = value, True
        self.at_epoch = cfg.at_epoch
        self.targets = targets
        self.factor = factor.to(device)
        self.device = device
        self.hits = 0  # epochs in which some env was poisoned

    @classmethod
    def build(cls, cfg: FaultsConfig, n: int, device: torch.device, offset: int | None = None) -> LossFaults | None:
        """The drill for an env, or None (the common case: nothing to do, nothing paid)."""
        return cls(cfg, n, device, offset) if cfg.nan_loss_envs or cfg.explode_loss_envs else None

    @torch.no_grad()
    def before_epoch(self, host_epoch: np.ndarray, host: TensorDictBase) -> None:
        """Poison the target envs about to run epoch ``at_epoch`` (``host_epoch``: the epoch
        each env last finished, known on the host)."""
        due = self.targets & (host_epoch + 1 == self.at_epoch)
        if not due.any():
            return
        mask = torch.as_tensor(due, device=self.device)
        for t in host.values(include_nested=True, leaves_only=True):
            shape = (-1, *([1] * (t.dim() - 1)))
            t.copy_(torch.where(mask.view(shape), t * self.factor.to(t.dtype).view(shape), t))
        self.hits += 1


# ----------------------------------------------------------------------------- telemetry
class FullDiskBackend:
    """A backend on a disk that fills up after ``fails_after`` flushes: ``emit`` buffers and
    succeeds, every later ``flush`` raises ENOSPC and the buffered events are gone."""

    def __init__(self, inner: Backend, fails_after: int) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", type(inner).__name__)
        self.fails_after = fails_after
        self.flushes = 0
        self.pending: list[TelemetryEvent] = []

    def emit(self, event: TelemetryEvent) -> None:
        self.pending.append(event)

    def flush(self) -> None:
        if self.flushes >= self.fails_after:
            self.pending.clear()
            raise OSError(errno.ENOSPC, DISK_FULL)
        self.flushes += 1
        for event in self.pending:
            self.inner.emit(event)
        self.pending.clear()
        self.inner.flush()

    def close(self) -> None:
        self.pending.clear()  # what is still buffered never reaches the full disk
        self.inner.close()


def wrap_backends(backends: list[Backend], cfg: FaultsConfig) -> list[Backend]:
    """The run's backends, the drill's failing one wrapped (all unchanged without a drill)."""
    if cfg.failing_backend is None:
        return backends
    return [FullDiskBackend(b, cfg.backend_fails_after) if getattr(b, "name", None) == cfg.failing_backend else b
            for b in backends]


# ----------------------------------------------------------------------------- checkpoints, policy
def failing_save(path: str | Path, payload: dict[str, Any]) -> Path:
    """A checkpoint save that runs out of space half-way through its temp file (the atomic
    write must leave the previous checkpoint and no temp file behind)."""
    data = io.BytesIO()
    torch.save(payload, data)

    def write(f: IO[Any]) -> None:
        f.write(data.getvalue()[: data.tell() // 2])
        raise OSError(errno.ENOSPC, DISK_FULL, str(path))

    return atomic_write(path, write)


def checkpoint_saver(cfg: FaultsConfig, round_: int) -> Callable[[str | Path, dict[str, Any]], Path] | None:
    """The drill's failing save for ``round_``, or None (save normally)."""
    return failing_save if round_ in cfg.checkpoint_fail_rounds else None


@torch.no_grad()
def poison_policy(params: list[torch.Tensor], cfg: FaultsConfig, round_: int) -> bool:
    """A NaN in the first policy weight after round ``policy_nan_at_round``'s update."""
    if cfg.policy_nan_at_round != round_ or not params:
        return False
    params[0].view(-1)[0] = float("nan")
    return True
