"""Leyline holds the contracts once (stage predicates, reason codes); dead surface is gone or wired."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_config import TINY

import esper.leyline as leyline
from esper.kasmina import slots as kslots
from esper.kasmina.epoch import MorphogeneticBatch
from esper.kasmina.gates import GateConfig
from esper.kasmina.schedules import alpha_ramp
from esper.kasmina.slots import Lifecycle, new_slot_state
from esper.kasmina.step import StepHyper
from esper.leyline import (
    COMPUTING_STAGES,
    ISOLATED_STAGES,
    LIVE_STAGES,
    MEASURED_STAGES,
    PRESENT_STAGES,
    REASONS,
    AlphaSchedule,
    EventKind,
    ObservationSchema,
    Reason,
    SeedStage,
    stage_mask,
)
from esper.nissa import BlueprintAnalytics
from esper.simic.config import TrainingConfig, merge_config
from esper.simic.env import kasmina_config, load_config_task
from esper.simic.errors import ConfigError
from esper.tamiyo import heuristic
from esper.tamiyo.config import FeatureConfig, HeuristicConfig
from esper.tamiyo.features import FeatureBuilder, new_tracker

S = SeedStage


# ----------------------------------------------------------------------------- stage predicates
def test_stage_predicates_are_defined_once_in_leyline() -> None:
    assert {S.GERMINATED, S.TRAINING, S.BLENDING, S.SHADOWING, S.PROBATIONARY} == LIVE_STAGES
    assert LIVE_STAGES | {S.FOSSILIZED} == PRESENT_STAGES
    assert {S.GERMINATED, S.TRAINING} == ISOLATED_STAGES
    assert {S.TRAINING, S.BLENDING, S.SHADOWING, S.PROBATIONARY, S.FOSSILIZED} == COMPUTING_STAGES
    assert {S.BLENDING, S.SHADOWING, S.PROBATIONARY, S.FOSSILIZED} == MEASURED_STAGES
    assert [leyline.is_isolated(s) for s in (S.GERMINATED, S.TRAINING, S.BLENDING)] == [True, True, False]
    assert leyline.is_computing(S.FOSSILIZED) and not leyline.is_computing(S.GERMINATED)
    assert leyline.is_measured(S.SHADOWING) and not leyline.is_measured(S.TRAINING)
    assert leyline.is_live(S.PROBATIONARY) and not leyline.is_live(S.FOSSILIZED)
    # Kasmina reads Leyline's sets (no copy of its own).
    assert kslots.COMPUTING_STAGES is COMPUTING_STAGES
    assert kslots.TRAINABLE_STAGES == LIVE_STAGES & COMPUTING_STAGES
    assert getattr(kslots, "ISOLATED_STAGES", ISOLATED_STAGES) is ISOLATED_STAGES
    assert not hasattr(kslots, "BLENDED_STAGES")


def test_kasmina_and_heuristic_use_the_same_isolated_predicate() -> None:
    lc = Lifecycle(GateConfig(), "cpu")
    stages = list(S)
    st = new_slot_state(len(stages), "cpu")
    st["stage"] = torch.tensor([int(s) for s in stages])
    ctrl = lc.controls(st, 0.05, torch.full((len(stages),), 0.05), 2)
    # Straight-through training: isolated and computing, i.e. TRAINING only.
    assert [stages[i] for i in ctrl["isolated"].nonzero().flatten().tolist()] == [S.TRAINING]
    assert [stages[i] for i in ctrl["lr"].nonzero().flatten().tolist()] == [
        S.TRAINING, S.BLENDING, S.SHADOWING, S.PROBATIONARY, S.FOSSILIZED
    ]
    pol = heuristic.HeuristicPolicy(HeuristicConfig(wait_for="isolated"), ("norm", "conv_small"), 1)
    assert torch.equal(pol.blocking, stage_mask(ISOLATED_STAGES))
    assert torch.equal(pol.measured, stage_mask(MEASURED_STAGES))


def test_reason_codes_live_in_leyline() -> None:
    assert heuristic.Reason is Reason and heuristic.REASONS is REASONS
    assert REASONS[Reason.GERMINATE_PLATEAU] == "germinate_plateau"
    assert REASONS[Reason.STATIC] == "static" and len(REASONS) == len(Reason) == 15
    assert leyline.reason_from_name("germinate_plateau") is Reason.GERMINATE_PLATEAU
    assert leyline.reason_from_name("CULL_ACC_DROP") is Reason.CULL_ACC_DROP
    assert leyline.reason_from_name("no_such_reason") is None


# ----------------------------------------------------------------------------- dead surface
def test_dead_surface_is_gone() -> None:
    st = new_slot_state(2, "cpu")
    assert not {"alpha_target", "contribution_prev", "contribution_measured"} & set(st.keys())
    assert "alpha_target" not in ObservationSchema(history_length=2, blueprints=("norm",)).per_slot
    assert not hasattr(leyline, "ActionSpace")
    assert "gate" not in {k.value for k in EventKind}
    assert not hasattr(BlueprintAnalytics, "record_many")
    fields = {f.name for f in dataclasses.fields(StepHyper)}
    assert fields == {"host_lr", "momentum", "weight_decay", "max_grad_norm", "optimizer", "beta2", "eps"}


def _blend_curve(lc: Lifecycle, tempo_index: int = 2) -> list[float]:
    """Germinate one seed, take it to BLENDING and record alpha at each blending epoch."""
    st = new_slot_state(1, "cpu")
    yes = torch.ones(1, dtype=torch.bool)
    gates = torch.ones(1, 6, dtype=torch.bool)
    lc.germinate(st, yes, torch.tensor([1]), torch.tensor([tempo_index]), 2, torch.zeros(1))
    lc.advance(st, yes, gates)  # -> TRAINING
    lc.advance(st, yes, gates)  # -> BLENDING (first ramp step)
    curve = [float(st["alpha"][0])]
    while int(st["stage"][0]) == S.BLENDING and float(st["alpha"][0]) < 1.0:
        lc.end_epoch(st)
        curve.append(float(st["alpha"][0]))
    return curve


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_alpha_schedule_is_a_config_choice(name: str) -> None:
    cfg = TrainingConfig.from_dict(merge_config(TINY, {"kasmina": {"alpha_schedule": name}}))
    kcfg = kasmina_config(cfg)
    batch = MorphogeneticBatch(load_config_task(cfg), 1, kcfg)
    assert batch.lifecycle.schedule is AlphaSchedule[name.upper()]
    curve = _blend_curve(batch.lifecycle)
    tempo = leyline.TEMPOS[2]
    expected = alpha_ramp(torch.arange(1, tempo + 1) / tempo, torch.tensor(int(AlphaSchedule[name.upper()])))
    assert curve == pytest.approx(expected.tolist(), abs=1e-6)
    assert curve[-1] == pytest.approx(1.0)
    linear = [k / tempo for k in range(1, tempo + 1)]
    if name == "linear":
        assert curve == pytest.approx(linear)
    else:  # both ease in: below the linear ramp in the first half
        assert curve[0] < linear[0] - 0.05


def test_alpha_schedule_refuses_unknown_names() -> None:
    with pytest.raises(ConfigError, match="alpha_schedule"):
        TrainingConfig.from_dict({"kasmina": {"alpha_schedule": "quadratic"}})


def test_feature_thresholds_come_from_config() -> None:
    schema = ObservationSchema(history_length=3, blueprints=("norm", "conv_small"))
    n, ns = 2, 3
    sig = {
        "epoch": torch.tensor([2, 2]), "val_loss": torch.ones(n), "val_acc": torch.tensor([51.0, 51.0]),
        "stage": torch.full((n, ns), int(S.DORMANT)), "stage_before": torch.full((n, ns), int(S.DORMANT)),
        "action_accepted": torch.ones(n, dtype=torch.bool), "alpha": torch.zeros(n, ns),
        "contribution": torch.zeros(n, ns),
    }
    from tensordict import TensorDict

    sig_td = TensorDict(sig, batch_size=[n])
    tr = new_tracker(n, ns, 3, "cpu")
    tr["val_acc_hist"][:, -1] = 50.0  # one point of gain since the last epoch
    tr["best_val_acc"][:] = 50.0
    loose = FeatureBuilder(schema, 1000.0, 10, FeatureConfig(plateau_delta=2.0, improvement_delta=2.0))
    strict = FeatureBuilder(schema, 1000.0, 10, FeatureConfig(plateau_delta=0.5, improvement_delta=0.5))
    op = torch.zeros(n, dtype=torch.long)
    a, b = loose.update_tracker(tr, sig_td, op), strict.update_tracker(tr, sig_td, op)
    assert a["plateau_epochs"].tolist() == [1, 1] and b["plateau_epochs"].tolist() == [0, 0]
    assert a["epochs_since_improvement"].tolist() == [1, 1] and b["epochs_since_improvement"].tolist() == [0, 0]
    # The training config carries them to the env's feature builder.
    cfg = TrainingConfig.from_dict({"features": {"plateau_delta": 7.5, "grad_explode": 50.0}})
    assert cfg.features == FeatureConfig(plateau_delta=7.5, grad_explode=50.0)
    with pytest.raises(ConfigError, match=r"features\.plateau_delta"):
        TrainingConfig.from_dict({"features": {"plateau_delta": -1.0}})


def test_env_builds_features_from_the_training_config() -> None:
    from esper.simic.env import MorphogeneticEnv

    cfg = TrainingConfig.from_dict(merge_config(TINY, {"features": {"plateau_delta": 7.5}}))
    env = MorphogeneticEnv(cfg, task=load_config_task(cfg))
    assert env.features.config.plateau_delta == 7.5
