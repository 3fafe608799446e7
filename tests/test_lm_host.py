"""The transformer host family: batching, isolation, identity at germination, causality, compile."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from tensordict import TensorDict
from torch._dynamo.utils import counters

from esper.kasmina.blueprints import BLUEPRINTS, family_blueprints, get_blueprints
from esper.kasmina.epoch import KasminaConfig, MorphogeneticBatch
from esper.kasmina.gates import GateConfig
from esper.kasmina.hosts import host_spec
from esper.kasmina.model import Architecture, forward_eval, forward_train
from esper.kasmina.slots import Lifecycle
from esper.kasmina.state import as_dicts, init_state
from esper.kasmina.step import StepHyper, train_step
from esper.kasmina.transformer import env_major, to_grouped
from esper.leyline import Op, SeedStage
from esper.simic.config import TrainingConfig
from esper.simic.errors import ConfigError
from esper.tasks.grammar import make_grammar_task

S = SeedStage
LM = tuple(b for b in family_blueprints("lm") if b != "noop")  # mlp, head, block, lora
SEQ, VOCAB = 12, 115


@pytest.fixture(scope="module")
def task():
    return make_grammar_task(seed=3, seq_len=SEQ, train_size=64, val_size=32, test_size=32)


def _actions(op, slot, blueprint) -> TensorDict:
    n = len(op)
    return TensorDict({"op": torch.tensor(op), "slot": torch.tensor(slot), "blueprint": torch.tensor(blueprint),
                       "tempo": torch.zeros(n, dtype=torch.long)}, batch_size=[n])


def _arch(n: int) -> Architecture:
    return Architecture(host_spec("lm_small"), ("early", "mid", "late"), get_blueprints(None, family="lm"), n)


def _controls(arch: Architecture, state) -> dict:
    lc = Lifecycle(GateConfig(), "cpu")
    lr = torch.full((arch.n_envs,), 0.05)
    ctrl = {s: lc.controls(state["slots", s], 0.05, lr, len(arch.blueprints)) for s in arch.slots}
    ctrl["host"] = {"lr": lr}
    return ctrl


def _randomize_seeds(state) -> None:
    """Seeds start as exact identities; give them a real effect."""
    g = torch.Generator().manual_seed(0)
    for _, v in state["seeds"].items(include_nested=True, leaves_only=True):
        v.copy_(torch.randn(v.shape, generator=g) * 0.3)


def _tokens(n: int, b: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (n, b, SEQ), generator=g)
    return x, torch.randint(0, VOCAB, (n, b, SEQ), generator=g)


PLAN = [  # per epoch: ops, slots, blueprints (indices into noop, mlp, head, block, lora) of 4 envs
    ([Op.GERMINATE, Op.WAIT, Op.GERMINATE, Op.GERMINATE], [1, 0, 0, 2], [1, 0, 2, 3]),
    ([Op.WAIT, Op.GERMINATE, Op.ADVANCE, Op.WAIT], [0, 1, 0, 0], [0, 4, 0, 0]),
    ([Op.ADVANCE, Op.WAIT, Op.WAIT, Op.CULL], [1, 0, 0, 2], [0, 0, 0, 0]),
    ([Op.WAIT, Op.ADVANCE, Op.WAIT, Op.WAIT], [0, 1, 0, 0], [0, 0, 0, 0]),
]


def test_env_alone_equals_env_in_batch(task) -> None:
    """N=1 equals N=4 for the transformer host over several epochs with mixed lifecycles."""
    gates = GateConfig(min_training_epochs=0, grad_ratio_floor=0.0)
    cfg = partial(KasminaConfig, host="lm_small", batch_size=16, val_batch_size=32, gates=gates)
    batch = MorphogeneticBatch(task, 4, cfg(), base_seed=5)
    sigs = [batch.run_epoch(_actions(*[list(map(int, v)) for v in step]), test=True) for step in PLAN]
    stages = sigs[-1]["stage"]
    assert stages[0, 1] == S.BLENDING and stages[3, 2] == S.EMBARGOED and stages[1, 1] == S.BLENDING
    assert sigs[-1]["alpha"][0, 1] > 0
    assert sigs[-1]["params_added"][0] == BLUEPRINTS["mlp"].param_count(batch.arch.spec.d_model)
    for i in (0, 1, 3):
        alone = MorphogeneticBatch(task, 1, cfg(), base_seed=5, env_offset=i)
        for e, step in enumerate(PLAN):
            sig = alone.run_epoch(_actions(*[[int(v[i])] for v in step]), test=True)
            for key in ("train_loss", "val_loss", "test_loss", "val_acc_without"):
                torch.testing.assert_close(sig[key][0], sigs[e][key][i], rtol=1e-4, atol=1e-5)
            assert torch.equal(sig["stage"][0], sigs[e]["stage"][i])
        for key, value in alone.state["host"].items():
            torch.testing.assert_close(value[0], batch.state["host", key][i], rtol=1e-3, atol=1e-5)
        for key, value in alone.state["seeds"].items(include_nested=True, leaves_only=True):
            torch.testing.assert_close(value[0], batch.state["seeds"].get(key)[i], rtol=1e-3, atol=1e-5)


def test_scores_are_per_token(task) -> None:
    """Accuracy is next-token accuracy and loss the mean token cross-entropy (perplexity is
    its exp): checked against a direct computation from the host's logits."""
    batch = MorphogeneticBatch(task, 2, KasminaConfig(host="lm_small", batch_size=16, val_batch_size=8), base_seed=1)
    scores = batch.test()
    st = as_dicts(batch.state)
    logits = forward_eval(batch.arch, st["host"], st["buffers"], st["seeds"], batch.controls(), task.test_x,
                          counterfactuals=False)[0]  # [N, T, L, V]
    want_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), task.test_y.reshape(-1).repeat(2),
                                                  reduction="none").view(2, -1).mean(1)
    want_acc = 100.0 * (logits.argmax(-1) == task.test_y).float().mean(dim=(1, 2))
    torch.testing.assert_close(scores["test_loss"], want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores["test_acc"], want_acc)
    assert 1.0 < float(scores["test_loss"].exp().min()) <= VOCAB * 1.5  # an untrained host: near uniform


