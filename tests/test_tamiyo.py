"""Tamiyo: features, masks, heuristic rules and baselines on crafted signals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tensordict import TensorDict

from esper.leyline import NUM_GATES, REASONS, GateId, ObservationSchema, Op, Reason, SeedStage
from esper.tamiyo.baselines import FixedSchedulePolicy, RandomPolicy, StaticPolicy
from esper.tamiyo.config import HeuristicConfig
from esper.tamiyo.features import FeatureBuilder, RunningNorm, new_tracker
from esper.tamiyo.heuristic import HeuristicPolicy
from esper.tamiyo.masks import action_masks

S = SeedStage
BPS = ("noop", "norm", "conv_small", "conv_light")
N, NS, H = 4, 3, 4


def signals(**over: torch.Tensor) -> TensorDict:
    """A crafted Kasmina signals TensorDict (the exact keys/shapes the env exposes)."""
    f = torch.zeros
    base = {
        "train_loss": torch.ones(N), "train_acc": torch.full((N,), 50.0),
        "val_loss": torch.ones(N), "val_acc": torch.full((N,), 50.0),
        "host_grad_norm": torch.ones(N), "params_added": f(N), "flops_added": f(N),
        "action_accepted": torch.ones(N, dtype=torch.bool), "epoch": torch.full((N,), 5),
        "seed_grad_norm": f(N, NS), "val_acc_without": torch.full((N, NS), 50.0),
        "contribution": f(N, NS), "alpha": f(N, NS),
        "germinated": f(N, NS, dtype=torch.bool), "embargoed": f(N, NS, dtype=torch.bool),
        "stage_before": torch.full((N, NS), int(S.DORMANT)), "stage": torch.full((N, NS), int(S.DORMANT)),
        "blueprint": f(N, NS, dtype=torch.long), "epochs_in_stage": f(N, NS, dtype=torch.long),
        "seed_age": f(N, NS, dtype=torch.long), "gate_pass": f(N, NS, NUM_GATES, dtype=torch.bool),
    }
    base.update(over)
    return TensorDict(base, batch_size=[N])


def env_td(sig: TensorDict, tracker: TensorDict | None = None) -> TensorDict:
    tr = tracker if tracker is not None else new_tracker(N, NS, H, "cpu")
    masks = action_masks(sig["stage"], sig["gate_pass"], len(BPS))
    return TensorDict({"signals": sig, "tracker": tr, **masks.to_dict()}, batch_size=[N])


def test_features_follow_schema_and_zero_unmeasured() -> None:
    schema = ObservationSchema(history_length=H, blueprints=BPS)
    fb = FeatureBuilder(schema, host_params=1000.0, episode_length=10)
    tr = new_tracker(N, NS, H, "cpu")
    alpha = torch.zeros(N, NS)
    alpha[0, 1] = 0.5
    stage = torch.full((N, NS), int(S.DORMANT))
    stage[0, 1] = S.BLENDING
    sig = signals(alpha=alpha, stage=stage, contribution=torch.full((N, NS), 3.0))
    tr = fb.update_tracker(tr, sig, torch.zeros(N, dtype=torch.long))
    raw = fb.raw(tr, sig)
    assert raw.shape == (N, schema.size)
    idx = schema.index
    assert raw[0, idx["mid.contribution"]] == pytest.approx(0.03)
    assert raw[0, idx["mid.contribution_measured"]] == 1.0
    assert raw[0, idx["early.contribution"]] == 0.0 and raw[1, idx["mid.contribution_measured"]] == 0.0
    assert raw[0, idx["mid.stage_blending"]] == 1.0 and raw[0, idx["early.stage_dormant"]] == 1.0
    assert raw[0, idx["last_op_0"]] == 1.0
    out = fb(tr, sig)
    assert out[1, idx["mid.contribution"]] == 0.0 and torch.isfinite(out).all()


def test_blueprints_land_on_catalogue_columns_and_losses_in_units_of_ln_classes() -> None:
    """A run's blueprint b lights the schema column of its name, whatever the run's set; losses
    read as fractions of a uniform guess's loss, whatever the number of classes."""
    import math

    schema = ObservationSchema(history_length=H, blueprints=BPS)
    stage = torch.full((N, NS), int(S.DORMANT))
    stage[:, 0] = S.TRAINING
    sig = signals(stage=stage, blueprint=torch.zeros(N, NS, dtype=torch.long),
                  val_loss=torch.full((N,), math.log(10.0)), train_loss=torch.full((N,), 1.0))
    tr = new_tracker(N, NS, H, "cpu")
    # Run A offers (conv_light, norm), run B (norm,): index 0 of each is another blueprint.
    run_a = FeatureBuilder(schema, 1000.0, 10, blueprint_columns=[BPS.index("conv_light"), BPS.index("norm")],
                           num_classes=10)
    run_b = FeatureBuilder(schema, 1000.0, 10, blueprint_columns=[BPS.index("norm")], num_classes=256)
    ra, rb = run_a.raw(tr, sig), run_b.raw(tr, sig)
    idx = schema.index
    assert ra[0, idx["early.blueprint_conv_light"]] == 1.0 and ra[0, idx["early.blueprint_norm"]] == 0.0
    assert rb[0, idx["early.blueprint_norm"]] == 1.0 and rb[0, idx["early.blueprint_conv_light"]] == 0.0
    assert ra[0, idx["val_loss"]] == pytest.approx(1.0)  # ln 10 in units of ln 10
    assert rb[0, idx["train_loss"]] == pytest.approx(1.0 / math.log(256))


