"""The human half of an episode pack's ``meta.json``, as seed 003 lays it out.

Offline learners read the tensors; people (and language models) read this: ``quick_stats``
(action distribution, accuracy range, seed success rate) and, per episode, a ``summary``
(trajectory, key moments with their epochs, outcome) and its ``decisions`` (the observation,
the action, the ``decision_context`` and the ``hindsight`` verdict). Everything comes from the
records the epoch pipeline made for telemetry, so the pack says what the run's JSONL says.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from esper.leyline import ObservationSchema, Op, SeedStage

SUCCESS_RULE = "seeds fossilized / seeds germinated, over all episodes"
ACCURACY_RULE = "range of the episodes' final test accuracy (held-out split), in percent"


def episode_entry(summary: Any, row: int, policy: str) -> dict[str, Any]:
    """One episode's entry: its summary, outcome numbers and decision records (observations
    are filled in by :func:`fill_observations` once the pack's tensors exist)."""
    if summary is None:
        return {"row": row, "episode_id": f"episode_{row:04d}", "policy": policy, "missing": True,
                "summary": None, "decisions": []}
    numbers = {k: v for k, v in summary.to_dict().items() if k not in ("trajectory", "key_moments", "outcome")}
    return {
        "row": row,
        "episode_id": f"episode_{row:04d}",
        "policy": policy,
        **numbers,
        "summary": {"trajectory": summary.trajectory, "key_moments": [dict(m) for m in summary.key_moments],
                    "outcome": summary.outcome},
        "decisions": [dict(d) for d in summary.decisions],
    }


def _readable(schema: ObservationSchema, raw: np.ndarray) -> dict[str, Any]:
    """The base features by name and, per slot, its stage, blueprint, alpha and contribution."""
    idx = schema.index
    out: dict[str, Any] = {name: float(raw[idx[name]]) for name in schema.base if not name[-1].isdigit()}
    slots = {}
    for slot in schema.slots:
        stage = int(np.argmax([raw[idx[f"{slot}.stage_{s.name.lower()}"]] for s in SeedStage]))
        onehot = [raw[idx[f"{slot}.blueprint_{b}"]] for b in schema.blueprints]
        slots[slot] = {
            "stage": SeedStage(stage).name,
            "blueprint": schema.blueprints[int(np.argmax(onehot))] if max(onehot) > 0 else None,
            "alpha": float(raw[idx[f"{slot}.alpha"]]),
            "contribution": float(raw[idx[f"{slot}.contribution"]]),
        }
    out["slots"] = slots
    return out


def fill_observations(episodes: list[dict[str, Any]], raw: torch.Tensor, schema: ObservationSchema) -> None:
    """Give every decision of every episode the observation its controller saw: the readable
    features of ``observation_raw[row, t]`` and where the full vectors are (``data``)."""
    arr = raw.detach().cpu().numpy()
    for ep in episodes:
        for t, d in enumerate(ep["decisions"]):
            d["observation"] = {"data": {"row": ep["row"], "step": t,
                                         "keys": ["observation_raw", "observation_final"]},
                                **_readable(schema, arr[ep["row"], t])}


def quick_stats(episodes: list[dict[str, Any]], op: torch.Tensor) -> dict[str, Any]:
    """Seed 003's ``quick_stats`` from the recorded ops ``[E, T]`` and the episode numbers."""
    counts = torch.bincount(op.reshape(-1).long().cpu(), minlength=len(Op))
    acc = [e["test_acc"] for e in episodes if "test_acc" in e and math.isfinite(e["test_acc"])]
    germinated = sum(int(e.get("germinated", 0)) for e in episodes)
    fossilized = sum(int(e.get("fossilized", 0)) for e in episodes)
    outcomes: dict[str, int] = {}
    for e in episodes:
        if e.get("summary"):
            outcomes[e["summary"]["outcome"]] = outcomes.get(e["summary"]["outcome"], 0) + 1
    return {
        "action_distribution": {o.name: int(counts[int(o)]) for o in Op},
        "accuracy_range": [min(acc), max(acc)] if acc else None,
        "accuracy_rule": ACCURACY_RULE,
        "seed_success_rate": fossilized / germinated if germinated else None,
        "seed_success_rule": SUCCESS_RULE,
        "seeds_germinated": germinated,
        "seeds_fossilized": fossilized,
        "outcomes": outcomes,
    }
