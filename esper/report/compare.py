"""``esper.evaluate --plot``: the policy comparison as a picture, every host run a point.

Two panels, test accuracy and parameters added, one column per policy: each env's episode as a
point (spread sideways so equal values stay visible), the mean as a bar with ± std. A mean
alone hides whether a policy wins on every host or on a few; the points show it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from esper.atomic import atomic_write
from esper.simic.errors import UsageError

FORMATS = (".png", ".svg", ".pdf")
PANELS = (("test_acc", "test accuracy (%)"), ("params_added", "parameters added"))


def check_plot_target(path: Path | None) -> None:
    if path is not None and path.suffix.lower() not in FORMATS:
        raise UsageError(f"cannot tell the image format of {path}", "--plot", f"a file ending in one of {list(FORMATS)}")


def comparison_figure(results: dict[str, dict[str, Any]], title: str) -> Any:
    # matplotlib loads only when a plot is asked for
    from esper.report.figure import env_color, figure

    names = list(results)
    fig, axes = figure(1, 2, height=max(3.2, 2.6 + 0.1 * len(names)))
    for ax, (key, label) in zip(axes[0], PANELS, strict=True):
        for i, name in enumerate(names):
            r = results[name]
            values = np.asarray((r.get("per_env") or {}).get(key, []), dtype=np.float64)
            if values.size:
                offsets = np.linspace(-0.22, 0.22, values.size) if values.size > 1 else np.zeros(1)
                ax.scatter(i + offsets, values, s=18, color=env_color(i), alpha=0.75, edgecolor="none")
            mean, std = r[key]["mean"], r[key]["std"]
            ax.errorbar([i], [mean], yerr=[std], fmt="_", markersize=28, markeredgewidth=2.5, capsize=6,
                        color="black", zorder=5)
            ax.annotate(f"{mean:.2f}" if key == "test_acc" else f"{mean:.0f}", (i + 0.3, mean), fontsize=8,
                        va="center")
        ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0)
        ax.set_xlim(-0.6, len(names) - 0.3)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.25)
    fig.suptitle(title, fontsize=10)
    return fig


def write_comparison(path: Path, results: dict[str, dict[str, Any]], title: str) -> Path:
    """Draw the comparison and write it atomically, in the format the suffix names."""
    fig = comparison_figure(results, title)
    return atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lower().lstrip(".")))
