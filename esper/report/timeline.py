"""Env x slot stage timeline: one row per slot of an env, one column per epoch, coloured by stage.

A large run would need hundreds of rows: at most ``max_rows`` are drawn, the envs the accuracy
section draws in full first, then envs spread evenly over the rest.
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.patches import Patch

from esper.leyline.stages import SeedStage
from esper.report.figure import STAGE_COLORS, figure, step_axis
from esper.report.run import RunData
from esper.report.section import Section


def timeline_envs(run: RunData, first: list[int], max_rows: int) -> list[int]:
    """Envs whose slots fit in ``max_rows`` rows: ``first``, then evenly spread others."""
    n, s = run.n_envs, max(run.n_slots, 1)
    room = max(1, max_rows // s)
    if n <= room:
        return list(range(n))
    chosen = list(dict.fromkeys(first))[:room]
    for i in np.linspace(0, n - 1, room).round().astype(int):
        if len(chosen) >= room:
            break
        if int(i) not in chosen:
            chosen.append(int(i))
    return sorted(chosen)


def timeline_section(run: RunData, first: list[int], max_rows: int) -> Section:
    envs = timeline_envs(run, first, max_rows)
    stage = run.series("signals.stage")  # [T, N, S]
    s = run.n_slots
    rows = stage[:, envs, :].reshape(run.steps, len(envs) * s).T  # row env*S + slot
    colors = [STAGE_COLORS[st.name] for st in SeedStage]
    cmap = ListedColormap(colors)
    norm = BoundaryNorm(np.arange(len(colors) + 1) - 0.5, cmap.N)
    fig, axes = figure(1, 1, height=min(12.0, 1.2 + 0.24 * rows.shape[0]))
    ax = axes[0, 0]
    ax.imshow(np.nan_to_num(rows, nan=0), aspect="auto", interpolation="nearest", cmap=cmap, norm=norm,
              extent=(0.5, run.steps + 0.5, rows.shape[0] - 0.5, -0.5))
    many = rows.shape[0] > 30
    ticks = [r for r in range(rows.shape[0]) if not many or r % s == 0]
    ax.set_yticks(ticks, [f"env {envs[r // s]}" + ("" if many else f" · {run.slot_name(r % s)}") for r in ticks],
                  fontsize=7 if many else 8)
    for b in range(1, len(envs)):
        ax.axhline(b * s - 0.5, color="white", linewidth=1.5)
    step_axis(ax, run.episode_starts(), run.parts)
    ax.set_xlabel("epoch of the run")
    present = sorted({int(v) for v in np.unique(rows[np.isfinite(rows)])})
    ax.legend(handles=[Patch(color=colors[v], label=SeedStage(v).name.lower()) for v in present],
              fontsize=7, ncol=min(len(present), 10), loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
    slots = ", ".join(run.slot_name(k) for k in range(s))
    shown = "every env" if len(envs) == run.n_envs else f"{len(envs)} of {run.n_envs} envs"
    return Section("timeline", "Seed stages per env and slot", fig, alt="env by slot stage timeline",
                   note=f"{shown}; slots per env, top to bottom: {slots}.")
