"""torch.profiler traces per run, and named phases that cost ~nothing when not profiling."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PHASES: tuple[str, ...] = ("train", "validate", "counterfactual", "policy", "telemetry")


@contextlib.contextmanager
def trace_run(
    directory: str | Path, name: str | None = None, *, record_shapes: bool = False
) -> Iterator[profile]:
    """Profile the block (CPU, plus CUDA when available) and write ``<dir>/<name>.trace.json``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    trace = out / f"{name or time.strftime('run-%Y%m%d-%H%M%S')}.trace.json"
    with profile(activities=activities, record_shapes=record_shapes) as prof:
        yield prof
    prof.export_chrome_trace(str(trace))


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """A named range in the profiler trace; a plain no-op when no profiler is running."""
    if not torch.autograd._profiler_enabled():
        yield
        return
    with record_function(name):
        yield
