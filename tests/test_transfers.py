"""Issue 14 item 4: inside the epoch loop nothing goes host-to-device.

Every tensor made from host data inside the loop is an upload on CUDA, a synchronous copy
that the one-sync-per-epoch audit (a device-to-host count) does not see. The method and its
limits are in ``tests/upload_audit.py``: on the CPU it counts tensors made from host data
(``aten.lift_fresh``) and copies across devices; on CUDA a test runs the loop under
``torch.cuda.set_sync_debug_mode("error")``. Constants live on the device (made once, cached
per device), RNG stream ids combine as Python ints, and seeds are re-initialized only for the
germinations the epoch's snapshot names (the group-by-blueprint plan is gathered on the
device too: the snapshot only sizes its groups).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from tiny_config import TINY
from upload_audit import UploadAudit

import esper.kasmina.seed_ops as seed_ops_module
from esper import rng
from esper.kasmina.epoch import KasminaConfig, MorphogeneticBatch
from esper.kasmina.state import init_seeds
from esper.leyline import Op
from esper.nissa import load_profile
from esper.simic.config import TrainingConfig
from esper.simic.env import MorphogeneticEnv
from esper.simic.runner import EpisodeRunner
from esper.tamiyo.policies import make_policy
from esper.tasks import load_task


def _cfg(device: str = "cpu") -> TrainingConfig:
    return TrainingConfig.from_dict(TINY).updated(
        device=device, episode={"envs": 3, "length": 4}, kasmina={"val_batch_size": 128}
    )


# ----------------------------------------------------------------------------- the method
def test_audit_counts_tensors_made_from_host_data() -> None:
    x = torch.zeros(4)
    with UploadAudit() as audit:
        torch.tensor([1.0, 2.0])
        torch.as_tensor(3)
        torch.as_tensor(np.arange(2))
        torch.from_numpy(np.ones(2))
        x[[0, 1]] = 1.0  # the list index is made from host data (the scalar value is not)
    assert [u.kind for u in audit.uploads] == ["host_data"] * 5
    assert [u.shape for u in audit.uploads] == [(2,), (), (2,), (2,), (2,)]


def test_audit_ignores_scalars_that_are_kernel_arguments() -> None:
    x = torch.zeros(4)
    with UploadAudit() as audit:
        y = x + 3
        torch.where(y > 0, y, 0.0)
        torch.full((2,), 7.0)
        x[0] = 5.0  # a Python scalar assigned by indexing: ``fill_`` on CUDA, no copy
        x[1:] = True
    assert audit.uploads == []


def test_audit_names_the_call_site_and_honours_exemptions() -> None:
    from esper.leyline import LIVE_STAGES, stage_mask

    with UploadAudit() as audit:
        stage_mask(LIVE_STAGES)  # a constant made from a Python list: fine once, not per epoch
    assert [u.site for u in audit.uploads] == ["esper/leyline/stages.py:stage_mask"]
    with UploadAudit(exempt=("esper/leyline/stages.py:stage_mask",)) as audit:
        stage_mask(LIVE_STAGES)
    assert audit.uploads == []


# ----------------------------------------------------------------------------- the fixes
def test_stream_ids_combine_as_python_ints() -> None:
    """An int stream id reaches the kernel as a scalar; the keys equal the tensor-id path's."""
    keys = torch.tensor([0, 1, -5, 2**62, -(2**63)])
    with UploadAudit() as audit:
        got = rng.stream_key(keys, 0x7A5C, 3, 2**63 - 1)
    assert audit.uploads == []
    ids = (torch.tensor(0x7A5C), torch.tensor(3), torch.tensor(2**63 - 1))
    assert torch.equal(got, rng.stream_key(keys, *ids))


def _batch(task, n: int = 3) -> MorphogeneticBatch:
    return MorphogeneticBatch(task, n, KasminaConfig(host="shallow", batch_size=32, val_batch_size=64), base_seed=4)


def _act(n: int, op: Op, env: int = -1, slot: int = 0, bp: int = 0) -> TensorDict:
    """``op`` for env ``env`` (all envs when -1), WAIT for the others."""
    ops = torch.full((n,), int(Op.WAIT))
    ops[slice(None) if env < 0 else env] = int(op)
    return TensorDict(
        {"op": ops, "slot": torch.full((n,), slot), "blueprint": torch.full((n,), bp),
         "tempo": torch.zeros(n, dtype=torch.long)},
        batch_size=[n],
    )  # fmt: skip


@pytest.fixture(scope="module")
def task():
    return load_task("synthetic", train_size=64, val_size=64, test_size=64, image_size=8, seed=2)


