"""Shared test setup: a persistent inductor cache so compile tests stay quick after the first run."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".inductor-cache")
)

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _auto_device_is_the_cpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """``device: auto`` picks CUDA where there is one; the suite keeps its unmarked tests on
    the CPU everywhere (tests marked ``cuda`` ask for CUDA themselves)."""
    if "cuda" not in request.keywords:
        monkeypatch.setattr("esper.device.cuda_default", lambda: False)


@pytest.fixture(autouse=True)
def _fresh_runs_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``esper.train`` without ``--run-dir`` makes a fresh ``runs/<policy>-<time>``: in the
    test's own directory, never the checkout's."""
    monkeypatch.setenv("ESPER_RUNS", str(tmp_path / "runs"))
