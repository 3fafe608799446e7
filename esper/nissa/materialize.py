"""Move a whole telemetry TensorDict to the host in one device-to-host transfer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from tensordict import TensorDictBase

from esper.leyline.events import EventKind, TelemetryEvent

_NP_DTYPES: dict[torch.dtype, Any] = {
    torch.bool: np.bool_,
    torch.uint8: np.uint8,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.float16: np.float32,
    torch.bfloat16: np.float32,
    torch.float32: np.float32,
    torch.float64: np.float64,
}


class TransferCounter:
    """Device-to-host transfers made by :func:`materialize`, counted where they happen."""

    def __init__(self) -> None:
        self.count = 0

    def __repr__(self) -> str:
        return f"TransferCounter(count={self.count})"


TRANSFERS = TransferCounter()


def _leaf_key(key: str | tuple[str, ...]) -> str:
    return key if isinstance(key, str) else ".".join(key)


def materialize(td: TensorDictBase) -> dict[str, np.ndarray]:
    """All leaves of ``td`` as host numpy arrays keyed ``"a.b.c"``, with ONE transfer.

    Every leaf is flattened and cast to float64 (float32 on MPS) and concatenated on its
    device; a single ``numpy(force=True)`` copies the buffer; the host splits and reshapes
    it and restores bool/int dtypes (integers beyond 2**53 lose precision).
    """
    keys = list(td.keys(include_nested=True, leaves_only=True))
    if not keys:
        return {}
    leaves = [td.get(k) for k in keys]
    device = leaves[0].device
    wide = torch.float32 if device.type == "mps" else torch.float64
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=wide) for t in leaves])
    host = flat.numpy(force=True)
    TRANSFERS.count += 1
    sizes = [t.numel() for t in leaves]
    offsets = np.cumsum(sizes)[:-1]
    out: dict[str, np.ndarray] = {}
    for key, leaf, chunk in zip(keys, leaves, np.split(host, offsets), strict=True):
        np_dtype = _NP_DTYPES.get(leaf.dtype, host.dtype)
        arr = chunk.reshape(tuple(leaf.shape))
        if np_dtype is np.bool_:
            arr = arr != 0
        elif np_dtype is not host.dtype:
            arr = arr.astype(np_dtype)
        out[_leaf_key(key)] = arr
    return out


def epoch_event(snapshot: Mapping[str, np.ndarray], epoch: int, env: int = -1) -> TelemetryEvent:
    """An EPOCH event carrying a materialized snapshot (arrays with a leading env dim)."""
    return TelemetryEvent(kind=EventKind.EPOCH, env=env, epoch=epoch, payload=dict(snapshot))
