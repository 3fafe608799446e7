"""Shared workloads for the throughput benchmarks and the scaling study.

The same work two ways: the batched engine (:class:`MorphogeneticBatch`, one tensor program
for N envs) and a Python loop over N :class:`ReferenceHost` ``nn.Module``s (one per env, same
minibatches, same active seeds). Plus the per-epoch telemetry work of each Nissa profile.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tensordict import TensorDict

from esper.kasmina.blueprints import BLUEPRINTS
from esper.kasmina.epoch import KasminaConfig, MorphogeneticBatch
from esper.kasmina.gates import GateConfig
from esper.kasmina.state import as_dicts
from esper.leyline import Op
from esper.nissa import load_profile, materialize
from esper.tasks import TaskData, load_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_host import ReferenceHost

PROFILES = ("minimal", "standard", "diagnostic", "research")


@dataclass(frozen=True)
class Workload:
    """Task size and batch sizes of one benchmark epoch."""

    train_size: int = 128
    val_size: int = 128
    batch_size: int = 32
    val_batch_size: int = 128
    host: str = "impaired"

    def task(self, device: str = "cpu") -> TaskData:
        return load_task(
            "synthetic", train_size=self.train_size, val_size=self.val_size, seed=1, device=device
        )

    def config(self, **kw: object) -> KasminaConfig:
        base = {
            "host": self.host,
            "batch_size": self.batch_size,
            "val_batch_size": self.val_batch_size,
            "gates": GateConfig(min_training_epochs=0, grad_ratio_floor=0.0),
        }
        return KasminaConfig(**{**base, **kw})  # type: ignore[arg-type]


def actions(
    n: int, op: int, blueprints: torch.Tensor | None = None, device: str = "cpu"
) -> TensorDict:
    """Env i acts on slot ``i % 3`` with blueprint ``blueprints[i]`` (default ``i % 8``)."""
    idx = torch.arange(n, device=device)
    bp = blueprints if blueprints is not None else idx % len(BLUEPRINTS)
    return TensorDict(
        {
            "op": torch.full((n,), int(op), device=device),
            "slot": idx % 3,
            "blueprint": bp.to(device),
            "tempo": torch.zeros(n, dtype=torch.long, device=device),
        },
        batch_size=[n],
    )


def planned(mb: MorphogeneticBatch) -> MorphogeneticBatch:
    """Switch ``mb`` to group-by-blueprint, planned from its last signals (as the runner does)."""
    mb.set_plan(mb.last["stage"].cpu().numpy(), mb.last["blueprint"].cpu().numpy())
    return mb


def seeded_batch(
    task: TaskData, n: int, cfg: KasminaConfig, warm_epochs: int = 1
) -> MorphogeneticBatch:
    """N envs after germinating a seed in every env (mixed blueprints and slots) and training.

    With the default config ``warm_epochs=1`` leaves every seed in TRAINING; a second epoch
    with ADVANCE would put them in BLENDING.
    """
    mb = MorphogeneticBatch(task, n, cfg, base_seed=0)
    nb = len(mb.arch.blueprints)
    bps = torch.arange(n, device=task.device) % nb
    mb.run_epoch(actions(n, Op.GERMINATE, bps, str(task.device)))
    for _ in range(warm_epochs - 1):
        mb.run_epoch(actions(n, Op.WAIT, bps, str(task.device)))
    return mb


# ---------------------------------------------------------------------------- batched engine
def batched_step(mb: MorphogeneticBatch) -> Callable[[], dict[str, torch.Tensor]]:
    """One training step of all envs on a fixed minibatch (the engine's own step function)."""
    x, y = next(iter(mb.sampler.epoch(mb.keys, mb.epoch)))
    st = as_dicts(mb.state)
    ctrl = mb.controls()
    step = mb._step_for(frozenset())
    return lambda: step(
        st["host"], st["buffers"], st["seeds"], st["host_mom"], st["seed_mom"], ctrl, x, y,
        plans=mb._plans,
    )


def planned_epoch(mb: MorphogeneticBatch) -> Callable[[], TensorDict]:
    """An epoch as the runner drives it: run, then plan the next from the signals."""
    wait = actions(mb.n, Op.WAIT, device=str(mb.device))

    def run() -> TensorDict:
        signals = mb.run_epoch(wait)
        mb.set_plan(signals["stage"].cpu().numpy(), signals["blueprint"].cpu().numpy(),
                    signals["germinated"].cpu().numpy())
        return signals

    return run


def batched_epoch(mb: MorphogeneticBatch) -> Callable[[], TensorDict]:
    """One full env epoch (actions, train, validate with counterfactuals, gates) for all envs."""
    wait = actions(mb.n, Op.WAIT, device=str(mb.device))
    return lambda: mb.run_epoch(wait)


# ---------------------------------------------------------------------------- loop baseline
@dataclass
class Loop:
    """N separate nn.Module hosts (copied from a batch) with their own optimizers."""

    hosts: list[ReferenceHost]
    optimizers: list[list[tuple[torch.optim.SGD, list[torch.nn.Parameter]]]]
    mb: MorphogeneticBatch

    @classmethod
    def from_batch(cls, mb: MorphogeneticBatch) -> Loop:
        hosts = [ReferenceHost.from_batch(mb, i).to(mb.device) for i in range(mb.n)]
        return cls(hosts, [h.make_optimizers(mb.cfg.step) for h in hosts], mb)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        clip = self.mb.cfg.step.max_grad_norm
        return [
            h.train_step(o, x[i], y[i], clip)
            for i, (h, o) in enumerate(zip(self.hosts, self.optimizers, strict=True))
        ]

    def epoch(self) -> list[torch.Tensor]:
        """Every env trains on its own minibatches (same sampler), then validates with counterfactuals."""
        mb = self.mb
        for x, y in mb.sampler.epoch(mb.keys, mb.epoch):
            self.step(x, y)
        vx = mb.task.prepare(mb.task.val_x)
        chunk = mb.cfg.val_batch_size
        return [h.validate(vx, mb.task.val_y, chunk)[1] for h in self.hosts]


def loop_step(mb: MorphogeneticBatch) -> Callable[[], list[torch.Tensor]]:
    loop = Loop.from_batch(mb)
    x, y = next(iter(mb.sampler.epoch(mb.keys, mb.epoch)))
    return lambda: loop.step(x, y)


def loop_epoch(mb: MorphogeneticBatch) -> Callable[[], list[torch.Tensor]]:
    return Loop.from_batch(mb).epoch


# ---------------------------------------------------------------------------- telemetry
def telemetry_epoch(mb: MorphogeneticBatch, profile: str | None) -> Callable[[], dict]:
    """One epoch plus the profile's diagnostics and the single materialization.

    Uses the training path's own :class:`esper.simic.telemetry.EpochTelemetry` (captures
    requested from the step, ``DiagnosticTracker.collect``). ``profile=None`` is telemetry
    off: the epoch's signals are still materialized once (the controller needs them).
    """
    from esper.simic.telemetry import EpochTelemetry

    wait = actions(mb.n, Op.WAIT, device=str(mb.device))
    if profile is None:
        return lambda: materialize(mb.run_epoch(wait))
    tel = EpochTelemetry(load_profile(profile), mb)

    def run() -> dict:
        capture = tel.begin_epoch(0)
        signals = mb.run_epoch(wait, capture=capture)
        signals["telemetry"] = tel.diagnostics(signals)
        return materialize(signals)

    return run


# ---------------------------------------------------------------------------- timing
def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(
    fn: Callable[[], object], repeats: int, device: str | torch.device = "cpu"
) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


__all__ = [
    "PROFILES",
    "Loop",
    "Workload",
    "actions",
    "batched_epoch",
    "batched_step",
    "loop_epoch",
    "loop_step",
    "median_time",
    "seeded_batch",
    "telemetry_epoch",
]
