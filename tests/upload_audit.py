"""Count host-to-device uploads: tensors made from host data, and copies across devices.

On CUDA every upload inside the epoch loop is a synchronous ``cudaMemcpy`` (torch's sync debug
mode reports it); on a CPU-only machine source and destination are both ``cpu``, so there is
no copy to see. What is visible on any device is where host data *becomes* a tensor: every
``torch.tensor``/``torch.as_tensor``/``torch.from_numpy``/``torch.asarray`` of Python or NumPy
data and every list used as an index reaches the dispatcher as ``aten.lift_fresh``. Made on
(or moved to) a CUDA device, each of those is an upload. So this counts, under a
``TorchDispatchMode``:

- ``aten.lift_fresh``/``lift_fresh_copy``: a tensor made from host data (``"host_data"``);
- ``aten._to_copy``/``aten.copy_`` whose source and destination devices differ
  (``"cross_device"``: the real copies, seen on CUDA).

One exception, because it is not an upload on CUDA either: a Python scalar assigned by
indexing (``x[:, 0] = True``) is lifted to a 0-dim CPU tensor that CUDA applies with
``fill_`` (no copy); a ``TorchFunctionMode`` marks such ``__setitem__`` calls and their 0-dim
lifts are skipped (a list index inside them still counts). Scalars passed to ops
(``x + 3``, ``torch.where(m, x, 0.0)``, ``torch.full``) are kernel arguments, never lifted.

Not visible on the CPU: a CPU tensor made *before* the loop and moved with ``.to(device)``
inside it (a no-op there). The CUDA test under ``set_sync_debug_mode("error")`` covers that.

Each event records its call site: the innermost frame in this repository's ``esper``/``kernels``
code as ``path:function`` (line numbers change with edits; functions rarely do). Events inside
``exempt`` call sites (by default the one materialize) are not counted.
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
_OWN = tuple(str(ROOT / d) for d in ("esper", "kernels"))
_LIFTS = (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
MATERIALIZE = "esper/nissa/materialize.py:materialize"


@dataclass(frozen=True, slots=True)
class Upload:
    kind: str  # "host_data" or "cross_device"
    site: str  # innermost esper/kernels frame, "path:function"
    line: int
    shape: tuple[int, ...]


def _site() -> tuple[str, int, list[str]]:
    """The innermost frame of our code, and every our-code frame's site (for exemptions)."""
    frames = [f for f in traceback.extract_stack() if f.filename.startswith(_OWN)]
    sites = [f"{Path(f.filename).relative_to(ROOT)}:{f.name}" for f in frames]
    if not frames:
        return "<outside esper>", 0, sites
    return sites[-1], frames[-1].lineno or 0, sites


class _ScalarSetitem(TorchFunctionMode):
    """Marks ``tensor[index] = python_scalar`` calls (their 0-dim lift is no upload)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        scalar = func is torch.Tensor.__setitem__ and len(args) > 2 and isinstance(args[2], bool | int | float)
        self.depth += scalar
        try:
            return func(*args, **kwargs)
        finally:
            self.depth -= scalar


class UploadAudit(TorchDispatchMode):
    """Records uploads made inside ``with audit:`` (see the module docstring)."""

    def __init__(self, exempt: tuple[str, ...] = (MATERIALIZE,)) -> None:
        super().__init__()
        self.exempt = exempt
        self.uploads: list[Upload] = []
        self._setitem = _ScalarSetitem()

    def __enter__(self) -> UploadAudit:
        self._setitem.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._setitem.__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = None
        if func in _LIFTS:
            if not (self._setitem.depth and out.dim() == 0):
                kind = "host_data"
        elif func in _COPIES:
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0] if func is torch.ops.aten.copy_.default else out
            if isinstance(src, torch.Tensor) and src.device != dst.device:
                kind = "cross_device"
        if kind is not None:
            site, line, sites = _site()
            if not any(s in self.exempt for s in sites):
                self.uploads.append(Upload(kind, site, line, tuple(out.shape)))
        return out

    @property
    def sites(self) -> Counter[str]:
        """Uploads per call site."""
        return Counter(u.site for u in self.uploads)
