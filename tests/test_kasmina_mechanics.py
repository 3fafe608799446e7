"""Kasmina mechanics: isolation, identity at germination, blueprints, lifecycle refusals."""

from __future__ import annotations

import pytest
import torch

from esper.kasmina.blueprints import BLUEPRINTS, family_blueprints, get_blueprints
from esper.kasmina.gates import GateConfig, evaluate_gates
from esper.kasmina.hosts import HOST_PRESETS, host_spec
from esper.kasmina.model import Architecture, forward_eval, forward_train
from esper.kasmina.slots import Lifecycle
from esper.kasmina.state import as_dicts, init_state
from esper.kasmina.step import StepHyper, train_step
from esper.leyline import GateReason, SeedStage

S = SeedStage
N = 3


def _arch(n: int = N, blueprints: tuple[str, ...] | None = None) -> Architecture:
    return Architecture(host_spec("impaired"), ("early", "mid", "late"), get_blueprints(blueprints, family="cnn"), n)


def _controls(arch: Architecture, state, lc: Lifecycle) -> dict:
    lr = torch.full((arch.n_envs,), 0.05)
    ctrl = {s: lc.controls(state["slots", s], 0.05, lr, len(arch.blueprints)) for s in arch.slots}
    ctrl["host"] = {"lr": lr}
    return ctrl


def _randomize_seeds(state) -> None:
    """Seeds start as exact identities; give them a real effect so isolation is tested."""
    g = torch.Generator().manual_seed(0)
    for _, v in state["seeds"].items(include_nested=True, leaves_only=True):
        v.copy_(torch.randn(v.shape, generator=g) * 0.3)


def _batch(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, 3, 16, 16, generator=g), torch.randint(0, 10, (n, 8), generator=g)


def test_presets_and_errors() -> None:
    assert host_spec("deep").num_blocks == 5
    assert HOST_PRESETS["baseline"].param_count(3, 10) > 10 * HOST_PRESETS["impaired"].param_count(3, 10)
    with pytest.raises(ValueError, match="unknown host preset 'huge'"):
        host_spec("huge")
    with pytest.raises(ValueError, match="unknown blueprint"):
        get_blueprints(["conv_light", "nope"])


def test_shallow_host_stacks_its_slots_after_one_block() -> None:
    spec = host_spec("shallow")
    assert spec.num_blocks == 1 and spec.slot_after == (0, 0, 0)
    assert spec.spatial_after(16) == ((8, 8),) and spec.slot_channels("late") == 16
    assert spec.spatial_after((10, 3)) == ((10, 3),)  # not pooled below 4 on either side


def test_weights_start_at_pytorch_default_scale() -> None:
    """Host and seed convs draw std 1/sqrt(3 fan_in) (PyTorch's default), per-env keyed."""
    from esper.kasmina.hosts import init_host
    from esper.kasmina.state import init_seeds

    keys = torch.arange(4)
    params, _ = init_host(host_spec("baseline"), keys, 3, 10)
    w = params["block2.conv"]  # [4, 64, 32, 3, 3]
    assert w.std().item() == pytest.approx((3 * 32 * 9) ** -0.5, rel=0.03)
    assert not torch.equal(w[0], w[1])
    again, _ = init_host(host_spec("baseline"), keys[1:2], 3, 10)
    assert torch.equal(again["block2.conv"][0], w[1])  # env 1 alone draws what it drew in the batch
    arch = Architecture(host_spec("baseline"), ("early", "mid", "late"), get_blueprints(("conv_heavy",)), 4)
    seed = init_seeds(arch, keys, "late", torch.zeros(4, dtype=torch.long))["conv_heavy"]
    assert seed["conv1"].std().item() == pytest.approx((3 * 64 * 9) ** -0.5, rel=0.03)
    assert seed["scale"].abs().sum() == 0  # the output path still starts at zero


def test_registry_has_design_blueprints_with_costs() -> None:
    names = set(BLUEPRINTS)
    assert {"noop", "norm", "attention", "depthwise", "bottleneck", "conv_small", "conv_light", "conv_heavy"} <= names
    c = 64
    assert BLUEPRINTS["noop"].param_count(c) == 0
    assert BLUEPRINTS["conv_heavy"].param_count(c) == 2 * BLUEPRINTS["conv_light"].param_count(c) - c
    assert BLUEPRINTS["conv_light"].flops(c, 16) > BLUEPRINTS["conv_small"].flops(c, 16) > 0


