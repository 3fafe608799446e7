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
import torch.nn.functional as F
from tensordict import TensorDict
from torch._dynamo.utils import counters

from esper import rng
from esper.kasmina.blueprints import get_blueprints
from esper.kasmina.gates import GateConfig, evaluate_gates
from esper.kasmina.hosts import host_spec
from esper.kasmina.model import Architecture, Plans, forward_eval
from esper.kasmina.slots import Lifecycle
from esper.kasmina.state import as_dicts, init_seeds, init_state, where_envs
from esper.kasmina.step import StepHyper, train_step
from esper.leyline import (
    CANONICAL_SLOTS,
    COMPUTING_STAGES,
    AlphaSchedule,
    GateId,
    Op,
    SeedStage,
    ordered_slots,
    stage_mask,
)
from esper.nissa.profiling import phase
from esper.tasks import EnvBatchSampler, TaskData

S = SeedStage
TRAIN_CAPTURE = frozenset({"grads", "activations"})
CAPTURES = TRAIN_CAPTURE | {"logits"}


def score_val_batch(
    arch: Architecture, params: dict, buffers: dict, seeds: dict, ctrl: dict, x: torch.Tensor,
    y: torch.Tensor, plans: Plans | None, num_classes: int, loss_rows: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One validation batch: correct targets per row ``[1 + S, N]`` (row 0 the actual model,
    row ``1 + k`` without slot ``k``'s seed), the summed loss of the first ``loss_rows`` rows
    ``[loss_rows, N]`` (1: the actual model; ``1 + S`` when contribution is loss-based) and the
    actual model's logits ``[N, targets, K]``. One function, so a compiled run compiles it as
    one graph."""
    logits = forward_eval(arch, params, buffers, seeds, ctrl, x, plans)
    correct = (logits.argmax(dim=-1) == y).flatten(2).sum(dim=-1)
    n = logits.shape[1]
    scored = logits[:loss_rows]
    loss = F.cross_entropy(scored.reshape(-1, num_classes), y.reshape(-1).repeat(loss_rows * n),
                           reduction="none").view(loss_rows, n, -1).sum(-1)
    return correct, loss, logits[0].reshape(n, -1, num_classes)


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


class MorphogeneticBatch:
    """N envs, each a host with seed slots, as stacked tensors with one compiled step."""

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

    def reinit_germinated(self, germinated: np.ndarray, blueprint: np.ndarray) -> None:
        """Re-initialize the seeds germinated this epoch, from its host snapshot.

        ``germinated`` and ``blueprint`` ``[N, S]`` are the snapshot's: only the (slot,
        blueprint) pairs that germinated are initialized, and nothing at all in an epoch
        without a germination. Call it after every epoch's transfer (the pipeline does), or
        the next epoch re-initializes every blueprint of every slot, masked.
        """
        self._reinit_listed(germinated, blueprint)

    def _reinit_listed(self, germinated: np.ndarray, blueprint: np.ndarray | None = None) -> None:
        """Fresh parameters and momentum for the pending germinations a host snapshot lists.

        The host picks which (slot, blueprint) pairs to make (every blueprint of the slot when
        ``blueprint`` is not given); the device's pending mask picks the envs, so no index list
        is copied to the device. Germinations the snapshot does not list are dropped: it must
        be the snapshot of the epoch that made them.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        for k, slot in enumerate(self.arch.slots):
            listed = np.asarray(germinated[:, k], dtype=bool)
            if not listed.any():
                continue
            if blueprint is None:
                self._reinit_seeds(slot, pending[:, k])
                continue
            current = self.state["slots", slot, "blueprint"]
            for b in np.unique(blueprint[listed, k]).tolist():
                self._reinit_seeds(slot, pending[:, k] & (current == b), (b,))

    def reset_envs(self, mask: torch.Tensor) -> None:
        """Fresh hosts (new per-env keys) for envs in ``mask``; the others continue untouched."""
        self.episode = self.episode + mask.long()
        self.epoch = torch.where(mask, torch.zeros_like(self.epoch), self.epoch)
        self.keys = self._env_keys()
        fresh = init_state(self.arch, self.keys, self.sample_shape, self.num_classes, self._adam)
        where_envs(mask, fresh, self.state)
        where_envs(mask, self._initial_signals(), self.last)

    # ----------------------------------------------------------------------------- actions
    def apply_actions(self, actions: TensorDict) -> dict[str, torch.Tensor]:
        """Lifecycle ops requested by the controller: ``op, slot, blueprint, tempo`` ``[N]``.

        Returns ``accepted [N]`` (WAIT always succeeds) and per-slot ``germinated [N, S]``.
        """
        op, slot_idx = actions["op"], actions["slot"]
        accepted = op == Op.WAIT
        germinated = []
        gates = self.last["gate_pass"]
        for k, slot in enumerate(self.arch.slots):
            st = self.state["slots", slot]
            here = slot_idx == k
            g = self.lifecycle.germinate(
                st, (op == Op.GERMINATE) & here, actions["blueprint"], actions["tempo"],
                len(self.arch.blueprints), self.last["val_acc"],
            )
            a = self.lifecycle.advance(st, (op == Op.ADVANCE) & here, gates[:, k])
            f = self.lifecycle.fossilize(st, (op == Op.FOSSILIZE) & here, gates[:, k, GateId.G5_FOSSILIZE])
            c = self.lifecycle.cull(st, (op == Op.CULL) & here)
            accepted = accepted | g | a | f | c
            germinated.append(g)
        fresh = torch.stack(germinated, dim=1)
        # A germinated seed first computes next epoch (GERMINATED trains nothing), so its
        # fresh parameters wait for the epoch's host snapshot, which names the germinations
        # (reinit_germinated, or set_plan); without a snapshot the next epoch re-initializes
        # them masked. Deciding here would need the device's mask on the host: a sync.
        self._pending = fresh if self._pending is None else self._pending | fresh
        return {"accepted": accepted, "germinated": fresh}

    def _reinit_pending(self) -> None:
        """Masked re-initialization (every blueprint, all envs) of the pending germinations:
        the fallback when no host snapshot says which ones there are."""
        mask, self._pending = self._pending, None
        if mask is None:
            return
        for k, slot in enumerate(self.arch.slots):
            self._reinit_seeds(slot, mask[:, k])

    def _reinit_seeds(self, slot: str, mask: torch.Tensor, only: tuple[int, ...] | None = None) -> None:
        """Fresh parameters, zero momentum for envs in ``mask`` (blueprints ``only``, or all)."""
        fresh = init_seeds(self.arch, self.keys, slot, self.state["slots", slot, "germinations"], only)
        where_envs(mask, fresh, self.state["seeds", slot])
        where_envs(mask, fresh.apply(torch.zeros_like), self.state["seed_mom", slot])
        if self._adam:
            where_envs(mask, fresh.apply(torch.zeros_like), self.state["seed_sq", slot])

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

    @torch.no_grad()
    def validate(self, keep_logits: bool = False) -> dict[str, torch.Tensor]:
        """Loss, accuracy and per-slot counterfactual accuracy, per env.

        With ``keep_logits`` the actual model's validation logits ``[N, V, K]`` are returned as
        ``val_logits`` (per-class telemetry reads them with ``task.val_y``; for sequences ``V``
        counts tokens and the labels are ``task.val_y`` flattened). Accuracy and loss are per
        target: per image, or per token (next-token accuracy, mean cross-entropy).
        """
        st = as_dicts(self.state)
        ctrl = self.controls()
        correct = torch.zeros(1 + len(self.arch.slots), self.n, device=self.device)
        # Counterfactual rows' losses only where the contribution reads them.
        loss_rows = 1 + len(self.arch.slots) if self.cfg.contribution == "loss" else 1
        loss = torch.zeros(loss_rows, self.n, device=self.device)
        kept: list[torch.Tensor] = []
        # Compiled, the training step's plan (every group present, sizes dynamic: one graph);
        # eager, the exact groups.
        plans = (self._plans if self._plans is not None else self._group_plan(None)) if self.cfg.compile \
            else self._eval_plans
        for x, y in self.sampler.val_batches(self.cfg.val_batch_size):
            graphs, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
            c, l_sum, actual = self._score_val(self.arch, st["host"], st["buffers"], st["seeds"], ctrl, x, y,
                                               plans, self.num_classes, loss_rows)
            if counters["stats"]["unique_graphs"] != graphs:
                self.compile_graphs += counters["stats"]["unique_graphs"] - graphs
                self.compile_seconds += time.perf_counter() - t0
            correct += c
            loss += l_sum
            if keep_logits:
                kept.append(actual)
        total = self.task.val_y.numel()  # images, or tokens
        acc = 100.0 * correct / total
        out = {
            "val_loss": loss[0] / total,
            "val_acc": acc[0],
            "val_acc_without": acc[1:].T.contiguous(),  # [N, S]
        }
        if loss_rows > 1:
            out["val_loss_without"] = (loss[1:] / total).T.contiguous()  # [N, S]
        if keep_logits:
            out["val_logits"] = torch.cat(kept, dim=1)
        return out

    @torch.no_grad()
    def test(self) -> dict[str, torch.Tensor]:
        """Loss and accuracy ``[N]`` of every env's current model on the held-out test split.

        No counterfactuals: only reported scores read this, never a decision, so it runs when
        an episode ends (``run_epoch(test=True)``; the caller knows when from its snapshot).
        """
        st = as_dicts(self.state)
        ctrl = self.controls()
        k_cls = self.num_classes
        correct = torch.zeros(self.n, device=self.device)
        loss = torch.zeros(self.n, device=self.device)
        for x, y in self.sampler.val_batches(self.cfg.val_batch_size, split="test"):
            logits = forward_eval(self.arch, st["host"], st["buffers"], st["seeds"], ctrl, x,
                                  self._eval_plans, counterfactuals=False)[0]
            correct += (logits.argmax(dim=-1) == y).reshape(self.n, -1).sum(dim=-1)
            loss += F.cross_entropy(logits.reshape(-1, k_cls), y.reshape(-1).repeat(self.n),
                                    reduction="none").view(self.n, -1).sum(1)
        total = self.task.test_y.numel()
        return {"test_loss": loss / total, "test_acc": 100.0 * correct / total}

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

    # ----------------------------------------------------------------------------- queries
    def gates(self, val_acc: torch.Tensor, seed_grad_norm: torch.Tensor, host_grad_norm: torch.Tensor):
        return evaluate_gates(
            self.cfg.gates,
            stage=self._stacked("stage"),
            epochs_in_stage=self._stacked("epochs_in_stage"),
            alpha=self._stacked("alpha"),
            seed_grad_norm=seed_grad_norm,
            host_grad_norm=host_grad_norm.unsqueeze(1).expand_as(seed_grad_norm),
            contribution=self._stacked("contribution"),
            acc_gain=val_acc.unsqueeze(1) - self._stacked("acc_at_germination"),
        )

    def _stacked(self, key: str) -> torch.Tensor:
        return torch.stack([self.state["slots", s, key] for s in self.arch.slots], dim=1)

    def _present(self) -> torch.Tensor:
        stage = self._stacked("stage")
        return self.lifecycle.live[stage] | (stage == S.FOSSILIZED)

    def params_added(self) -> torch.Tensor:
        """Parameters of live and fossilized seeds per env ``[N]``."""
        per_slot = self._param_table.gather(1, self._stacked("blueprint").T).T  # [N, S]
        return (per_slot * self._present()).sum(dim=1)

    def flops_added(self) -> torch.Tensor:
        per_slot = self._flop_table.gather(1, self._stacked("blueprint").T).T
        return (per_slot * self._present()).sum(dim=1)