def test_tracker_counts_plateau_and_improvement() -> None:
    schema = ObservationSchema(history_length=H, blueprints=BPS)
    fb = FeatureBuilder(schema, 1000.0, 10)
    tr = new_tracker(N, NS, H, "cpu")
    accs = [10.0, 20.0, 20.1, 20.2, 30.0]
    for e, a in enumerate(accs, start=1):
        tr = fb.update_tracker(tr, signals(val_acc=torch.full((N,), a), epoch=torch.full((N,), e)),
                               torch.zeros(N, dtype=torch.long))
        if e == 4:
            assert int(tr["plateau_epochs"][0]) == 2
            assert int(tr["epochs_since_improvement"][0]) == 2  # +0.1 steps are not improvements
    assert int(tr["plateau_epochs"][0]) == 0
    assert torch.allclose(tr["val_acc_hist"][0], torch.tensor([20.0, 20.1, 20.2, 30.0]))


def test_running_norm_state_dict_and_eval_freeze() -> None:
    rn = RunningNorm(3)
    x = torch.randn(64, 3) * 5 + 2
    rn(x)
    assert torch.allclose(rn.mean, x.mean(0), atol=1e-5)
    assert torch.allclose(rn.var, x.var(0, unbiased=False), atol=1e-4)
    rn.eval()
    before = rn.state_dict()["count"].clone()
    rn(torch.randn(8, 3))
    assert rn.count == before
    other = RunningNorm(3)
    other.load_state_dict(rn.state_dict())
    assert torch.equal(other.mean, rn.mean)


def test_masks_per_stage() -> None:
    stage = torch.tensor([[S.DORMANT, S.TRAINING, S.PROBATIONARY], [S.EMBARGOED, S.BLENDING, S.FOSSILIZED],
                          [S.DORMANT] * 3, [S.TRAINING] * 3])
    gates = torch.zeros(4, 3, NUM_GATES, dtype=torch.bool)
    gates[0, 1, GateId.G2_BLENDING] = True
    gates[0, 2, GateId.G5_FOSSILIZE] = True
    m = action_masks(stage, gates, 4)
    assert m["op_mask"][:, Op.WAIT].all()
    assert m["slot_mask"][0, Op.GERMINATE].tolist() == [True, False, False]
    assert m["slot_mask"][0, Op.ADVANCE].tolist() == [False, True, False]
    assert m["slot_mask"][0, Op.FOSSILIZE].tolist() == [False, False, True]
    assert m["slot_mask"][0, Op.CULL].tolist() == [False, True, True]
    assert m["op_mask"][1].tolist() == [True, False, False, True, False]
    assert m["op_mask"][3].tolist() == [True, False, False, True, False]  # G2 not passed


def _heuristic(**cfg: object) -> HeuristicPolicy:
    return HeuristicPolicy(HeuristicConfig(**cfg), BPS, N)


def test_heuristic_germinates_on_plateau_only_after_warmup() -> None:
    tr = new_tracker(N, NS, H, "cpu")
    # Per-epoch val acc histories (oldest first): env 1 still climbs 3 points per epoch.
    tr["val_acc_hist"] = torch.tensor([[40.0, 41.0, 41.5, 42.0], [40.0, 43.0, 46.0, 49.0],
                                       [40.0, 41.0, 41.5, 42.0], [40.0, 41.0, 41.5, 42.0]])
    epoch = torch.tensor([5, 5, 1, 5])
    stage = torch.full((N, NS), int(S.DORMANT))
    stage[3, 0] = S.TRAINING  # a seed in isolated training
    out = _heuristic(warmup_epochs=3, plateau_epochs=2, plateau_delta=1.0)(env_td(signals(epoch=epoch, stage=stage), tr))
    assert out["op"].tolist() == [Op.GERMINATE, Op.WAIT, Op.WAIT, Op.WAIT]
    assert out["reason"].tolist() == [Reason.GERMINATE_PLATEAU, Reason.WAIT_NO_PLATEAU,
                                      Reason.WAIT_WARMUP, Reason.WAIT_SEED_LIVE]
    assert int(out["blueprint"][0]) != BPS.index("noop")
    assert len(REASONS) == len(Reason)


