"""Batched engine vs a Python loop over N separate nn.Module hosts doing the same work.

``pytest bench/ --benchmark-only``. For N in {1, 8, 64}: one training step and one full env
epoch (train + counterfactual validation), both ways, on the same minibatches with the same
active seeds (env i holds blueprint ``i % 8`` in slot ``i % 3``, in TRAINING). Three batched
variants: ``batched`` computes every blueprint masked (eager), ``planned`` runs each blueprint
only for its envs (group-by-blueprint, eager; see RESULTS.md), ``compiled`` is the planned
layout under ``torch.compile`` (the ``--compile`` path). ``extra_info`` records
``env_epochs_per_s`` (epoch cases), ``env_steps_per_s`` (step cases) and, on the batched
cases, ``speedup_vs_loop`` (loop time / batched time; the loop case runs first). The compiled
cases also record ``compile_s`` and ``compile_graphs`` (the first calls, excluded from the
timing) and ``graphs_while_timed`` (0: the timed calls compiled nothing).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch._dynamo.utils import counters
from workloads import (
    MorphogeneticBatch,
    Workload,
    batched_epoch,
    batched_step,
    loop_epoch,
    loop_step,
    planned,
    planned_epoch,
    seeded_batch,
)

WORK = Workload()
SIZES = (1, 8, 64)
# Rounds per (kind, n): the N=64 loop epoch is seconds per call on a 2-core CPU.
ROUNDS = {("step", 1): 5, ("step", 8): 3, ("step", 64): 2, ("epoch", 1): 3, ("epoch", 8): 2, ("epoch", 64): 1}
_BATCHES: dict[tuple[int, str, str], MorphogeneticBatch] = {}


def _cases() -> list:
    out = []
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for kind in ("step", "epoch"):
            for n in SIZES:
                for impl in ("loop", "batched", "planned", "compiled"):  # loop first: the others record the ratio
                    out.append(pytest.param(kind, n, impl, device, marks=marks, id=f"{kind}-{impl}-N{n}-{device}"))
    return out


def _batch(n: int, device: str, impl: str) -> MorphogeneticBatch:
    key = (n, device, "batched" if impl == "loop" else impl)
    if key not in _BATCHES:
        mb = seeded_batch(WORK.task(device), n, WORK.config(compile=impl == "compiled"))
        _BATCHES[key] = mb if impl in ("loop", "batched") else planned(mb)
    return _BATCHES[key]


def _timed(fn: Callable[[], object], device: str) -> Callable[[], object]:
    if device != "cuda":
        return fn

    def run() -> object:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize(("kind", "n", "impl", "device"), _cases())
def test_batched_vs_loop(benchmark, results, kind: str, n: int, impl: str, device: str) -> None:
    mb = _batch(n, device, impl)
    make = {("step", "batched"): batched_step, ("step", "loop"): loop_step, ("step", "planned"): batched_step,
            ("step", "compiled"): batched_step, ("epoch", "batched"): batched_epoch, ("epoch", "loop"): loop_epoch,
            ("epoch", "planned"): planned_epoch, ("epoch", "compiled"): planned_epoch}[(kind, impl)]  # fmt: skip
    fn = _timed(make(mb), device)
    fn()  # warm-up (allocator, first-call dispatch; compile when configured)
    graphs = counters["stats"]["unique_graphs"]
    rounds = ROUNDS[(kind, n)] if impl == "loop" else max(ROUNDS[(kind, n)], 2)
    benchmark.pedantic(fn, rounds=rounds, iterations=1)
    if impl == "compiled":
        benchmark.extra_info.update({"compile_s": mb.compile_seconds, "compile_graphs": mb.compile_graphs,
                                     "graphs_while_timed": counters["stats"]["unique_graphs"] - graphs})
    mean = benchmark.stats.stats.mean
    results[f"{kind}/{impl}/{n}/{device}"] = mean
    benchmark.extra_info.update({"n_envs": n, "impl": impl, "device": device})
    rate = "env_epochs_per_s" if kind == "epoch" else "env_steps_per_s"
    benchmark.extra_info[rate] = n / mean
    loop = results.get(f"{kind}/loop/{n}/{device}")
    if impl != "loop" and loop is not None:
        benchmark.extra_info["speedup_vs_loop"] = loop / mean
    planned_mean = results.get(f"{kind}/planned/{n}/{device}")
    if impl == "compiled" and planned_mean is not None:
        benchmark.extra_info["speedup_vs_planned"] = planned_mean / mean
