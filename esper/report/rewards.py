"""Reward components over the run: each component's mean over envs per epoch, and the total
reward with its spread, to see which term drives the learner's signal and when."""

from __future__ import annotations

import numpy as np

from esper.report.figure import env_color, figure, spread, step_axis
from esper.report.run import REWARD_PREFIX, RunData
from esper.report.section import Section


def reward_section(run: RunData) -> Section:
    keys = [k for k in run.reward_keys() if k != "total"]
    if not keys and not any("reward" in e for e in run.epochs):
        return Section("rewards", "Reward components", note="The epoch events carry no rewards.")
    x = np.arange(1, run.steps + 1)
    fig, axes = figure(2, 1, height=2.6, sharex=True)
    top, bottom = axes[0, 0], axes[1, 0]
    with np.errstate(all="ignore"):
        for rank, k in enumerate(keys):
            top.plot(x, np.nanmean(run.series(REWARD_PREFIX + k), axis=1), color=env_color(rank),
                     linewidth=1.2, label=k)
    top.axhline(0, color="black", linewidth=0.5)
    top.set_ylabel("component (mean over envs)")
    top.legend(fontsize=7, ncol=min(len(keys), 7) or 1, loc="upper left")
    top.grid(alpha=0.25)
    total_key = REWARD_PREFIX + "total" if REWARD_PREFIX + "total" in run.epochs[-1] else "reward"
    spread(bottom, x, run.series(total_key), "reward")
    bottom.axhline(0, color="black", linewidth=0.5)
    bottom.set_ylabel("reward per epoch")
    bottom.set_xlabel("epoch of the run")
    bottom.legend(fontsize=7, ncol=3, loc="upper left")
    bottom.grid(alpha=0.25)
    for ax in (top, bottom):
        step_axis(ax, run.episode_starts(), run.parts)
    return Section("rewards", "Reward components", fig, alt="reward components over the run",
                   note=f"{run.n_envs} envs; the shaped reward's terms each epoch (the terminal term lands "
                        f"at an episode's last epoch).")
