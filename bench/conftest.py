"""Benchmark setup: persistent inductor cache, CUDA cases skipped cleanly, shared results.

``RESULTS`` maps a case id (e.g. ``"epoch/loop/8/cpu"``) to its mean seconds, so a later case
can record a ratio against an earlier one in ``benchmark.extra_info`` (loop cases and the
telemetry-off case run first in each file).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".inductor-cache")
)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest
import torch

RESULTS: dict[str, float] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def results() -> dict[str, float]:
    return RESULTS