@pytest.mark.parametrize("name", list(BLUEPRINTS))
def test_blueprint_param_count_matches_init(name: str) -> None:
    bp = BLUEPRINTS[name]
    params = bp.init(torch.arange(2), 16)
    assert sum(p[0].numel() for p in params.values()) == bp.param_count(16)


@pytest.mark.parametrize("name", family_blueprints("cnn"))
def test_fresh_seed_is_identity_and_trains(name: str) -> None:
    """At germination s == h exactly; after an update the seed can change the output (the LM
    blueprints' version, on token sequences: tests/test_lm_host.py)."""
    bp = BLUEPRINTS[name]
    x = torch.randn(4, 2 * 8, 5, 5)
    params = {k: v.clone().requires_grad_(True) for k, v in bp.init(torch.arange(2), 8).items()}
    delta = bp.delta(params, x, 2)
    assert torch.equal(delta, torch.zeros_like(delta))
    if bp.identity:
        return
    delta.pow(2).sum().backward()  # zero loss gradient at delta=0: use a linear probe instead
    probe = (bp.delta(params, x, 2) * torch.randn_like(x)).sum()
    grads = torch.autograd.grad(probe, list(params.values()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name} cannot learn"


def test_host_gradients_identical_with_training_seed() -> None:
    """Principle 3: a seed in TRAINING never changes the host's update."""
    arch = _arch()
    lc = Lifecycle(GateConfig(), "cpu")
    x, y = _batch()
    results = []
    for with_seed in (False, True):
        state = init_state(arch, torch.arange(N), 3, 10)
        _randomize_seeds(state)
        if with_seed:
            for slot in arch.slots:
                st = state["slots", slot]
                st["stage"] = torch.full((N,), int(S.TRAINING))
                st["blueprint"] = torch.tensor([arch.blueprints.index(BLUEPRINTS[b]) for b in ("conv_light", "attention", "bottleneck")])
        d = as_dicts(state)
        out = train_step(arch, StepHyper(), d["host"], d["buffers"], d["seeds"], d["host_mom"], d["seed_mom"], _controls(arch, state, lc), x, y)
        results.append((state["host"].clone(), out))
    (host_a, out_a), (host_b, out_b) = results
    for key, value in host_a.items():
        assert torch.equal(value, host_b[key]), key
    assert torch.equal(out_a["loss"], out_b["loss"])
    assert (out_b["seed_grad_norm"] > 0).all(), "training seeds must receive gradient"
    assert (out_a["seed_grad_norm"] == 0).all(), "dormant seeds must not"


def test_forward_unchanged_at_germination_and_blending_changes_it() -> None:
    arch = _arch()
    lc = Lifecycle(GateConfig(), "cpu")
    state = init_state(arch, torch.arange(N), 3, 10)
    x = torch.randn(N, 4, 3, 16, 16)
    d = as_dicts(state)
    before, _ = forward_train(arch, d["host"], d["buffers"], d["seeds"], _controls(arch, state, lc), x)
    st = state["slots", "mid"]
    accepted = lc.germinate(st, torch.ones(N, dtype=torch.bool), torch.full((N,), 6), torch.ones(N, dtype=torch.long), len(arch.blueprints), torch.zeros(N))
    assert accepted.all()
    after, _ = forward_train(arch, d["host"], d["buffers"], d["seeds"], _controls(arch, state, lc), x)
    assert torch.equal(before, after)
    # Give the seed an effect and blend it fully: the output must now differ.
    _randomize_seeds(state)
    st["stage"] = torch.full((N,), int(S.FOSSILIZED))
    st["alpha"] = torch.ones(N)
    blended, _ = forward_train(arch, d["host"], d["buffers"], d["seeds"], _controls(arch, state, lc), x)
    assert not torch.allclose(before, blended)


def test_counterfactual_rows() -> None:
    """Row 1+k equals the model with slot k's alpha forced to zero."""
    arch = _arch()
    lc = Lifecycle(GateConfig(), "cpu")
    state = init_state(arch, torch.arange(N), 3, 10)
    _randomize_seeds(state)
    for slot in arch.slots:
        state["slots", slot, "stage"] = torch.full((N,), int(S.BLENDING))
        state["slots", slot, "alpha"] = torch.tensor([0.3, 0.7, 1.0])
        state["slots", slot, "blueprint"] = torch.tensor([6, 2, 4])
    d = as_dicts(state)
    x = torch.randn(5, 3, 16, 16)
    rows = forward_eval(arch, d["host"], d["buffers"], d["seeds"], _controls(arch, state, lc), x)
    assert rows.shape == (4, N, 5, 10)
    for k, slot in enumerate(arch.slots):
        saved = state["slots", slot, "alpha"].clone()
        state["slots", slot, "alpha"] = torch.zeros(N)
        manual = forward_eval(arch, d["host"], d["buffers"], d["seeds"], _controls(arch, state, lc), x)[0]
        state["slots", slot, "alpha"] = saved
        torch.testing.assert_close(rows[1 + k], manual, rtol=1e-5, atol=1e-5)


def test_invalid_transitions_refused_per_env_without_touching_state() -> None:
    lc = Lifecycle(GateConfig(), "cpu")
    arch = _arch()
    state = init_state(arch, torch.arange(N), 3, 10)
    st = state["slots", "early"]
    st["stage"] = torch.tensor([int(S.DORMANT), int(S.TRAINING), int(S.FOSSILIZED)])
    before = st.clone()
    everyone = torch.ones(N, dtype=torch.bool)
    accepted = lc.germinate(st, everyone, torch.tensor([1, 1, 1]), torch.zeros(N, dtype=torch.long), 8, torch.zeros(N))
    assert accepted.tolist() == [True, False, False]
    for key in list(before.keys()):
        assert torch.equal(st[key][1:], before[key][1:]), key
    # Cull a FOSSILIZED seed: refused; cull the TRAINING one: accepted.
    accepted = lc.cull(st, torch.tensor([False, True, True]))
    assert accepted.tolist() == [False, True, False]
    assert st["stage"].tolist() == [int(S.GERMINATED), int(S.CULLED), int(S.FOSSILIZED)]
    # Out-of-range blueprint refused.
    st2 = state["slots", "mid"]
    assert not lc.germinate(st2, everyone, torch.tensor([99, -1, 8]), torch.zeros(N, dtype=torch.long), 8, torch.zeros(N)).any()
    assert (st2["stage"] == S.DORMANT).all()
    # Advance without a passing gate: refused.
    no_gates = torch.zeros(N, 6, dtype=torch.bool)
    assert not lc.advance(st, everyone, no_gates).any()


def test_failure_path_embargo_then_dormant() -> None:
    cfg = GateConfig(embargo_epochs=2)
    lc = Lifecycle(cfg, "cpu")
    state = init_state(_arch(1), torch.arange(1), 3, 10)
    st = state["slots", "late"]
    st["stage"] = torch.tensor([int(S.TRAINING)])
    assert lc.cull(st, torch.tensor([True])).all()
    seen = []
    for _ in range(5):
        lc.end_epoch(st)
        seen.append(SeedStage(int(st["stage"][0])).name)
    assert seen == ["EMBARGOED", "EMBARGOED", "RESETTING", "DORMANT", "DORMANT"]


def test_gates_report_reasons() -> None:
    cfg = GateConfig(min_training_epochs=2, fossilize_threshold=1.0)
    stage = torch.tensor([[int(S.TRAINING), int(S.TRAINING), int(S.PROBATIONARY), int(S.DORMANT)]])
    epochs = torch.tensor([[1, 3, 2, 0]])
    passes, reasons = evaluate_gates(
        cfg, stage, epochs, alpha=torch.zeros(1, 4),
        seed_grad_norm=torch.tensor([[1.0, float("nan"), 1.0, 0.0]]), host_grad_norm=torch.ones(1, 4),
        contribution=torch.tensor([[0.0, 0.0, 2.0, 0.0]]), acc_gain=torch.zeros(1, 4),
    )
    assert reasons[0, 0, 2] == GateReason.TOO_FEW_EPOCHS
    assert reasons[0, 1, 2] == GateReason.GRADIENT_UNHEALTHY
    assert passes[0, 2, 5] and reasons[0, 2, 5] == GateReason.PASSED
    assert passes[0, 3, 0] and not passes[0, 3, 2]
    assert reasons[0, 3, 2] == GateReason.WRONG_STAGE
