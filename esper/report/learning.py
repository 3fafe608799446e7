"""PPO learning curves from the ``ppo_update`` events, one point per round: what the policy
earned (return, test accuracy) and how the learner behaved (explained variance, per-head
entropy, KL, clip fraction). Rounds whose update was rolled back are marked."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from esper.report.figure import env_color, figure
from esper.report.run import RunData
from esper.report.section import Section


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")  # a non-finite value is written as null


def learning_section(run: RunData) -> Section:
    if not run.ppo:
        return Section("ppo", "PPO learning curves",
                       note="No ppo_update events: this run did not train a PPO controller.")
    rounds = np.array([_num(p.get("round", i + 1)) for i, p in enumerate(run.ppo)])

    def col(key: str) -> np.ndarray:
        return np.array([_num(p.get(key)) for p in run.ppo])

    fig, axes = figure(2, 3, height=2.6, sharex=True)
    marker = "o" if len(rounds) <= 40 else None
    panels = (("mean_return", "return (mean per episode)"), ("test_acc", "test accuracy (%)"),
              ("explained_variance", "explained variance"), (None, "entropy per head"),
              ("kl", "approx. KL"), ("clip_fraction", "clip fraction"))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.25)
        if key is not None:
            ax.plot(rounds, col(key), marker=marker, markersize=3, color="#1f77b4")
    axes[0, 1].plot(rounds, col("final_val_acc"), marker=marker, markersize=3, color="#999999",
                    linestyle="--", label="final val acc")
    if run.heldout:  # the same held-out hosts every round: the curve that shows learning
        at = [_num(h.get("round")) for h in run.heldout]
        axes[0, 1].errorbar(at, [_num(h.get("controller")) for h in run.heldout],
                            yerr=[_num(h.get("diff_sem")) for h in run.heldout], marker="s", markersize=3,
                            color="#2ca02c", capsize=2, label="held-out hosts: controller (greedy)")
        axes[0, 1].plot(at, [_num(h.get("heuristic")) for h in run.heldout], color="#ff7f0e", linestyle=":",
                        label="held-out hosts: heuristic")
    axes[0, 1].legend(fontsize=7)
    heads = sorted({h for p in run.ppo for h in (p.get("entropy") or {})})
    for rank, head in enumerate(heads):
        axes[1, 0].plot(rounds, [_num((p.get("entropy") or {}).get(head)) for p in run.ppo], marker=marker,
                        markersize=3, color=env_color(rank), label=head)
    if heads:
        axes[1, 0].legend(fontsize=7, ncol=2)
    rolled = [r for r, p in zip(rounds, run.ppo, strict=True) if p.get("rolled_back")]
    if rolled:
        ret = col("mean_return")
        axes[0, 0].scatter(rolled, [ret[list(rounds).index(r)] for r in rolled], marker="X", s=70,
                           color="#d62728", zorder=5, label="update rolled back")
        axes[0, 0].legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    last = run.ppo[-1]
    return Section("ppo", "PPO learning curves", fig, alt="PPO learning curves per round",
                   note=f"{len(run.ppo)} rounds; last: return {_num(last.get('mean_return')):+.3f}, "
                        f"test accuracy {_num(last.get('test_acc')):.2f}, explained variance "
                        f"{_num(last.get('explained_variance')):+.2f}"
                        + (f"; {len(rolled)} updates rolled back" if rolled else "") + "."
                        + (_heldout_note(run.heldout) if run.heldout else ""))


def _heldout_note(heldout: list[dict[str, Any]]) -> str:
    first, last = heldout[0], heldout[-1]
    return (f" Held-out hosts ({last.get('hosts')}, test split, the same every round): the greedy controller "
            f"{_num(first.get('controller')):.2f} at round {first.get('round')} and {_num(last.get('controller')):.2f} "
            f"at round {last.get('round')}, the heuristic {_num(last.get('heuristic')):.2f}; last difference "
            f"{_num(last.get('diff')):+.2f} ± {_num(last.get('diff_sem')):.2f} (s.e., paired by host).")