def test_seeds_are_initialized_only_for_the_snapshots_germinations(task, monkeypatch) -> None:
    mb = _batch(task)
    calls: list[tuple[str, object]] = []

    def counted(arch, keys, slot, germination, only=None):
        calls.append((slot, only))
        return init_seeds(arch, keys, slot, germination, only)

    monkeypatch.setattr(seed_ops_module, "init_seeds", counted)
    for _ in range(2):  # as the pipeline drives it: each epoch, then its snapshot's germinations
        sig = mb.run_epoch(_act(3, Op.WAIT))
        mb.reinit_germinated(sig["germinated"].numpy(), sig["blueprint"].numpy())
    assert calls == []  # epochs without a germination make no seed at all

    slot, bp = mb.arch.slots[1], 2
    before = mb.state.clone()
    sig = mb.run_epoch(_act(3, Op.GERMINATE, env=1, slot=1, bp=bp))
    assert sig["germinated"].tolist() == [[False, False, False], [False, True, False], [False, False, False]]
    trained = mb.state.clone()
    mb.reinit_germinated(sig["germinated"].numpy(), sig["blueprint"].numpy())
    assert calls == [(slot, (bp,))]  # one slot, one blueprint
    name = mb.blueprint_names[bp]
    want = init_seeds(mb.arch, mb.keys, slot, mb.state["slots", slot, "germinations"], (bp,))[name]
    for key, value in mb.state["seeds", slot, name].items():
        assert torch.equal(value[1], want[key][1]), key  # germinated env: fresh
        assert torch.equal(mb.state["seed_mom", slot, name, key][1], torch.zeros_like(value[1]))
        assert torch.equal(value[[0, 2]], trained["seeds", slot, name, key][[0, 2]]), key  # others untouched
    fresh = mb.state["seeds", slot, name]
    assert any(not torch.equal(v[1], before["seeds", slot, name, k][1]) for k, v in fresh.items())


def test_snapshot_reinit_equals_the_masked_fallback(task) -> None:
    """Without a snapshot the next epoch re-initializes masked; the germinated seed is the same."""
    listed, masked = _batch(task), _batch(task)
    action = _act(3, Op.GERMINATE, env=2, slot=0, bp=3)
    sig = listed.run_epoch(action)
    masked.run_epoch(action.clone())
    listed.reinit_germinated(sig["germinated"].numpy(), sig["blueprint"].numpy())
    masked._reinit_pending()
    slot, name = listed.arch.slots[0], listed.blueprint_names[3]
    for part in ("seeds", "seed_mom"):
        for key, value in listed.state[part, slot, name].items():
            assert torch.equal(value, masked.state[part, slot, name, key]), (part, key)
    assert listed._pending is None and masked._pending is None


# ----------------------------------------------------------------------------- the loop
def test_heuristic_episodes_upload_nothing() -> None:
    """Two heuristic episodes (germinations, an episode boundary, the research profile's
    diagnostics, the group-by-blueprint plan) through the real env and torchrl's Collector make
    no tensor from host data and no cross-device copy; the materialize (the download) is exempt."""
    cfg = _cfg()
    env = MorphogeneticEnv(cfg)
    runner = EpisodeRunner(env, make_policy("heuristic", env, cfg), profile=load_profile("research"))
    runner.run(1)  # warm-up: lazy per-device constants are made once, outside the loop
    with UploadAudit() as audit:
        summaries = runner.run(2)
    assert sum(s.germinated for s in summaries) > 0  # the re-initialization path ran
    assert audit.uploads == [], audit.sites


def test_ppo_collection_uploads_nothing() -> None:
    """The LSTM policy's epochs too (its action distribution's constants are made once)."""
    from esper.simic.ppo import PPOTrainer
    from esper.simic.ppo_round import collect

    cfg = _cfg().updated(ppo={"minibatch_envs": 3, "epochs": 1, "hidden_size": 16, "lstm_hidden_size": 16})
    trainer = PPOTrainer(cfg)
    collect(trainer)
    with UploadAudit() as audit:
        batch = collect(trainer)
    assert batch.batch_size == torch.Size([cfg.episode.envs, cfg.episode.length])
    assert audit.uploads == [], audit.sites


def _in_sync_debug_mode(mode: str | int, fn: Callable[..., Any], armed: list[bool]) -> Callable[..., Any]:
    """``fn`` run under ``torch.cuda.set_sync_debug_mode(mode)`` while ``armed[0]``."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(mode if armed[0] else previous)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    return call


@pytest.mark.cuda
def test_cuda_epochs_run_under_sync_debug_error(monkeypatch) -> None:
    """On CUDA every epoch (the env's step and resets, the controller's decisions) runs with
    ``set_sync_debug_mode("error")``: any upload, download or sync raises, except in the one
    materialize. torchrl's collector around them is covered on the CPU by the audits above."""
    import esper.simic.pipeline as pipeline

    cfg = _cfg("cuda")
    env = MorphogeneticEnv(cfg)
    armed = [False]
    policy = _in_sync_debug_mode("error", make_policy("heuristic", env, cfg), armed)
    runner = EpisodeRunner(env, policy, profile=load_profile("research"))
    monkeypatch.setattr(pipeline, "materialize", _in_sync_debug_mode(0, pipeline.materialize, armed))
    monkeypatch.setattr(env, "_step", _in_sync_debug_mode("error", env._step, armed))
    monkeypatch.setattr(env, "_reset", _in_sync_debug_mode("error", env._reset, armed))
    runner.run(1)  # warm-up: lazy per-device constants are made once, outside the loop
    armed[0] = True
    summaries = runner.run(2)
    assert env.kasmina.device.type == "cuda"
    assert len(summaries) == 2 * cfg.episode.envs
    assert sum(s.germinated for s in summaries) > 0