def test_host_gradients_identical_with_training_seeds() -> None:
    """Isolation: TRAINING seeds of every LM blueprint never change the host's update."""
    n = len(LM)
    arch = _arch(n)
    x, y = _tokens(n)
    results = []
    for with_seed in (False, True):
        state = init_state(arch, torch.arange(n), (SEQ,), VOCAB)
        _randomize_seeds(state)
        if with_seed:
            for k, slot in enumerate(arch.slots):
                st = state["slots", slot]
                st["stage"] = torch.full((n,), int(S.TRAINING))
                st["blueprint"] = torch.tensor([arch.blueprints.index(BLUEPRINTS[LM[(i + k) % n]]) for i in range(n)])
        d = as_dicts(state)
        out = train_step(arch, StepHyper(), d["host"], d["buffers"], d["seeds"], d["host_mom"], d["seed_mom"],
                         _controls(arch, state), x, y)
        results.append((state["host"].clone(), out))
    (host_a, out_a), (host_b, out_b) = results
    for key, value in host_a.items():
        assert torch.equal(value, host_b[key]), key
    assert torch.equal(out_a["loss"], out_b["loss"])
    assert (out_b["seed_grad_norm"] > 0).all(), "training seeds must receive gradient"
    assert (out_a["seed_grad_norm"] == 0).all()


