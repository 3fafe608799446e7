"""N morphogenetic host runs trained as one tensor program, one epoch per call.

``MorphogeneticBatch.run_epoch(actions)`` applies the controller's lifecycle actions, trains
every env for one epoch on its own minibatches, validates with counterfactuals and returns a
TensorDict of per-env signals. Everything stays on the device: no host sync in here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from tensordict import TensorDict
from torch._dynamo.utils import counters

from esper import rng
from esper.kasmina.blueprints import get_blueprints
from esper.kasmina.gates import GateConfig
from esper.kasmina.hosts import host_spec
from esper.kasmina.model import Architecture, Plans
from esper.kasmina.scoring import Scoring, score_val_batch
from esper.kasmina.seed_ops import SeedOps
from esper.kasmina.slots import Lifecycle
from esper.kasmina.state import as_dicts, init_state
from esper.kasmina.step import StepHyper, train_step
from esper.leyline import (
    CANONICAL_SLOTS,
    COMPUTING_STAGES,
    AlphaSchedule,
    GateId,
    SeedStage,
    ordered_slots,
    stage_mask,
)
from esper.nissa.profiling import phase
from esper.tasks import EnvBatchSampler, TaskData

S = SeedStage
TRAIN_CAPTURE = frozenset({"grads", "activations"})
CAPTURES = TRAIN_CAPTURE | {"logits"}


@dataclass
class KasminaConfig:
    """What the batched hosts are: architecture, blueprint set, optimizer, gates."""

    host: str = "impaired"
    slots: tuple[str, ...] = CANONICAL_SLOTS
    blueprints: tuple[str, ...] | None = None
    batch_size: int = 128
    val_batch_size: int = 512
    seed_lr: float = 0.05
    step: StepHyper = field(default_factory=StepHyper)
    gates: GateConfig = field(default_factory=GateConfig)
    alpha_schedule: AlphaSchedule | str = AlphaSchedule.LINEAR  # blending ramp (enum or its name)
    compile: bool = False
    compile_mode: str | None = None
    lr_horizon: int = 0  # epochs of cosine host-lr decay per episode; 0: constant
    lr_min_frac: float = 0.05
    # What a seed's counterfactual contribution measures: accuracy points it adds, or the
    # percent of the validation loss without it that it removes (finer for language models).
    contribution: str = "accuracy"


class MorphogeneticBatch(SeedOps, Scoring):
    """N envs, each a host with seed slots, as stacked tensors with one compiled step.

    The lifecycle actions and state queries are :class:`~esper.kasmina.seed_ops.SeedOps`, the
    validation and test passes :class:`~esper.kasmina.scoring.Scoring`."""

    def __init__(self, task: TaskData, n_envs: int, cfg: KasminaConfig, base_seed: int = 0,
                 env_offset: int = 0) -> None:
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        if cfg.contribution not in ("accuracy", "loss"):
            raise ValueError(f"unknown contribution {cfg.contribution!r}; allowed: 'accuracy', 'loss'")
        self.cfg = cfg
        self.task = task
        self.device = task.device
        self.n = n_envs
        spec = host_spec(cfg.host)
        family = "lm" if task.label_shape else "cnn"  # a target per token, or one per image
        if spec.family != family:
            raise ValueError(f"host {cfg.host!r} is a {spec.family} host; task {task.name!r} needs a {family} host")
        self.arch = Architecture(
            spec=spec,
            slots=ordered_slots(cfg.slots),
            blueprints=get_blueprints(cfg.blueprints, family=spec.family),
            n_envs=n_envs,
        )
        self.blueprint_names = tuple(bp.name for bp in self.arch.blueprints)
        self.lifecycle = Lifecycle(cfg.gates, self.device, cfg.alpha_schedule)
        # Compiled steps keep one shape: a smaller last batch would be a second graph.
        ragged = task.train_size % cfg.batch_size != 0
        self.sampler = EnvBatchSampler(task, n_envs, cfg.batch_size, drop_last=cfg.compile and ragged)
        self.sample_shape = task.sample_shape  # (C, H, W) images or (L,) token sequences
        self._adam = cfg.step.optimizer == "adamw"
        self.in_channels = self.sample_shape[0]
        self.num_classes = task.num_classes
        # Env identity: env i of a run is (base_seed, env_offset + i); episodes advance a counter.
        self.env_ids = torch.arange(env_offset, env_offset + n_envs, device=self.device)
        self.base_key = rng.stream_key(torch.tensor([base_seed], device=self.device), 7)
        self.episode = torch.zeros(n_envs, dtype=torch.long, device=self.device)
        self.epoch = torch.zeros(n_envs, dtype=torch.long, device=self.device)
        self.keys = self._env_keys()
        self.state = init_state(self.arch, self.keys, self.sample_shape, self.num_classes, self._adam)
        self._param_table = torch.tensor(
            [[bp.param_count(self.arch.spec.slot_channels(s)) for bp in self.arch.blueprints] for s in self.arch.slots],
            dtype=torch.float32, device=self.device,
        )
        self._flop_table = torch.tensor(
            [[bp.flops(self.arch.spec.slot_channels(s), self.arch.spec.slot_positions(s, self.sample_shape))
              for bp in self.arch.blueprints] for s in self.arch.slots],
            dtype=torch.float32, device=self.device,
        )
        self.host_params = float(self.arch.spec.param_count(self.sample_shape, self.num_classes))
        self.last = self._initial_signals()
        self._steps: dict[frozenset[str], Callable[..., dict[str, torch.Tensor]]] = {}
        # Validation compiles too (inference only, one graph): eager it was half of a compiled epoch.
        self._score_val = (torch.compile(score_val_batch, fullgraph=True, mode=self.cfg.compile_mode)
                           if self.cfg.compile else score_val_batch)
        self._plans: Plans | None = None
        self._eval_plans: Plans | None = None
        self._pending: torch.Tensor | None = None  # [N, S] germinations awaiting re-init
        self._computing = stage_mask(COMPUTING_STAGES, self.device)
        # Dynamo graphs this batch compiled and the wall seconds of the steps that compiled them.
        self.compile_graphs = 0
        self.compile_seconds = 0.0

    # ----------------------------------------------------------------------------- setup
    def _env_keys(self) -> torch.Tensor:
        return rng.stream_key(self.base_key.expand(self.n), self.env_ids, self.episode)

    def _build_step(self, capture: frozenset[str] = frozenset()) -> Callable[..., dict[str, torch.Tensor]]:
        fn = partial(train_step, self.arch, self.cfg.step, capture=capture)
        if not self.cfg.compile:
            return fn
        compiled = torch.compile(fn, fullgraph=True, mode=self.cfg.compile_mode)

        def step(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
            # The straight-through and seed-conv autograd.Functions are traced into the graph
            # (their backward too), so the AOTAutograd cache may keep it: a warm compile then
            # skips the joint-graph trace, not only inductor's codegen.
            with torch._functorch.config.patch(autograd_cache_allow_custom_autograd_functions=True):
                return compiled(*args, **kwargs)

        return step

    def _step_for(self, capture: frozenset[str]) -> Callable[..., dict[str, torch.Tensor]]:
        """The step variant returning ``capture``. Compiled, always the one capturing everything
        (:meth:`train_epoch` filters; the grads and block activations exist anyway, returning
        them costs little), so one graph and a capture escalation compiles nothing."""
        if self.cfg.compile:
            capture = TRAIN_CAPTURE
        if capture not in self._steps:
            self._steps[capture] = self._build_step(capture)
        return self._steps[capture]

    def _initial_signals(self) -> TensorDict:
        n, s, dev = self.n, len(self.arch.slots), self.device
        zeros = partial(torch.zeros, device=dev)
        return TensorDict(
            {
                "val_acc": zeros(n),
                "seed_grad_norm": zeros(n, s),
                "host_grad_norm": zeros(n),
                "gate_pass": torch.zeros(n, s, len(GateId), dtype=torch.bool, device=dev),
            },
            batch_size=[n],
        )

    def set_plan(self, stage: np.ndarray, blueprint: np.ndarray, germinated: np.ndarray | None = None) -> None:
        """Group-by-blueprint for the next epoch, from a host snapshot of ``stage``/``blueprint``.

        ``[N, S]`` arrays taken at an epoch boundary (the runner's one per-epoch transfer).
        Each blueprint then runs only for the envs whose seed computes in that slot, instead
        of every blueprint for every env. Envs that start computing next epoch come from
        GERMINATED, which is already TRAINING in such a snapshot, so the plan always covers
        every computing seed; envs that stop (culled, reset) are harmless extra work for an
        epoch (alpha 0, lr 0). The groups are gathered on the device (:meth:`_group_plan`); the
        snapshot only sizes them. A plan serves one epoch; without a new one the next epoch
        runs masked (eager) or with every env in every group (compiled: the same graph).
        ``germinated`` ``[N, S]`` (the snapshot's germinations) lets the seeds germinated under
        the previous plan be re-initialized per (env, slot) instead of masked over all envs.
        """
        if germinated is not None and self._pending is not None:
            self._reinit_listed(germinated)
            self._pending = None
        elif self._pending is not None:
            self._reinit_pending()
        computing = np.isin(stage, [int(x) for x in COMPUTING_STAGES])
        nb = len(self.arch.blueprints)
        counts = np.stack([np.bincount(blueprint[computing[:, k], k], minlength=nb) for k in range(stage.shape[1])])
        self._plans = self._group_plan(counts)
        # Validation runs eagerly: it leaves out the empty groups a compiled step keeps.
        names = self.blueprint_names
        self._eval_plans = {
            slot: {bp: g for bp, g in self._plans[slot].items() if counts[k, names.index(bp)]}
            for k, slot in enumerate(self.arch.slots)
        }

    def _group_plan(self, counts: np.ndarray | None) -> Plans:
        """Each (slot, blueprint)'s computing envs, gathered on the device from its own state.

        No index list is copied from the host: ``counts [S, B]`` (the snapshot's group sizes)
        only sizes the groups, and a stable argsort of each group's membership puts its envs
        first; ``None`` sizes every group at N (a whole-batch plan, for an epoch without a
        snapshot). Eager, empty groups are left out and the others are exact. Compiled, every
        non-identity group is present with at least 2 rows (dynamo specializes sizes 0 and
        1), its size marked dynamic, so one graph serves every plan; padding rows are the first
        non-members, masked out. A group the governor's rollback grew past its snapshot count
        leaves the extra envs' seeds out for that epoch.
        """
        compiled = self.cfg.compile
        stage, blueprint = self._stacked("stage"), self._stacked("blueprint")
        computing = self._computing[stage]
        plans: Plans = {}
        for k, slot in enumerate(self.arch.slots):
            plans[slot] = {}
            for b, bp in enumerate(self.arch.blueprints):
                count = self.n if counts is None else int(counts[k, b])
                if bp.identity or (count == 0 and not compiled):
                    continue
                size = max(count, 2) if compiled else count
                member = computing[:, k] & (blueprint[:, k] == b)
                envs = torch.argsort((~member).to(torch.uint8), stable=True)
                valid = member.index_select(0, envs)
                if size > self.n:  # one env: pad with itself, masked
                    envs = torch.cat([envs, envs[:1].expand(size - self.n)])
                    valid = torch.cat([valid, torch.zeros_like(valid[:1]).expand(size - self.n)])
                envs, valid = envs[:size], valid[:size]
                if compiled:
                    torch._dynamo.mark_dynamic(envs, 0)
                    torch._dynamo.mark_dynamic(valid, 0)
                plans[slot][bp.name] = (envs, valid)
        return plans

    # ----------------------------------------------------------------------------- epoch
    def host_lr(self) -> torch.Tensor:
        """Per-env host learning rate ``[N]``: cosine decay over ``lr_horizon`` epochs of each
        env's own episode (constant when the horizon is 0), floored at ``lr_min_frac``."""
        base = self.cfg.step.host_lr
        if self.cfg.lr_horizon <= 0:
            return torch.full((self.n,), base, device=self.device)
        progress = (self.epoch.float() / self.cfg.lr_horizon).clamp(max=1.0)
        frac = self.cfg.lr_min_frac + (1 - self.cfg.lr_min_frac) * 0.5 * (1 + torch.cos(math.pi * progress))
        return base * frac

    def controls(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-env tensors the step reads: each slot's alpha/isolation/lr/blueprint, host lr."""
        host_lr = self.host_lr()
        ctrl = {
            slot: self.lifecycle.controls(self.state["slots", slot], self.cfg.seed_lr, host_lr, len(self.arch.blueprints))
            for slot in self.arch.slots
        }
        ctrl["host"] = {"lr": host_lr}
        return ctrl

    def train_epoch(self, capture: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
        """One pass over each env's own permutation of the training set.

        ``capture`` (``"grads"``, ``"activations"``) is taken from the epoch's last step only
        and returned under ``"captured"``; other steps run the plain variant (compiled, one
        variant serves both: :meth:`_step_for`). Compiled, every epoch is planned (the whole
        batch when no plan was set), so the graph is always the same one.
        """
        st = as_dicts(self.state)
        ctrl = self.controls()
        sums: dict[str, torch.Tensor] = {}
        last: dict[str, torch.Tensor] = {}
        seen = 0
        steps = self.sampler.steps_per_epoch
        wanted = capture & TRAIN_CAPTURE
        plans = self._plans
        if plans is None and self.cfg.compile:
            plans = self._group_plan(None)
        for i, (x, y) in enumerate(self.sampler.epoch(self.keys, self.epoch)):
            step = self._step_for(wanted if i == steps - 1 else frozenset())
            graphs, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
            if self._adam:  # each env's (and seed's) own step count, for bias correction
                ctrl = self._with_step_counts(ctrl, steps, i)
            out = step(st["host"], st["buffers"], st["seeds"], st["host_mom"], st["seed_mom"], ctrl, x, y,
                       plans=plans, host_sq=st.get("host_sq"), seed_sq=st.get("seed_sq"))
            if counters["stats"]["unique_graphs"] != graphs:
                self.compile_graphs += counters["stats"]["unique_graphs"] - graphs
                self.compile_seconds += time.perf_counter() - t0
            targets = y[0].numel()  # per env: images, or tokens
            seen += targets
            for k in ("loss", "correct", "host_grad_norm", "seed_grad_norm"):
                v = out[k] * targets if k == "loss" else out[k]
                sums[k] = sums[k] + v if k in sums else v
            last = out
        captured = {k: v for k, v in last.items() if k.startswith("grad.") and "grads" in wanted}
        # activations come as [B, N, ...]; returned env-first like everything else
        captured |= {k: v.movedim(1, 0) for k, v in last.items() if k.startswith("act.") and "activations" in wanted}
        return {
            "captured": captured,
            "train_loss": sums["loss"] / seen,
            "train_acc": 100.0 * sums["correct"].float() / seen,
            "host_grad_norm": sums["host_grad_norm"] / steps,
            "seed_grad_norm": sums["seed_grad_norm"] / steps,
            "grad_nonfinite": last["grad_nonfinite"],
        }

    def _with_step_counts(self, ctrl: dict[str, dict[str, torch.Tensor]], steps: int, i: int) -> dict:
        """``ctrl`` plus AdamW's step counts ``t [N]`` (from 1) at step ``i`` of this epoch: the
        host's from its episode epoch, a seed's from its age (it trains from the epoch after
        it germinated). Device arithmetic only."""
        out = {"host": {**ctrl["host"], "t": (self.epoch * steps + (i + 1)).float()}}
        for slot in self.arch.slots:
            age = (self.state["slots", slot, "seed_age"] - 1).clamp(min=0)
            out[slot] = {**ctrl[slot], "t": (age * steps + (i + 1)).float()}
        return out

    def run_epoch(
        self, actions: TensorDict, capture: frozenset[str] = frozenset(), test: bool = False
    ) -> TensorDict:
        """Apply actions, train one epoch, validate, gate, tick. Returns per-env signals.

        ``capture`` names extra tensors for telemetry (:data:`CAPTURES`), returned env-first
        under ``signals["captured"]`` (``grad.<name>``, ``act.<i>``, ``val_logits``). With
        ``test`` the signals also hold ``test_acc`` and ``test_loss`` (the held-out split,
        scored after this epoch's training).
        """
        unknown = capture - CAPTURES
        if unknown:
            raise ValueError(f"unknown capture(s) {sorted(unknown)}; allowed: {sorted(CAPTURES)}")
        if self._plans is None and self._pending is not None:
            self._reinit_pending()
        stage_before = self._stacked("stage")
        applied = self.apply_actions(actions)
        with phase("train"):
            train = self.train_epoch(capture)
        # The counterfactual rows ride in the validation pass (shared prefix, no recompute).
        with phase("validate"):
            val = self.validate(keep_logits="logits" in capture)
            scores = self.test() if test else {}
        with phase("counterfactual"):
            blended = self._stacked("alpha") > 0
            if self.cfg.contribution == "loss":
                loss_without = val.pop("val_loss_without")  # read here only, not a signal
                removed = 100.0 * (loss_without - val["val_loss"].unsqueeze(1)) / loss_without.clamp_min(1e-12)
                contribution = torch.where(blended, removed, 0.0)
            else:
                contribution = torch.where(blended, val["val_acc"].unsqueeze(1) - val["val_acc_without"], 0.0)
        for k, slot in enumerate(self.arch.slots):
            st = self.state["slots", slot]
            st["contribution"] = contribution[:, k]
        gate_pass, gate_reason = self.gates(val["val_acc"], train["seed_grad_norm"], train["host_grad_norm"])
        # Automatic moves: G1 (start training), G3 (alpha reached), G4 (shadowing clean).
        for k, slot in enumerate(self.arch.slots):
            st = self.state["slots", slot]
            stage = st["stage"]
            auto = (stage == S.GERMINATED) | (stage == S.BLENDING) | (stage == S.SHADOWING)
            self.lifecycle.advance(st, auto, gate_pass[:, k])
        ticks = {slot: self.lifecycle.end_epoch(self.state["slots", slot]) for slot in self.arch.slots}
        self.epoch = self.epoch + 1
        # Gates again after the moves: these guard the controller's next decision.
        gate_pass, gate_reason = self.gates(val["val_acc"], train["seed_grad_norm"], train["host_grad_norm"])
        captured = train.pop("captured")
        if "val_logits" in val:
            captured["val_logits"] = val.pop("val_logits")
        signals = TensorDict(
            {
                **train,
                **val,
                **scores,
                "contribution": contribution,
                "gate_pass": gate_pass,
                "gate_reason": gate_reason,
                "action_accepted": applied["accepted"],
                "germinated": applied["germinated"],
                "embargoed": torch.stack([ticks[s]["embargoed"] for s in self.arch.slots], dim=1),
                "stage_before": stage_before,
                "stage": self._stacked("stage"),
                "alpha": self._stacked("alpha"),
                "blueprint": self._stacked("blueprint"),
                "epochs_in_stage": self._stacked("epochs_in_stage"),
                "seed_age": self._stacked("seed_age"),
                "params_added": self.params_added(),
                "flops_added": self.flops_added(),
                "epoch": self.epoch.clone(),
            },
            batch_size=[self.n],
        )
        self.last = signals
        self._plans = self._eval_plans = None  # a plan serves one epoch
        if not captured:
            return signals
        out = signals.copy()  # the captures go to the caller, not into ``self.last``
        out["captured"] = TensorDict(captured, batch_size=[self.n])
        return out
