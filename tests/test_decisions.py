"""Decisions explained: context (why this, why not the others) and hindsight k epochs later."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_config import TINY

from esper.leyline import NUM_GATES, GateId, Op, SeedStage
from esper.leyline.constants import GateReason
from esper.nissa import NissaHub, load_profile
from esper.nissa.decisions import decision_context, why_refused
from esper.simic.checkpoint import load_policy
from esper.simic.config import TrainingConfig, merge_config
from esper.simic.env import MorphogeneticEnv, load_config_task
from esper.simic.ppo import PPOTrainer
from esper.simic.runner import EpisodeRunner
from esper.tamiyo.policies import make_policy

S = SeedStage
SLOTS = ("early", "mid", "late")


class Memory:
    name = "memory"

    def __init__(self) -> None:
        self.events: list[dict] = []

    def emit(self, event) -> None:
        self.events.append(event.to_dict())

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


def test_refused_alternatives_name_the_gate_and_its_reason() -> None:
    stage = np.array([S.TRAINING, S.PROBATIONARY, S.EMBARGOED])
    reasons = np.zeros((3, NUM_GATES), dtype=np.int64)
    reasons[0, GateId.G2_BLENDING] = GateReason.TOO_FEW_EPOCHS
    reasons[1, GateId.G5_FOSSILIZE] = GateReason.CONTRIBUTION_LOW
    assert why_refused(Op.GERMINATE, stage, reasons, SLOTS) == "no slot is free (early TRAINING, mid PROBATIONARY, late EMBARGOED)"
    assert why_refused(Op.ADVANCE, stage, reasons, SLOTS) == (
        "gate G2_BLENDING refused (early: the seed has not spent enough epochs in its stage)")
    assert why_refused(Op.FOSSILIZE, stage, reasons, SLOTS) == (
        "gate G5_FOSSILIZE refused (mid: the counterfactual contribution is below the threshold)")
    decided = {"stage": stage, "gate_reason": reasons, "op_mask": np.array([1, 0, 0, 1, 0], dtype=bool),
               "op_probs": np.array([0.75, 0.0, 0.0, 0.25, 0.0]), "value": np.float32(0.5)}
    ctx = decision_context(int(Op.WAIT), "", decided, SLOTS)
    assert ctx["why_this_action"] == "policy: p(wait) = 0.75, value estimate 0.500"
    assert ctx["why_not_alternatives"]["cull"] == "legal, p = 0.25"
    assert ctx["why_not_alternatives"]["germinate"].startswith("refused: no slot is free")


def _run(policy: str, env: MorphogeneticEnv, cfg: TrainingConfig, k: int) -> list[dict]:
    memory = Memory()
    hub = NissaHub([memory])
    profile = load_profile("minimal").model_copy(update={"hindsight_epochs": k})
    pol = policy if not isinstance(policy, str) else make_policy(policy, env, cfg)
    EpisodeRunner(env, pol, hub=hub, profile=profile).run(1)
    hub.close()
    return memory.events


@pytest.fixture(scope="module")
def setting():
    cfg = TrainingConfig.from_dict(merge_config(TINY, {"episode": {"length": 8, "envs": 2}}))
    return cfg, load_config_task(cfg)


def test_heuristic_decisions_carry_context_and_hindsight_k_epochs_later(setting) -> None:
    cfg, task = setting
    k = 3
    events = _run("heuristic", MorphogeneticEnv(cfg, task=task), cfg, k)
    decisions = [e for e in events if e["kind"] == "decision"]
    assert len(decisions) == 2 * 8
    for d in decisions:
        alts = d["payload"]["context"]["why_not_alternatives"]
        assert set(alts) | {d["action"].split("(")[0]} == {o.name.lower() for o in Op}
    assert any(v == "refused: no live seed to cull" for d in decisions
               for v in d["payload"]["context"]["why_not_alternatives"].values())
    grown = [d for d in decisions if d["accepted"] and not d["action"].startswith("wait")]
    hindsight = [e for e in events if e["kind"] == "hindsight"]
    assert grown and len(grown) < len(decisions)
    # Every decision, waits and refusals included, is judged exactly once, the last k - 1 of an
    # episode at its end.
    judged = sorted((h["env"], h["payload"]["decision_epoch"]) for h in hindsight)
    assert judged == sorted((d["env"], d["epoch"]) for d in decisions)
    by_key = {(d["env"], d["epoch"]): d for d in decisions}
    assert all(h["payload"]["action"] == by_key[(h["env"], h["payload"]["decision_epoch"])]["action"]
               and h["payload"]["accepted"] == by_key[(h["env"], h["payload"]["decision_epoch"])]["accepted"]
               for h in hindsight)
    assert sum(h["payload"]["epochs_later"] < k for h in hindsight) == 2 * (k - 1)
    val = {}  # (env, epoch) -> validation accuracy from the epoch events
    for e in events:
        if e["kind"] == "epoch":
            for i, (ep, acc) in enumerate(zip(e["payload"]["signals.epoch"], e["payload"]["signals.val_acc"],
                                              strict=True)):
                val[(i, int(ep))] = float(acc)
    for h in hindsight:
        p = h["payload"]
        assert h["epoch"] == min(p["decision_epoch"] + k - 1, 8) and p["epochs_later"] == h["epoch"] - p["decision_epoch"] + 1
        assert p[f"accuracy_{k}_epochs_later"] == val[(h["env"], h["epoch"])]
        assert p["accuracy_at_decision"] == val.get((h["env"], p["decision_epoch"] - 1), 0.0)
        acted = p["accepted"] and not p["action"].startswith("wait")
        assert (p["seed_stage"] is None) == (not acted)
        assert p["was_good_decision"] == (p["accuracy_delta"] >= 0 and (p["seed_stage"] is None or p["seed_stage"] not in (
            "CULLED", "EMBARGOED", "DORMANT") or p["action"].startswith("cull")))
    for d in decisions:  # the context names what the controller saw the epoch before it decided
        ctx = d["payload"]["context"]
        assert {"narrative", "red_flags", "opportunities"} <= set(ctx)
        if d["epoch"] == 1:
            assert ctx["narrative"].startswith("first epoch") and ctx["red_flags"] == []
        else:
            assert ctx["narrative"].startswith(f"env {d['env']} epoch {d['epoch'] - 1}:")


def test_ppo_decisions_give_head_probabilities_and_value(setting, tmp_path) -> None:
    cfg, task = setting
    env = MorphogeneticEnv(cfg, task=task)
    path = PPOTrainer(cfg, env=MorphogeneticEnv(cfg, task=task)).save(tmp_path / "p.pt")
    events = _run(load_policy(path, env, deterministic=True), env, cfg, 5)
    decisions = [e for e in events if e["kind"] == "decision"]
    assert decisions
    for d in decisions:
        ctx = d["payload"]["context"]
        assert ctx["why_this_action"].startswith("policy: p(") and "value estimate" in ctx["why_this_action"]
        probs = [float(v.rsplit("= ", 1)[1]) for v in ctx["why_not_alternatives"].values() if v.startswith("legal")]
        chosen = float(ctx["why_this_action"].split("= ", 1)[1].split(",")[0])
        assert sum(probs) + chosen == pytest.approx(1.0, abs=0.03)  # refused ops hold no probability