@pytest.mark.parametrize("name", LM)
def test_lm_blueprint_is_identity_at_germination_and_learns(name: str) -> None:
    bp = BLUEPRINTS[name]
    n, d = 2, 16
    x = to_grouped(torch.randn(n, 3, SEQ, d))
    params = {k: v.clone().requires_grad_(True) for k, v in bp.init(torch.arange(n), d).items()}
    assert sum(p[0].numel() for p in params.values()) == bp.param_count(d)
    delta = bp.delta(params, x, n)
    assert delta.shape == x.shape and torch.equal(delta, torch.zeros_like(delta))
    probe = (bp.delta(params, x, n) * torch.randn_like(x)).sum()
    grads = torch.autograd.grad(probe, list(params.values()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name} cannot learn"


def test_germinated_seeds_leave_the_model_unchanged_and_blending_changes_it() -> None:
    n = 3
    arch = _arch(n)
    x, _ = _tokens(n)
    state = init_state(arch, torch.arange(n), (SEQ,), VOCAB)
    d = as_dicts(state)
    before, _ = forward_train(arch, d["host"], d["buffers"], d["seeds"], _controls(arch, state), x)
    for k, slot in enumerate(arch.slots):
        st = state["slots", slot]
        st["stage"] = torch.full((n,), int(S.BLENDING))
        st["alpha"] = torch.full((n,), 0.5)
        st["blueprint"] = torch.tensor([arch.blueprints.index(BLUEPRINTS[LM[(i + k) % len(LM)]]) for i in range(n)])
    fresh, _ = forward_train(arch, d["host"], d["buffers"], d["seeds"], _controls(arch, state), x)
    torch.testing.assert_close(fresh, before, rtol=0, atol=0)  # zero-initialized outputs: exact identity
    _randomize_seeds(state)
    grown, _ = forward_train(arch, d["host"], d["buffers"], d["seeds"], _controls(arch, state), x)
    assert (grown - before).abs().amax() > 1e-3


def test_no_position_reads_a_later_token() -> None:
    """Causality through host and every seed: changing token t changes no logit before t."""
    n = 2
    arch = _arch(n)
    state = init_state(arch, torch.arange(n), (SEQ,), VOCAB)
    _randomize_seeds(state)
    for k, slot in enumerate(arch.slots):
        st = state["slots", slot]
        st["stage"] = torch.full((n,), int(S.BLENDING))
        st["alpha"] = torch.full((n,), 1.0)
        st["blueprint"] = torch.tensor([arch.blueprints.index(BLUEPRINTS[LM[(i + k) % len(LM)]]) for i in range(n)])
    d = as_dicts(state)
    x, _ = _tokens(n)
    t = 7
    y = x.clone()
    y[:, :, t] = (y[:, :, t] + 1) % VOCAB
    a, _ = forward_train(arch, d["host"], d["buffers"], d["seeds"], _controls(arch, state), x)
    b, _ = forward_train(arch, d["host"], d["buffers"], d["seeds"], _controls(arch, state), y)
    torch.testing.assert_close(a[:, :, :t], b[:, :, :t], rtol=0, atol=1e-6)
    assert (a[:, :, t:] - b[:, :, t:]).abs().amax() > 1e-4


def test_layout_round_trip() -> None:
    t = torch.randn(3, 2, 5, 4)
    g = to_grouped(t)
    assert g.shape == (2, 12, 5, 1)
    assert torch.equal(env_major(g, 3), t)


def test_hosts_and_blueprints_must_fit_the_task() -> None:
    with pytest.raises(ConfigError, match=r"kasmina.host 'shallow' cannot run task 'grammar'.*lm_small"):
        TrainingConfig.from_dict({"task": {"name": "grammar"}}).check_host()
    with pytest.raises(ConfigError, match=r"cannot run task 'synthetic'"):
        TrainingConfig.from_dict({"kasmina": {"host": "lm_small"}}).check_host()
    with pytest.raises(ValueError, match=r"host 'shallow' is a cnn host; task 'grammar' needs a lm host"):
        MorphogeneticBatch(make_grammar_task(seq_len=4, train_size=4, val_size=4, test_size=4), 1,
                           KasminaConfig(host="shallow"))
    with pytest.raises(ConfigError, match=r"blueprints \['conv_light'\] do not fit host 'lm_small'.*'mlp'"):
        TrainingConfig.from_dict({"task": {"name": "grammar"}, "kasmina": {"host": "lm_small",
                                                                         "blueprints": ["conv_light"]}})
    with pytest.raises(ValueError, match=r"do not fit a cnn host"):
        get_blueprints(["mlp"], family="cnn")
    assert get_blueprints(None, family="lm")[0].name == "noop"


@pytest.mark.slow  # a cold compile: minutes on a 2-core CPU (CI runs the slow tests after the default ones)
@pytest.mark.compile
def test_compiled_transformer_matches_eager_with_one_graph(task) -> None:
    """Compiled fullgraph, group-by-blueprint, AdamW: one training graph (and one validation
    graph) through germinations, advances and a cull (group sizes change every epoch, step counts
    every step), and it trains and scores as the eager engine does."""
    gates = GateConfig(min_training_epochs=0, grad_ratio_floor=0.0)
    # AdamW, as the lm preset trains: its per-step counts ride in the controls, not the graph.
    make = partial(KasminaConfig, host="lm_small", batch_size=16, val_batch_size=32, gates=gates,
                   step=StepHyper(host_lr=0.003, optimizer="adamw", weight_decay=0.01), seed_lr=0.0015)
    torch._dynamo.reset()
    counters.clear()
    compiled = MorphogeneticBatch(task, 4, make(compile=True), base_seed=2)
    eager = MorphogeneticBatch(task, 4, make(compile=False), base_seed=2)
    for step in PLAN:
        acts = _actions(*[list(map(int, v)) for v in step])
        got, want = compiled.run_epoch(acts), eager.run_epoch(acts.clone())
        for b, sig in ((compiled, got), (eager, want)):
            b.set_plan(sig["stage"].numpy(), sig["blueprint"].numpy(), sig["germinated"].numpy())
        torch.testing.assert_close(got["train_loss"], want["train_loss"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["val_loss"], want["val_loss"], rtol=1e-4, atol=1e-5)
        assert torch.equal(got["stage"], want["stage"])
    assert counters["stats"]["unique_graphs"] == 2 and compiled.compile_graphs == 2  # step, validation
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_adamw_step_matches_torch_adamw() -> None:
    """The batched AdamW (per-env lr and step count, bias-corrected) is torch.optim.AdamW's
    update for each env, over three steps with gradient clipping off."""
    n = 2
    arch = _arch(n)
    hp = StepHyper(host_lr=0.01, momentum=0.9, beta2=0.99, weight_decay=0.1, max_grad_norm=1e9, optimizer="adamw")
    state = init_state(arch, torch.arange(n), (SEQ,), VOCAB, second_moments=True)
    ref = {k: v[1].clone().requires_grad_(True) for k, v in state["host"].items()}
    opt = torch.optim.AdamW(list(ref.values()), lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    x, y = _tokens(n)
    d = as_dicts(state)
    for t in range(1, 4):
        ctrl = _controls(arch, state)
        ctrl["host"] = {"lr": torch.full((n,), 0.01), "t": torch.full((n,), float(t))}
        before = {k: v.clone() for k, v in d["host"].items()}
        train_step(arch, hp, d["host"], d["buffers"], d["seeds"], d["host_mom"], d["seed_mom"], ctrl, x, y,
                   host_sq=d["host_sq"], seed_sq=d["seed_sq"])
        # The reference sees env 1's gradient at the same point.
        one = Architecture(arch.spec, arch.slots, arch.blueprints, 1)
        sub = init_state(one, torch.arange(1, 2), (SEQ,), VOCAB)
        params = {k: v[1:2].clone().requires_grad_(True) for k, v in before.items()}
        logits, _ = forward_train(one, params, {}, as_dicts(sub)["seeds"], _controls(one, sub), x[1:2])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y[1:2].reshape(-1))
        grads = torch.autograd.grad(loss, list(params.values()))
        opt.zero_grad()
        for p, g in zip(ref.values(), grads, strict=True):
            p.grad = g[0]
        opt.step()
        for k, p in ref.items():
            torch.testing.assert_close(d["host"][k][1], p.detach(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="optimizer 'adam' is not one of: sgd, adamw"):
        StepHyper(optimizer="adam")


def test_loss_contribution_is_the_loss_a_seed_removes(task) -> None:
    """``contribution: loss``: each blended seed's contribution is the percent of the validation
    loss without it that it removes, the without-loss computed here by a separate forward with
    that slot's alpha set to 0 (no counterfactual rows); unblended slots contribute 0."""
    gates = GateConfig(min_training_epochs=0, grad_ratio_floor=0.0)
    mb = MorphogeneticBatch(task, 4, KasminaConfig(host="lm_small", batch_size=16, val_batch_size=32,
                                                   gates=gates, contribution="loss"), base_seed=2)
    for step in PLAN:
        sig = mb.run_epoch(_actions(*[list(map(int, v)) for v in step]))
    blended = sig["alpha"] > 0
    assert blended.sum() >= 2, sig["alpha"]
    st = as_dicts(mb.state)
    x, y = mb.task.prepare(mb.task.val_x), mb.task.val_y
    for k, slot in enumerate(mb.arch.slots):
        ctrl = mb.controls()
        ctrl[slot] = {**ctrl[slot], "alpha": torch.zeros_like(ctrl[slot]["alpha"])}
        with torch.no_grad():
            logits = forward_eval(mb.arch, st["host"], st["buffers"], st["seeds"], ctrl, x, counterfactuals=False)[0]
        without = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), y.reshape(-1).repeat(mb.n), reduction="none").view(mb.n, -1).mean(1)
        want = torch.where(blended[:, k], 100.0 * (without - sig["val_loss"]) / without, 0.0)
        torch.testing.assert_close(sig["contribution"][:, k], want, rtol=1e-4, atol=1e-4)
    assert (sig["contribution"][blended] != 0).all()


def test_unknown_contribution_is_refused(task) -> None:
    with pytest.raises(ValueError, match="unknown contribution 'perplexity'; allowed: 'accuracy', 'loss'"):
        MorphogeneticBatch(task, 1, KasminaConfig(host="lm_small", contribution="perplexity"))
    with pytest.raises(ConfigError, match="contribution"):
        TrainingConfig.from_dict({"kasmina": {"contribution": "perplexity"}})
