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

from esper.nissa.analytics import BlueprintAnalytics, BlueprintStats
from esper.report.figure import MARKS, figure
from esper.report.run import RunData
from esper.report.section import Section, table


@dataclass(slots=True)
class Kept:
    """What the fossilized seeds of one blueprint gained, against what they cost."""

    gain: float = 0.0  # accuracy gained by fossilized seeds, summed (points)
    params: float = 0.0  # their parameters, summed
    measured: int = 0

    @property
    def gain_per_kparam(self) -> float:
        return 1000 * self.gain / self.params if self.params else math.nan


def tally(run: RunData) -> tuple[dict[str, BlueprintStats], dict[str, Kept]]:
    """Nissa's own blueprint analytics (counts, fossilization rate, mean cost) over the run's
    lifecycle events, plus the accuracy kept seeds gained per parameter."""
    analytics = BlueprintAnalytics()
    kept: dict[str, Kept] = {}
    params: dict[tuple[int, str], float] = {}  # (env, slot) -> its seed's parameters
    for ev in run.lifecycle:
        analytics.record(ev)  # type: ignore[arg-type]  (reads to_stage, blueprint, payload)
        if ev.to_stage == "GERMINATED":
            params[(ev.env, ev.slot)] = float(ev.payload.get("params") or 0.0)
        elif ev.to_stage == "FOSSILIZED" and ev.payload.get("accuracy_delta") is not None:
            k = kept.setdefault(ev.blueprint, Kept())
            k.gain += float(ev.payload["accuracy_delta"])
            k.params += params.get((ev.env, ev.slot), 0.0)
            k.measured += 1
    return analytics.stats, kept


def _fmt(v: float, spec: str) -> str:
    return "–" if not math.isfinite(v) else format(v, spec)


def blueprint_section(run: RunData) -> Section:
    stats, kept = tally(run)
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
    rates = np.array([stats[b].fossilization_rate for b in names])
    axes[0, 1].barh(y, np.nan_to_num(rates), color=MARKS["FOSSILIZED"][2])
    axes[0, 1].set_xlim(0, 1)
    axes[0, 1].set_title("fossilization rate (kept / finished)", fontsize=10)
    gains = np.array([kept.get(b, Kept()).gain_per_kparam for b in names])
    axes[0, 2].barh(y, np.nan_to_num(gains), color=["#2ca02c" if g >= 0 else "#d62728" for g in np.nan_to_num(gains)])
    axes[0, 2].axvline(0, color="black", linewidth=0.6)
    axes[0, 2].set_title("val acc gained per 1k params (kept seeds)", fontsize=10)
    for ax_, values in ((axes[0, 1], rates), (axes[0, 2], gains)):
        for yi, v in zip(y, values, strict=True):
            if not math.isfinite(v):
                ax_.text(0, yi, " none finished", va="center", fontsize=7, color="#777777")
        ax_.grid(axis="x", alpha=0.25)
    rows = []
    for b in names:
        t, k = stats[b], kept.get(b, Kept())
        rows.append([b, t.germinated, t.fossilized, t.culled, _fmt(t.fossilization_rate, ".2f"),
                     _fmt(t.mean_params, ".0f"), _fmt(k.gain / k.measured if k.measured else math.nan, "+.2f"),
                     _fmt(k.gain_per_kparam, "+.3f")])
    html = table(["blueprint", "germinated", "fossilized", "culled", "fossilization rate", "mean params",
                  "mean acc gained (kept)", "acc per 1k params (kept)"], rows)
    return Section("blueprints", "Blueprints", fig, alt="blueprint fossilization rate and accuracy per parameter",
                   note="Accuracy gained: a kept seed's last measured contribution (validation accuracy with "
                        "against without it, points).", html=html)
