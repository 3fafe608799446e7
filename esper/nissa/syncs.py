"""Count device-to-host conversions, to prove telemetry leaves the device once per epoch."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# Tensor methods that hand a value to Python / the host. On the CPU there is no real sync, so
# these calls are what we count; on CUDA, torch's sync debug mode also reports real syncs.
_PATCHED: tuple[str, ...] = (
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "__array__",
)


@dataclass(slots=True)
class SyncCount:
    """What happened inside ``count_host_syncs``: conversions by method, and CUDA syncs."""

    calls: list[str] = field(default_factory=list)
    cuda_syncs: int = 0
    cuda_sync_sites: list[str] = field(default_factory=list)  # "file:line" of each CUDA sync

    @property
    def count(self) -> int:
        """Number of tensor-to-host conversions (outermost calls only)."""
        return len(self.calls)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[SyncCount]:
    """Patch ``torch.Tensor``'s host-conversion methods and count calls made inside the block.

    Nested calls (``__array__`` calling ``numpy``) count once. On CUDA it also enables
    ``torch.cuda.set_sync_debug_mode("warn")`` and counts the synchronization warnings.
    Not thread-safe: use in tests.
    """
    result = SyncCount()
    depth = [0]
    originals: dict[str, Any] = {name: getattr(torch.Tensor, name) for name in _PATCHED}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if depth[0] == 0:
                result.calls.append(name)
            depth[0] += 1
            try:
                return fn(self, *args, **kwargs)
            finally:
                depth[0] -= 1

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    cuda = torch.cuda.is_available()
    previous_mode = torch.cuda.get_sync_debug_mode() if cuda else 0
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield result
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(previous_mode)
        synced = [w for w in caught if "synchroniz" in str(w.message).lower()]
        result.cuda_syncs = len(synced)
        result.cuda_sync_sites = [f"{w.filename}:{w.lineno}" for w in synced]
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
