"""Accuracy per env over the run, with every lifecycle event marked where it happened.

Up to ``draw`` envs are drawn in full (all of them in a small run); a larger run adds the mean,
± std and min–max over all envs, so 64 envs stay readable. Test accuracy is scored once per
episode, at its end: it appears as points there. A bar strip under the curves counts the
lifecycle events of all envs per epoch.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from matplotlib.axes import Axes

from esper.report.figure import MARKS, env_color, figure, spread, step_axis
from esper.report.run import RunData
from esper.report.section import Section


def accuracy_section(run: RunData, draw: int) -> Section:
    envs = run.pick_envs(draw)
    n = run.n_envs
    x = np.arange(1, run.steps + 1)
    val = run.series("signals.val_acc")
    fig, axes = figure(2, 1, height=3.0, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax, strip = axes[0, 0], axes[1, 0]
    aggregate = n > len(envs)
    if aggregate:
        spread(ax, x, val, f"val, {n} envs")
    for rank, i in enumerate(envs):  # thinner over an aggregate, so the mean stays readable
        ax.plot(x, val[:, i], color=env_color(rank), linewidth=0.8 if aggregate else 1.1,
                alpha=0.7 if aggregate else 0.9, label=f"env {i} val")
    _mark_lifecycle(ax, run, envs, val)
    _mark_test(ax, run, envs, aggregate)
    step_axis(ax, run.episode_starts(), run.parts)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: the curves stay clear
    _event_strip(strip, run)
    strip.set_xlabel("epoch of the run (episodes restart at the dotted lines)")
    shown = "every env" if n == len(envs) else f"{len(envs)} of {n} envs in full (worst to best by final val acc)"
    return Section("accuracy", "Accuracy per env", fig, alt="validation and test accuracy per env over the run",
                   note=f"Validation accuracy each epoch, test accuracy (held-out split) where an episode ended; "
                        f"{shown}. Markers: lifecycle events of the envs drawn.")


def _mark_lifecycle(ax: Axes, run: RunData, envs: list[int], val: np.ndarray) -> None:
    drawn = set(envs)
    points: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for ev in run.lifecycle:
        if ev.to_stage in MARKS and ev.env in drawn and 1 <= ev.step <= run.steps:
            points[ev.to_stage].append((ev.step, float(val[ev.step - 1, ev.env])))
    for stage, (label, marker, color) in MARKS.items():
        if points[stage]:
            xs, ys = zip(*points[stage], strict=True)
            ax.scatter(xs, ys, marker=marker, s=60 if marker == "*" else 36, color=color, edgecolor="black",
                       linewidth=0.5, zorder=5, label=label)


def _mark_test(ax: Axes, run: RunData, envs: list[int], aggregate: bool) -> None:
    rank = {e: r for r, e in enumerate(envs)}
    by_step: dict[int, list[float]] = defaultdict(list)
    label: str | None = "test (episode end)"  # the legend names the test points once
    for step, p in run.episodes:
        acc, env = p.get("test_acc"), int(p.get("env", -1))
        if acc is None:
            continue
        by_step[step].append(float(acc))
        if env in rank:
            ax.scatter([step], [acc], marker="o", s=34, color=env_color(rank[env]), edgecolor="black",
                       linewidth=0.8, zorder=6, label=label)
            label = None
    if aggregate:
        steps = sorted(by_step)
        if steps:
            means = [np.mean(by_step[s]) for s in steps]
            stds = [np.std(by_step[s]) for s in steps]
            ax.errorbar(steps, means, yerr=stds, fmt="s", color="black", markersize=6, capsize=3, zorder=7,
                        label="test: mean ± std")


def _event_strip(ax: Axes, run: RunData) -> None:
    """Lifecycle events of all envs per epoch, stacked by kind."""
    x = np.arange(1, run.steps + 1)
    bottom = np.zeros(run.steps)
    for stage, (label, _, color) in MARKS.items():
        counts = np.zeros(run.steps)
        for ev in run.lifecycle:
            if ev.to_stage == stage and 1 <= ev.step <= run.steps:
                counts[ev.step - 1] += 1
        if counts.any():
            ax.bar(x, counts, bottom=bottom, width=0.9, color=color, label=label)
            bottom += counts
    ax.set_ylabel("events")
    ax.grid(alpha=0.25)
    if bottom.any():
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.text(0.5, 0.5, "no lifecycle events", transform=ax.transAxes, ha="center", va="center",
                color="#777777")
