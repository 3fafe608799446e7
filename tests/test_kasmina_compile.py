"""The compiled training step: one graph, no breaks, no recompiles across lifecycle changes."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from tensordict import TensorDict
from torch._dynamo.utils import counters
from torch.fx.experimental.proxy_tensor import make_fx

from esper.kasmina.epoch import KasminaConfig, MorphogeneticBatch
from esper.kasmina.gates import GateConfig
from esper.kasmina.model import forward_eval
from esper.kasmina.state import as_dicts
from esper.kasmina.step import train_step
from esper.leyline import Op, SeedStage
from esper.tasks import load_task
from esper_kernels._triton import force_op_on_cpu

S = SeedStage
BLUEPRINTS = ("noop", "attention", "conv_light")


def _actions(op: list[int], slot: list[int], blueprint: list[int]) -> TensorDict:
    n = len(op)
    return TensorDict(
        {"op": torch.tensor(op), "slot": torch.tensor(slot), "blueprint": torch.tensor(blueprint),
         "tempo": torch.zeros(n, dtype=torch.long)},
        batch_size=[n],
    )


PLAN = [
    ([Op.GERMINATE, Op.GERMINATE], [0, 1], [2, 1]),
    ([Op.ADVANCE, Op.WAIT], [0, 0], [0, 0]),
    ([Op.WAIT, Op.CULL], [0, 1], [0, 0]),
    ([Op.WAIT, Op.GERMINATE], [0, 2], [0, 2]),
]


@pytest.mark.compile
def test_compiled_epochs_match_eager_without_recompiles() -> None:
    task = load_task("synthetic", train_size=128, val_size=64, seed=5)
    gates = GateConfig(min_training_epochs=0, grad_ratio_floor=0.0)
    make = partial(KasminaConfig, batch_size=64, val_batch_size=64, blueprints=BLUEPRINTS, gates=gates)
    torch._dynamo.reset()
    counters.clear()
    compiled = MorphogeneticBatch(task, 2, make(compile=True), base_seed=1)
    eager = MorphogeneticBatch(task, 2, make(compile=False), base_seed=1)
    graphs_after_first = None
    for e, (op, slot, bp) in enumerate(PLAN):
        got = compiled.run_epoch(_actions(op, slot, bp))
        want = eager.run_epoch(_actions(op, slot, bp))
        if e == 0:
            graphs_after_first = counters["stats"]["unique_graphs"]
        torch.testing.assert_close(got["train_loss"], want["train_loss"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["val_acc"], want["val_acc"], rtol=0, atol=2.0)
        assert torch.equal(got["stage"], want["stage"])
    # Stages, alphas and blueprints changed every epoch; the graph count did not.
    assert got["stage"][0, 0] == S.SHADOWING and got["stage"][1, 1] == S.EMBARGOED
    assert graphs_after_first == 1
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"], dict(counters["graph_break"])


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