def test_plateau_is_the_mean_gain_over_a_window() -> None:
    pol = _heuristic(plateau_epochs=3, plateau_delta=1.0)
    hist = torch.tensor([[50.0, 52.0, 50.5, 52.5],   # noisy, +0.83/epoch: plateau
                         [50.0, 50.5, 51.0, 53.5],   # +1.17/epoch: still improving
                         [60.0, 59.0, 58.0, 57.0],   # falling: plateau
                         [50.0, 51.0, 52.0, 53.0]])  # exactly +1.0/epoch: not below
    assert pol.plateaued(hist).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="plateau_epochs \\(4\\) needs a val-acc history longer than 4"):
        _heuristic(plateau_epochs=4).plateaued(hist)


@pytest.mark.parametrize(("wait_for", "germinates"), [
    ("live", [True, False, False, False]),
    ("isolated", [True, False, True, True]),
    ("nothing", [True, True, True, True]),
])
def test_wait_for_sets_which_live_seeds_block_germination(wait_for: str, germinates: list[bool]) -> None:
    tr = new_tracker(N, NS, H, "cpu")
    tr["val_acc_hist"] = torch.full((N, H), 50.0)  # flat: plateau everywhere
    stage = torch.full((N, NS), int(S.DORMANT))
    stage[1, 0] = S.TRAINING  # isolated
    stage[2, 0] = S.BLENDING
    stage[3, 0] = S.PROBATIONARY
    out = _heuristic(wait_for=wait_for)(env_td(signals(stage=stage), tr))
    assert (out["op"] == Op.GERMINATE).tolist() == germinates
    blocked = ~torch.tensor(germinates)
    assert out["reason"][blocked].eq(Reason.WAIT_SEED_LIVE).all()


def test_heuristic_respects_cull_cooldown() -> None:
    tr = new_tracker(N, NS, H, "cpu")
    tr["val_acc_hist"] = torch.full((N, H), 50.0)
    tr["epochs_since_cull"] = torch.tensor([0, 1, 10, 10])
    out = _heuristic(cull_cooldown=3)(env_td(signals(), tr))
    assert out["op"].tolist() == [Op.WAIT, Op.WAIT, Op.GERMINATE, Op.GERMINATE]
    assert int(out["reason"][0]) == Reason.WAIT_COOLDOWN


def test_heuristic_culls_on_drop_and_decides_at_last_gate() -> None:
    pol = _heuristic(drop_threshold=2.0, min_epochs_before_cull=2, fossilize_threshold=0.5, probation_patience=2)
    germ = torch.zeros(N, NS, dtype=torch.bool)
    germ[:, 0] = True
    tr = new_tracker(N, NS, H, "cpu")
    tr["prev_val_acc"] = torch.full((N,), 50.0)
    stage = torch.full((N, NS), int(S.DORMANT))
    stage[:, 0] = S.GERMINATED
    pol(env_td(signals(germinated=germ, stage=stage), tr))  # records acc at germination = 50
    stage = torch.full((N, NS), int(S.DORMANT))
    stage[0, 0] = S.TRAINING  # env 0: accuracy dropped 5 points after 3 epochs -> cull
    stage[1, 0] = S.PROBATIONARY  # env 1: contributes, G5 passes -> fossilize
    stage[2, 0] = S.PROBATIONARY  # env 2: no contribution after patience -> cull
    stage[3, 0] = S.TRAINING  # env 3: dropped but too early in stage -> wait
    eis = torch.zeros(N, NS, dtype=torch.long)
    eis[:, 0] = torch.tensor([3, 2, 2, 1])
    contribution = torch.zeros(N, NS)
    contribution[1, 0], contribution[2, 0] = 2.0, 0.1
    alpha = torch.zeros(N, NS)
    alpha[1:3, 0] = 1.0
    gates = torch.zeros(N, NS, NUM_GATES, dtype=torch.bool)
    gates[1, 0, GateId.G5_FOSSILIZE] = True
    val = torch.tensor([45.0, 55.0, 55.0, 45.0])
    out = pol(env_td(signals(stage=stage, epochs_in_stage=eis, contribution=contribution, alpha=alpha,
                             gate_pass=gates, val_acc=val)))
    assert out["op"].tolist() == [Op.CULL, Op.FOSSILIZE, Op.CULL, Op.WAIT]
    assert out["reason"].tolist()[:3] == [Reason.CULL_ACC_DROP, Reason.FOSSILIZE_CONTRIBUTION,
                                          Reason.CULL_LOW_CONTRIBUTION]


