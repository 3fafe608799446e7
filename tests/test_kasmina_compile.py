"""The compiled epoch: one training-step graph and one validation graph, no breaks, no
recompiles across lifecycle changes, plan changes (group-by-blueprint), capture escalations or
episode boundaries."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from tensordict import TensorDict
from tiny_config import TINY
from torch._dynamo.utils import counters
from torch.fx.experimental.proxy_tensor import make_fx

from esper.kasmina.epoch import KasminaConfig, MorphogeneticBatch
from esper.kasmina.gates import GateConfig
from esper.kasmina.model import forward_eval, forward_train
from esper.kasmina.state import as_dicts
from esper.kasmina.step import train_step
from esper.leyline import EventKind, Op, SeedStage
from esper.leyline.events import AnomalyEvent
from esper.nissa import load_profile
from esper.simic.config import TrainingConfig
from esper.simic.env import MorphogeneticEnv
from esper.simic.runner import EpisodeRunner
from esper.tamiyo.policies import make_policy
from esper.tasks import load_task
from esper_kernels._triton import force_op_on_cpu

S = SeedStage
BLUEPRINTS = ("noop", "attention", "depthwise", "conv_light")


def _actions(op: list[int], slot: list[int], blueprint: list[int]) -> TensorDict:
    n = len(op)
    return TensorDict(
        {"op": torch.tensor(op), "slot": torch.tensor(slot), "blueprint": torch.tensor(blueprint),
         "tempo": torch.zeros(n, dtype=torch.long)},
        batch_size=[n],
    )


PLAN = [  # (op, slot, blueprint) per env, one row per epoch
    ([Op.GERMINATE, Op.GERMINATE, Op.GERMINATE, Op.GERMINATE, Op.WAIT], [0, 0, 0, 2, 0], [2, 2, 2, 3, 0]),
    ([Op.ADVANCE, Op.WAIT, Op.WAIT, Op.ADVANCE, Op.GERMINATE], [0, 0, 0, 2, 1], [0, 0, 0, 0, 1]),
    ([Op.WAIT, Op.CULL, Op.ADVANCE, Op.WAIT, Op.WAIT], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]),
    ([Op.WAIT, Op.GERMINATE, Op.WAIT, Op.WAIT, Op.ADVANCE], [0, 2, 0, 0, 1], [0, 3, 0, 0, 0]),
    ([Op.WAIT] * 5, [0] * 5, [0] * 5),
]


def _plan_from(batch: MorphogeneticBatch, signals: TensorDict) -> None:
    """What the runner does after each epoch's transfer: plan the next from the snapshot."""
    batch.set_plan(signals["stage"].numpy(), signals["blueprint"].numpy(), signals["germinated"].numpy())


