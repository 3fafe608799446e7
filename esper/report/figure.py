"""Matplotlib without pyplot: figures built as objects (no global state, no display needed)
and encoded as inline PNG, so a report is one file that opens anywhere without a network."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 90
WIDTH = 11.0  # inches: ~1000 px at DPI, the page's figure width
STAGE_COLORS = {  # SeedStage name -> colour (the 11 stages; UNKNOWN never appears in a run)
    "UNKNOWN": "#ffffff", "DORMANT": "#ececec", "GERMINATED": "#b2df8a", "TRAINING": "#33a02c",
    "BLENDING": "#1f78b4", "SHADOWING": "#a6cee3", "PROBATIONARY": "#fdbf6f", "FOSSILIZED": "#6a3d9a",
    "CULLED": "#e31a1c", "EMBARGOED": "#fb9a99", "RESETTING": "#cab2d6",
}
# Lifecycle events marked on accuracy curves: stage reached -> (label, marker, colour).
MARKS = {
    "GERMINATED": ("germinate", "^", "#2ca02c"),
    "BLENDING": ("blend", "D", "#1f78b4"),
    "FOSSILIZED": ("fossilize", "*", "#6a3d9a"),
    "CULLED": ("cull", "X", "#d62728"),
}
SEVERITY_COLORS = {"info": "#7f7f7f", "warning": "#ff7f0e", "severe": "#d62728"}


def figure(rows: int = 1, cols: int = 1, height: float = 3.0, **kwargs: Any) -> tuple[Figure, np.ndarray]:
    """A figure ``WIDTH`` wide and ``height`` inches per row, with its axes as a 2-D array."""
    fig = Figure(figsize=(WIDTH, height * rows), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kwargs)
    return fig, axes


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def data_uri(fig: Figure) -> str:
    """The figure as a ``data:image/png;base64,...`` URI for an ``<img>``."""
    return "data:image/png;base64," + base64.b64encode(to_png(fig)).decode("ascii")


def env_color(rank: int) -> str:
    """A distinct colour for the ``rank``-th env drawn in full (tab10, skipping grey)."""
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
               "#17becf"]
    return palette[rank % len(palette)]


def spread(ax: Any, x: np.ndarray, values: np.ndarray, label: str, color: str = "black") -> None:
    """Mean over envs (axis 1) as a line, mean ± std as a band and min–max as a fainter one."""
    with np.errstate(all="ignore"):
        finite = np.isfinite(values).any(axis=1)
        x, values = x[finite], values[finite]
        if not x.size:
            return
        mean, std = np.nanmean(values, axis=1), np.nanstd(values, axis=1)
        ax.fill_between(x, np.nanmin(values, axis=1), np.nanmax(values, axis=1), color=color, alpha=0.08,
                        linewidth=0, label=f"{label}: min–max")
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.18, linewidth=0, label=f"{label}: ± std")
        ax.plot(x, mean, color=color, linewidth=1.8, label=f"{label}: mean")


def step_axis(ax: Any, episode_starts: list[int], parts: list[int]) -> None:
    """The run's epoch axis: whole-epoch ticks, faint lines where episodes restart, labelled
    ones where another policy's part begins."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for s in episode_starts:
        ax.axvline(s - 0.5, color="#999999", linewidth=0.6, linestyle=":", zorder=0)
    for i, s in enumerate(parts, start=2):
        ax.axvline(s - 0.5, color="#444444", linewidth=1.2, zorder=0)
        ax.text(s - 0.3, 1.0, f"part {i}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