def test_heuristic_advances_when_gate_passes() -> None:
    stage = torch.full((N, NS), int(S.DORMANT))
    stage[:, 1] = S.TRAINING
    gates = torch.zeros(N, NS, NUM_GATES, dtype=torch.bool)
    gates[:2, 1, GateId.G2_BLENDING] = True
    out = _heuristic()(env_td(signals(stage=stage, gate_pass=gates, epochs_in_stage=torch.ones(N, NS, dtype=torch.long))))
    assert out["op"].tolist() == [Op.ADVANCE, Op.ADVANCE, Op.WAIT, Op.WAIT]
    assert out["slot"][:2].tolist() == [1, 1]


def test_blueprint_rotation_penalizes_culled() -> None:
    pol = _heuristic(penalty_decay=0.5, cull_penalty=1.0)
    legal = torch.ones(N, len(BPS), dtype=torch.bool)
    first = pol.choose_blueprint(legal)
    # Default order: capacity first (conv_light), then conv_small, then norm; noop never.
    assert first.tolist() == [BPS.index("conv_light")] * N
    pol.pointer = pol.rank[first] + 1
    assert pol.choose_blueprint(legal).tolist() == [BPS.index("conv_small")] * N
    # env 0 culled a conv_small seed (CULLED -> EMBARGOED within the epoch): it is skipped
    # while its penalty lasts, and the penalty decays.
    stage = torch.full((N, NS), int(S.DORMANT))
    stage[0, 0] = S.EMBARGOED
    before = torch.full((N, NS), int(S.DORMANT))
    before[0, 0] = S.TRAINING
    bp = torch.full((N, NS), BPS.index("conv_small"))
    pol._observe(signals(stage=stage, stage_before=before, blueprint=bp), new_tracker(N, NS, H, "cpu"))
    c = BPS.index("conv_small")
    assert pol.penalty[0, c] == 1.0 and pol.penalty[1].sum() == 0
    assert pol.choose_blueprint(legal).tolist() == [BPS.index("norm")] + [c] * (N - 1)
    pol._observe(signals(), new_tracker(N, NS, H, "cpu"))
    assert pol.penalty[0, c] == 0.5
    pol.reset(torch.tensor([True, False, False, False]))
    assert pol.penalty[0].sum() == 0 and int(pol.pointer[0]) == 0


def test_random_policy_is_legal_and_per_env_keyed() -> None:
    stage = torch.tensor([[S.DORMANT, S.TRAINING, S.PROBATIONARY]] * N)
    sig = signals(stage=stage)
    a = RandomPolicy(N, seed=3)(env_td(sig))
    masks = action_masks(stage, sig["gate_pass"], len(BPS))
    assert masks["op_mask"].gather(1, a["op"][:, None]).all()
    assert masks["slot_mask"][torch.arange(N), a["op"], a["slot"]].all()
    # env 2 alone (offset 2) draws what env 2 of the batch drew
    solo = RandomPolicy(1, seed=3, env_offset=2)
    one = TensorDict({k: v[2:3] for k, v in env_td(sig).items()}, batch_size=[1])
    b = solo(one)
    assert [int(b[k][0]) for k in ("op", "slot", "blueprint", "tempo")] == [int(a[k][2]) for k in ("op", "slot", "blueprint", "tempo")]


def test_static_and_fixed_schedule() -> None:
    assert StaticPolicy()(env_td(signals()))["op"].eq(Op.WAIT).all()
    fixed = FixedSchedulePolicy(blueprint=3, epochs=(5,))
    out = fixed(env_td(signals(epoch=torch.tensor([5, 4, 5, 6]))))
    assert out["op"].tolist() == [Op.GERMINATE, Op.WAIT, Op.GERMINATE, Op.WAIT]
    assert out["blueprint"].eq(3).all()
    germ = out["op"] == Op.GERMINATE
    assert out["slot"][germ].eq(2).all()  # the deepest (widest) free slot
    shallow = FixedSchedulePolicy(blueprint=3, epochs=(5,), slot_preference="shallowest")
    out = shallow(env_td(signals(epoch=torch.tensor([5, 4, 5, 6]))))
    assert out["slot"][germ].eq(0).all()


def test_heuristic_config_is_strict() -> None:
    with pytest.raises(ValueError, match="bogus"):
        HeuristicConfig(bogus=1)
    assert {f for f in HeuristicConfig.model_fields} >= {"warmup_epochs", "drop_threshold"}
    assert dataclasses.is_dataclass(S) is False