@pytest.mark.slow  # a cold compile: minutes on a 2-core CPU (CI runs the slow tests after the default ones)
@pytest.mark.compile
def test_compiled_plan_matches_eager_with_one_graph_each() -> None:
    """The compiled group-by-blueprint step trains exactly like the eager masked engine (every
    blueprint for every env) and the eager plan, through germinations, advances, a cull and a
    capture escalation, while the groups change size every epoch; validation (counterfactual rows
    included) scores alike. One training graph and one validation graph, each compiled once."""
    task = load_task("synthetic", train_size=128, val_size=64, seed=5)
    gates = GateConfig(min_training_epochs=0, grad_ratio_floor=0.0)
    make = partial(KasminaConfig, batch_size=64, val_batch_size=64, blueprints=BLUEPRINTS, gates=gates)
    torch._dynamo.reset()
    counters.clear()
    compiled = MorphogeneticBatch(task, 5, make(compile=True), base_seed=1)
    masked = MorphogeneticBatch(task, 5, make(compile=False), base_seed=1)
    planned = MorphogeneticBatch(task, 5, make(compile=False), base_seed=1)
    sizes = []
    for e, step in enumerate(PLAN):
        capture = frozenset({"grads"}) if e == 3 else frozenset()
        got = compiled.run_epoch(_actions(*step), capture=capture)
        want = masked.run_epoch(_actions(*step), capture=capture)
        other = planned.run_epoch(_actions(*step))
        if e == 0:
            assert counters["stats"]["unique_graphs"] == 2  # the training step and validation
        for sig in (want, other):
            torch.testing.assert_close(got["train_loss"], sig["train_loss"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["val_acc"], sig["val_acc"], rtol=0, atol=1e-4)
            torch.testing.assert_close(got["val_acc_without"], sig["val_acc_without"], rtol=0, atol=1e-4)
            torch.testing.assert_close(got["val_loss"], sig["val_loss"], rtol=1e-5, atol=1e-6)
            assert torch.equal(got["stage"], sig["stage"])
        if e == 3:
            for key, value in want["captured"].items():
                torch.testing.assert_close(got["captured", key], value, rtol=1e-4, atol=1e-6)
        _plan_from(compiled, got)
        _plan_from(planned, other)
        sizes.append(sorted(int(envs.shape[0]) for g in compiled._plans.values() for envs, _ in g.values()))
    # Stages and group sizes changed (the first epoch ran every env in every group); the graph did not.
    assert got["stage"].tolist() == [
        [S.PROBATIONARY, S.DORMANT, S.DORMANT], [S.EMBARGOED, S.DORMANT, S.TRAINING],
        [S.SHADOWING, S.DORMANT, S.DORMANT], [S.DORMANT, S.DORMANT, S.PROBATIONARY],
        [S.DORMANT, S.BLENDING, S.DORMANT],
    ]
    assert {2, 3} <= {k for x in sizes for k in x} and len({tuple(x) for x in sizes}) > 1
    assert counters["stats"]["unique_graphs"] == 2 and compiled.compile_graphs == 2
    assert compiled.compile_seconds > 0
    assert not counters["graph_break"], dict(counters["graph_break"])
    for key, value in compiled.state["host"].items():
        torch.testing.assert_close(value, masked.state["host", key], rtol=1e-4, atol=1e-6)
    names = compiled.blueprint_names
    for k, slot in enumerate(compiled.arch.slots):
        for i in range(5):
            if int(got["stage"][i, k]) in (S.TRAINING, S.BLENDING, S.SHADOWING):
                for key, value in compiled.state["seeds", slot, names[int(got["blueprint"][i, k])]].items():
                    want_seed = masked.state["seeds", slot, names[int(got["blueprint"][i, k])], key][i]
                    torch.testing.assert_close(value[i], want_seed, rtol=1e-4, atol=1e-6)


def test_kernel_ops_are_in_the_traced_training_step() -> None:
    """Wiring: the step's traced graph calls esper::grad_stats; the forward calls esper::blend."""
    task = load_task("synthetic", train_size=64, val_size=16, seed=5)
    batch = MorphogeneticBatch(task, 2, KasminaConfig(batch_size=32, blueprints=BLUEPRINTS))
    targets: list[str] = []

    def record(gm: torch.fx.GraphModule, _inputs: list) -> object:
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    st = as_dicts(batch.state)
    x, y = next(iter(batch.sampler.epoch(batch.keys, batch.epoch)))
    step = torch.compile(partial(train_step, batch.arch, batch.cfg.step), backend=record, fullgraph=True)
    step(st["host"], st["buffers"], st["seeds"], st["host_mom"], st["seed_mom"], batch.controls(), x, y)
    assert any("esper.grad_stats" in t for t in targets), "grad_stats op missing from the step"

    # Eager blend takes the esper::blend op wherever a kernel runs (CUDA); force it on the CPU.
    with force_op_on_cpu(), torch.no_grad():
        gm = make_fx(partial(forward_eval, batch.arch))(
            st["host"], st["buffers"], st["seeds"], batch.controls(), task.prepare(task.val_x[:8])
        )
    assert any("esper.blend" in str(node.target) for node in gm.graph.nodes), "blend op missing"


@pytest.mark.slow  # two 30-epoch episodes after a cold compile: minutes on a 2-core CPU (CI runs it)
@pytest.mark.compile
def test_heuristic_episodes_compile_nothing_after_warm_up() -> None:
    """A compiled run: after its first epoch (the warm-up), two 30-epoch heuristic episodes,
    with the seeds' lifecycle, a telemetry escalation (minimal -> standard: the step captures
    host gradients) and an episode boundary, compile nothing."""
    cfg = TrainingConfig.from_dict(TINY).updated(
        compile=True,
        task={"train_size": 64, "val_size": 32, "test_size": 32, "image_size": 8},
        kasmina={"batch_size": 32, "val_batch_size": 32},
        episode={"envs": 3, "length": 30},
    )
    env = MorphogeneticEnv(cfg)
    runner = EpisodeRunner(env, make_policy("heuristic", env, cfg), profile=load_profile("minimal"))
    tel = env.pipeline.telemetry
    check, begin = tel.monitor.check_epoch, tel.begin_epoch
    forced = AnomalyEvent(kind=EventKind.ANOMALY, epoch=10, detector="test", severity="severe", message="forced",
                          payload={"escalate": True})
    tel.monitor.check_epoch = lambda diag, epoch: check(diag, epoch) + ([forced] if epoch == 10 else [])
    captures: list[frozenset[str]] = []

    def spy(epoch: int) -> frozenset[str]:
        captures.append(begin(epoch))
        return captures[-1]

    tel.begin_epoch = spy
    graphs: list[int] = []
    env.pipeline.callbacks.append(lambda step, snap: graphs.append(counters["stats"]["unique_graphs"]))
    torch._dynamo.reset()
    counters.clear()
    summaries = runner.run(2)
    assert len(graphs) == 60 and graphs[0] == 2  # the training step and validation
    assert graphs[-1] == graphs[0], f"recompiled after the warm-up: {graphs}"
    assert env.kasmina.compile_graphs == 2
    escalated = [i for i, c in enumerate(captures) if c == {"grads"}]
    assert escalated == [10, 11, 40, 41], captures  # epoch 10 of each episode escalates the next 2
    assert sum(s.germinated for s in summaries) >= 2 and len(summaries) == 6
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("n", [1, 4])
def test_padded_group_plan_matches_masked_forward(n: int) -> None:
    """The compiled plan's layout, run eagerly: every non-identity group present with at least
    two rows (padding rows repeat the one env when N is 1), the padding masked out, so train and
    validation logits equal the masked layout's (every blueprint for every env)."""
    task = load_task("synthetic", train_size=64, val_size=16, seed=5)
    batch = MorphogeneticBatch(task, n, KasminaConfig(batch_size=32, blueprints=BLUEPRINTS, compile=True))
    names = batch.blueprint_names
    for k, slot in enumerate(batch.arch.slots):  # env i holds blueprint 1 + (i + k) % 3, blending
        st = batch.state["slots", slot]
        st["stage"] = torch.full((n,), int(S.BLENDING))
        st["blueprint"] = 1 + (torch.arange(n) + k) % 3
        st["alpha"] = torch.full((n,), 0.5)
        for bp in names[1:]:  # nonzero output paths, so every delta is nonzero
            for v in batch.state["seeds", slot, bp].values():
                v.add_(0.1 * torch.randn_like(v))
    stage = batch._stacked("stage").numpy()
    blueprint = batch._stacked("blueprint").numpy()
    batch.set_plan(stage, blueprint)
    plans = batch._plans
    for k, slot in enumerate(batch.arch.slots):
        assert set(plans[slot]) == set(names[1:])  # the identity never runs; the others always
        for b, bp in enumerate(names[1:], start=1):
            envs, valid = plans[slot][bp]
            members = [i for i in range(n) if blueprint[i, k] == b]
            assert envs.shape[0] == max(len(members), 2)
            assert sorted(envs[valid].tolist()) == members
    st = as_dicts(batch.state)
    ctrl = batch.controls()
    x, _ = next(iter(batch.sampler.epoch(batch.keys, batch.epoch)))
    for plan in (plans, batch._eval_plans):
        with torch.no_grad():
            got = forward_eval(batch.arch, st["host"], st["buffers"], st["seeds"], ctrl, task.prepare(task.val_x), plan)
            want = forward_eval(batch.arch, st["host"], st["buffers"], st["seeds"], ctrl, task.prepare(task.val_x))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert (got[0] - got[1]).abs().max() > 1e-3  # the seeds count
            got_train = forward_train(batch.arch, st["host"], st["buffers"], st["seeds"], ctrl, x, plans=plan)[0]
            want_train = forward_train(batch.arch, st["host"], st["buffers"], st["seeds"], ctrl, x)[0]
            torch.testing.assert_close(got_train, want_train, rtol=1e-5, atol=1e-5)
