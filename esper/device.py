"""The run's device: ``auto`` (the default) is CUDA when this machine has it, else the CPU.

Configs keep ``auto`` as written, so a config or checkpoint saved on one machine runs on the
best device of the next; ``--device cpu`` forces the CPU.
"""

from __future__ import annotations

import torch

AUTO = "auto"


def cuda_default() -> bool:
    """Whether ``auto`` picks CUDA here (the CPU test suite pins this to False)."""
    return torch.cuda.is_available()


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto`` (or None) -> ``cuda`` when available, else ``cpu``; any other name as given."""
    if name is None or str(name) == AUTO:
        return torch.device("cuda" if cuda_default() else "cpu")
    return torch.device(name)
