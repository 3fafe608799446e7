"""An episode pack's meta.json says what the run's JSONL says (seed 003's pack layout)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from tiny_config import TINY

from esper import generate
from esper.leyline import Op
from esper.simic.packs import read_pack

ENVS, LENGTH, EPISODES = 2, 6, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, list[dict]]:
    tmp = tmp_path_factory.mktemp("meta")
    cfg = tmp / "c.json"
    cfg.write_text(json.dumps(copy.deepcopy(TINY) | {"episode": {"length": LENGTH, "envs": ENVS}}))
    rc = generate.main(["--policies", "heuristic", "--episodes", str(EPISODES), "--config", str(cfg),
                        "--backends", "jsonl", "--run-dir", str(tmp / "run"), "--out", str(tmp / "pack")])
    assert rc == 0
    data, meta = read_pack(tmp / "pack")
    events = [json.loads(line) for line in (tmp / "run" / "telemetry.jsonl").read_text().splitlines()]
    return data, meta, events


def _episode_events(events: list[dict], env: int, index: int) -> list[dict]:
    """Env ``env``'s events of its ``index``-th episode (episodes end with their episode event)."""
    out: list[list[dict]] = [[]]
    for e in events:
        if e.get("env") != env:
            continue
        out[-1].append(e)
        if e["kind"] == "episode":
            out.append([])
    return out[index]


def test_every_decision_in_the_jsonl_has_one_hindsight(run) -> None:
    _, _, events = run
    decisions = [(e["env"], e["epoch"]) for e in events if e["kind"] == "decision"]
    judged = [(e["env"], e["payload"]["decision_epoch"]) for e in events if e["kind"] == "hindsight"]
    assert len(decisions) == ENVS * LENGTH * EPISODES
    assert sorted(judged) == sorted(decisions)
    waits = [e for e in events if e["kind"] == "decision" and e["action"] == "wait"]
    assert waits  # waits are judged too


def test_quick_stats_match_the_decisions(run) -> None:
    data, meta, events = run
    qs = meta["quick_stats"]
    counted = {o.name: 0 for o in Op}
    for e in events:
        if e["kind"] == "decision":
            counted[e["action"].split("(")[0].upper()] += 1
    assert qs["action_distribution"] == counted and counted["GERMINATE"] > 0
    finals = [e["payload"] for e in events if e["kind"] == "episode"]
    assert qs["accuracy_range"] == [min(f["test_acc"] for f in finals), max(f["test_acc"] for f in finals)]
    germinated = sum(f["germinated"] for f in finals)
    assert germinated > 0 and qs["seed_success_rate"] == sum(f["fossilized"] for f in finals) / germinated
    assert sum(qs["outcomes"].values()) == len(meta["episodes"]) == data.batch_size[0]


@pytest.mark.parametrize("row", [0, ENVS + 1])  # env 0's first episode, env 1's second
def test_one_episode_in_meta_matches_its_events(run, row: int) -> None:
    data, meta, events = run
    ep = meta["episodes"][row]
    env, index = row % ENVS, row // ENVS
    mine = _episode_events(events, env, index)
    final = next(e for e in mine if e["kind"] == "episode")["payload"]
    assert ep["episode_id"] == f"episode_{row:04d}" and ep["env"] == env and ep["test_acc"] == final["test_acc"]
    summary = ep["summary"]
    assert summary["trajectory"] == final["trajectory"] and summary["outcome"] == final["outcome"]
    assert summary["outcome"] == ("successful_intervention" if final["fossilized"] else
                                  "failed_intervention" if final["culled"] else
                                  "unfinished_intervention" if final["germinated"] else "no_intervention")
    # Key moments: one per germination, blend, fossilization and cull, at the lifecycle events' epochs.
    life = {"GERMINATED": "germinate", "BLENDING": "blend", "FOSSILIZED": "fossilize", "CULLED": "cull"}
    want = sorted((e["epoch"], life[e["to_stage"]], e["slot"]) for e in mine
                  if e["kind"] == "lifecycle" and e["to_stage"] in life)
    got = sorted((m["epoch"], m["event"], m["slot"]) for m in summary["key_moments"] if "slot" in m)
    assert want and got == want
    plateaus = [m["epoch"] for m in summary["key_moments"] if m["event"] == "plateau_detected"]
    assert plateaus == [d["epoch"] - 1 for d in mine
                        if d["kind"] == "decision" and d["reason"] == "germinate_plateau" and d["accepted"]]
    # Decisions: one per step, each with its event's action and context and its hindsight verdict.
    decided = [e for e in mine if e["kind"] == "decision"]
    judged = {e["payload"]["decision_epoch"]: e["payload"] for e in mine if e["kind"] == "hindsight"}
    assert len(ep["decisions"]) == len(decided) == LENGTH
    raw = data["observation_raw"][row]
    for t, (d, ev) in enumerate(zip(ep["decisions"], decided, strict=True)):
        assert d["epoch"] == ev["epoch"] == t + 1
        assert d["action"]["text"] == ev["action"] and d["action"]["accepted"] == ev["accepted"]
        assert d["action"]["op"] == Op(int(data["op"][row, t])).name.lower()
        assert d["decision_context"] == ev["payload"]["context"]
        assert {"narrative", "red_flags", "opportunities", "why_this_action", "why_not_alternatives"} <= set(
            d["decision_context"])
        assert d["hindsight"] == judged[d["epoch"]]
        obs = d["observation"]
        assert obs["data"] == {"row": row, "step": t, "keys": ["observation_raw", "observation_final"]}
        idx = meta["schema"]["names"].index("val_acc")
        assert obs["val_acc"] == pytest.approx(float(raw[t, idx]))
        # What the controller saw is what hindsight measured the decision against (percent).
        assert 100 * obs["val_acc"] == pytest.approx(d["hindsight"]["accuracy_at_decision"], abs=1e-4)
        assert set(obs["slots"]) == set(meta["actions"]["slots"])
    stages = [d["observation"]["slots"] for d in ep["decisions"]]
    first_germ = next(m for m in summary["key_moments"] if m["event"] == "germinate")
    if first_germ["epoch"] < LENGTH:  # the step after a germination sees its seed in TRAINING
        after = stages[first_germ["epoch"]][first_germ["slot"]]
        assert after["stage"] == "TRAINING" and after["blueprint"] == first_germ["blueprint"]


def test_pack_meta_is_json_readable_by_people(run, tmp_path: Path) -> None:
    _, meta, _ = run
    first = meta["episodes"][0]
    assert " → " in first["summary"]["trajectory"]
    text = json.dumps({k: v for k, v in meta.items() if k != "obs_norm_state"})
    assert "why_not_alternatives" in text and "was_good_decision" in text
