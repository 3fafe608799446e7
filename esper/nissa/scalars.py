"""Scalar views of event payloads shared by the metric backends (TensorBoard, W&B)."""

from __future__ import annotations

import numpy as np


def finite_mean(arr: np.ndarray) -> float:
    """Mean of the finite entries of a float array (every entry otherwise); NaN when none."""
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
    return float(finite.mean()) if finite.size else float("nan")


def flat_items(payload: dict, prefix: str = "") -> list[tuple[str, object]]:
    """``{"entropy": {"op": 0.2}}`` -> ``[("entropy/op", 0.2)]``: nested dicts (per-head
    entropy, reward components) become one scalar tag per leaf instead of being dropped."""
    out: list[tuple[str, object]] = []
    for key, value in payload.items():
        if isinstance(value, dict):
            out += flat_items(value, f"{prefix}{key}/")
        else:
            out.append((f"{prefix}{key}", value))
    return out
