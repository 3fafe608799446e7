"""Per-epoch cost of each Nissa telemetry profile against telemetry off.

One full env epoch at N=8 plus what the profile enables (``DiagnosticTracker.collect`` on the
epoch's captured gradients, activations, validation logits, host parameters and a loss
function for sharpness) and the single ``materialize`` transfer. "off" still materializes the
epoch's signals once. ``extra_info["overhead_vs_off"]`` is profile time / off time - 1.
"""

from __future__ import annotations

import pytest
import torch
from workloads import PROFILES, MorphogeneticBatch, Workload, seeded_batch, telemetry_epoch

WORK = Workload()
N_ENVS = 8
_BATCHES: dict[str, MorphogeneticBatch] = {}


def _cases() -> list:
    out = []
    for device in ("cpu", "cuda"):
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for profile in ("off", *PROFILES):  # off first: the others record their overhead
            out.append(pytest.param(profile, device, marks=marks, id=f"{profile}-{device}"))
    return out


@pytest.mark.parametrize(("profile", "device"), _cases())
def test_epoch_with_telemetry(benchmark, results, profile: str, device: str) -> None:
    if device not in _BATCHES:
        _BATCHES[device] = seeded_batch(WORK.task(device), N_ENVS, WORK.config())
    fn = telemetry_epoch(_BATCHES[device], None if profile == "off" else profile)

    def run() -> object:
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run()  # warm-up
    benchmark.pedantic(run, rounds=3, iterations=1)
    mean = benchmark.stats.stats.mean
    results[f"telemetry/{profile}/{device}"] = mean
    benchmark.extra_info.update({"n_envs": N_ENVS, "profile": profile, "device": device})
    benchmark.extra_info["env_epochs_per_s"] = N_ENVS / mean
    off = results.get(f"telemetry/off/{device}")
    if profile != "off" and off is not None:
        benchmark.extra_info["overhead_vs_off"] = mean / off - 1.0
