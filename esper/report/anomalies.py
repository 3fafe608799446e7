"""Anomalies and governor actions: when each detector fired, how severe it was, and which
envs (or PPO updates) the governors rolled back; the latest ones listed in full."""

from __future__ import annotations

from collections import Counter

from esper.report.figure import SEVERITY_COLORS, figure, step_axis
from esper.report.run import RunData
from esper.report.section import Section, table

LISTED = 100  # rows of the table: the latest anomalies


def anomaly_section(run: RunData) -> Section:
    found = run.anomalies
    if not found:
        return Section("anomalies", "Anomalies and governor actions",
                       note=f"No anomaly and no governor action in {run.steps} epochs.")
    detectors = sorted({a.detector or "?" for a in found})
    row = {d: i for i, d in enumerate(detectors)}
    fig, axes = figure(1, 1, height=max(2.0, 0.9 + 0.4 * len(detectors)))
    ax = axes[0, 0]
    for severity, color in SEVERITY_COLORS.items():
        for rollback in (False, True):
            pts = [(a.step, row[a.detector or "?"]) for a in found
                   if a.severity == severity and (a.action == "rollback") == rollback]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(xs, ys, color=color, marker="X" if rollback else "o", s=80 if rollback else 30,
                           edgecolor="black" if rollback else "none", linewidth=0.6, zorder=4,
                           label=f"{severity}" + (" (rollback)" if rollback else ""))
    ax.set_yticks(range(len(detectors)), detectors)
    ax.set_ylim(-0.6, len(detectors) - 0.4)
    ax.set_xlim(0.5, max(run.steps, max(a.step for a in found)) + 0.5)
    step_axis(ax, run.episode_starts(), run.parts)
    ax.set_xlabel("epoch of the run" + (" (PPO update anomalies sit at the end of their round)" if run.ppo else ""))
    ax.grid(axis="x", alpha=0.25)
    ax.legend(fontsize=7, ncol=6, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
    rollbacks = sum(a.action == "rollback" for a in found)
    counts = Counter(a.severity for a in found)
    latest = found[-LISTED:][::-1]
    html = table(["epoch of run", "env", "detector", "severity", "message"],
                 [[a.step, a.env if a.env >= 0 else "run", a.detector, a.severity, a.message] for a in latest])
    return Section("anomalies", "Anomalies and governor actions", fig, alt="anomalies and rollbacks over the run",
                   note=f"{len(found)} anomalies ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}); "
                        f"{rollbacks} governor rollbacks. Latest {len(latest)} listed, newest first.",
                   html=html)
