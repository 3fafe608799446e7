"""Blueprint analytics from lifecycle events: which blueprints were tried, kept, and paid.

Computed from the lifecycle events themselves (not the run's closing analytics event), so the
section is current while a run is watched. The accuracy a seed gained is its last measured
contribution (``accuracy_delta`` on its fossilize/cull event, percent points of validation
accuracy with against without it); its cost is the parameter count of its germination.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from esper.report.figure import MARKS, figure
from esper.report.run import RunData
from esper.report.section import Section, table


@dataclass(slots=True)
class Tally:
    germinated: int = 0
    fossilized: int = 0
    culled: int = 0
    params: float = 0.0  # summed over germinations
    kept_gain: float = 0.0  # accuracy gained by fossilized seeds, summed
    kept_params: float = 0.0  # their parameters, summed
    kept_measured: int = 0

    @property
    def rate(self) -> float:
        done = self.fossilized + self.culled
        return self.fossilized / done if done else math.nan

    @property
    def gain_per_kparam(self) -> float:
        return 1000 * self.kept_gain / self.kept_params if self.kept_params else math.nan


def tally(run: RunData) -> dict[str, Tally]:
    out: dict[str, Tally] = {}
    params: dict[tuple[int, str], float] = {}  # (env, slot) -> its seed's parameters
    for ev in run.lifecycle:
        t = out.setdefault(ev.blueprint or "?", Tally())
        if ev.to_stage == "GERMINATED":
            t.germinated += 1
            p = float(ev.payload.get("params") or 0.0)
            t.params += p
            params[(ev.env, ev.slot)] = p
        elif ev.to_stage == "FOSSILIZED":
            t.fossilized += 1
            delta = ev.payload.get("accuracy_delta")
            if delta is not None:
                t.kept_gain += float(delta)
                t.kept_params += params.get((ev.env, ev.slot), 0.0)
                t.kept_measured += 1
        elif ev.to_stage == "CULLED":
            t.culled += 1
    return out


def _fmt(v: float, spec: str) -> str:
    return "–" if not math.isfinite(v) else format(v, spec)


def blueprint_section(run: RunData) -> Section:
    stats = tally(run)
    if not stats:
        return Section("blueprints", "Blueprints", note="No seed was germinated in this run.")
    names = sorted(stats)
    y = np.arange(len(names))
    fig, axes = figure(1, 3, height=max(2.2, 0.5 + 0.45 * len(names)), sharey=True)
    ax = axes[0, 0]
    for j, (key, stage) in enumerate((("germinated", "GERMINATED"), ("fossilized", "FOSSILIZED"),
                                      ("culled", "CULLED"))):
        ax.barh(y + (j - 1) * 0.27, [getattr(stats[b], key) for b in names], height=0.27,
                color=MARKS[stage][2], label=key)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_title("seeds", fontsize=10)
    ax.legend(fontsize=7)
    rates = np.array([stats[b].rate for b in names])
    axes[0, 1].barh(y, np.nan_to_num(rates), color=MARKS["FOSSILIZED"][2])
    axes[0, 1].set_xlim(0, 1)
    axes[0, 1].set_title("fossilization rate (kept / finished)", fontsize=10)
    gains = np.array([stats[b].gain_per_kparam for b in names])
    axes[0, 2].barh(y, np.nan_to_num(gains), color=["#2ca02c" if g >= 0 else "#d62728" for g in np.nan_to_num(gains)])
    axes[0, 2].axvline(0, color="black", linewidth=0.6)
    axes[0, 2].set_title("val acc gained per 1k params (kept seeds)", fontsize=10)
    for ax_, values in ((axes[0, 1], rates), (axes[0, 2], gains)):
        for yi, v in zip(y, values, strict=True):
            if not math.isfinite(v):
                ax_.text(0, yi, " none finished", va="center", fontsize=7, color="#777777")
        ax_.grid(axis="x", alpha=0.25)
    rows = [[b, t.germinated, t.fossilized, t.culled, _fmt(t.rate, ".2f"),
             _fmt(t.params / t.germinated if t.germinated else math.nan, ".0f"),
             _fmt(t.kept_gain / t.kept_measured if t.kept_measured else math.nan, "+.2f"),
             _fmt(t.gain_per_kparam, "+.3f")] for b, t in ((b, stats[b]) for b in names)]
    html = table(["blueprint", "germinated", "fossilized", "culled", "fossilization rate", "mean params",
                  "mean acc gained (kept)", "acc per 1k params (kept)"], rows)
    return Section("blueprints", "Blueprints", fig, alt="blueprint fossilization rate and accuracy per parameter",
                   note="Accuracy gained: a kept seed's last measured contribution (validation accuracy with "
                        "against without it, points).", html=html)
