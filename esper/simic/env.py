"""The torchrl environment: N morphogenetic host runs, one step = one host epoch.

Output per step (batch ``[N]``): ``observation [N, F]`` (ObservationSchema layout), the four
action masks, ``signals`` (raw Kasmina signals policies read: train and validation only),
``tracker`` (on-device history counters), ``reward [N, 1]``, ``reward_components`` and
``done/terminated/truncated [N, 1]``. Actions are four categorical heads ``op, slot,
blueprint, tempo`` (plus an optional ``reason`` code for telemetry). Episodes are truncated
after ``episode.length`` epochs; ``_reset`` honours the ``"_reset"`` mask, so finished envs
get fresh hosts while the others continue.

Every step runs the whole epoch pipeline (:mod:`esper.simic.pipeline`): its one host transfer,
telemetry, test scoring and the next epoch's plan, whichever driver calls ``step``. That
snapshot also answers torchrl's "is any env done?" on the host, without another sync.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Binary, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from esper import rng
from esper.device import resolve_device
from esper.kasmina.blueprints import blueprint_catalogue, catalogue_index
from esper.kasmina.epoch import KasminaConfig, MorphogeneticBatch
from esper.kasmina.step import StepHyper
from esper.leyline import (
    HEADS,
    NUM_GATES,
    NUM_OPS,
    SIGNAL_KEYS,
    TEMPOS,
    ObservationSchema,
    Op,
    SeedStage,
)
from esper.nissa import NissaHub, TelemetryConfig, load_profile
from esper.simic.config import TrainingConfig
from esper.simic.errors import UsageError
from esper.simic.faults import LossFaults
from esper.simic.pipeline import EpochPipeline, reason_or_unknown
from esper.simic.rewards import RewardComponents, ShapedReward
from esper.tamiyo.features import FeatureBuilder, new_tracker
from esper.tamiyo.masks import MASK_KEYS, action_masks
from esper.tamiyo.observed_diagnostics import ObservedDiagnostics
from esper.tasks import TaskData, load_task
from esper.tasks.sequence import SequenceTask

ACTION_KEYS: tuple[str, ...] = HEADS


def kasmina_config(cfg: TrainingConfig) -> KasminaConfig:
    k = cfg.kasmina
    return KasminaConfig(
        host=k.host,
        slots=tuple(k.slots),
        blueprints=tuple(k.blueprints) if k.blueprints is not None else None,
        batch_size=k.batch_size,
        val_batch_size=k.val_batch_size,
        seed_lr=k.seed_lr,
        step=StepHyper(host_lr=k.host_lr, momentum=k.momentum, weight_decay=k.weight_decay,
                       max_grad_norm=k.max_grad_norm, optimizer=k.optimizer, beta2=k.beta2),
        gates=k.gates,
        compile=cfg.compile,
        lr_horizon=cfg.episode.length if k.lr_schedule == "cosine" else 0,
        lr_min_frac=k.lr_min_frac,
        alpha_schedule=k.alpha_schedule,
        contribution=k.contribution,
    )


def load_config_task(cfg: TrainingConfig, device: torch.device | str | None = None) -> TaskData | SequenceTask:
    """The config's task on ``device``. Data that cannot supply what the config asks (too little
    text for the windows, an unreadable file) is a :class:`~esper.simic.errors.UsageError`
    naming ``task``: one line from the command line, before any host is built."""
    try:
        return load_task(cfg.task.name, device=resolve_device(device or cfg.device), **cfg.task.loader_kwargs())
    except (ValueError, OSError) as err:
        raise UsageError(str(err), f"task {cfg.task.name!r}",
                         "data that holds the splits asked for (task.train_size, val_size, test_size, seq_len)") from None


def _rows(mask: torch.Tensor, new: TensorDictBase, old: TensorDictBase) -> TensorDictBase:
    """``new`` where ``mask`` (per env), else ``old``, leaf by leaf (a new TensorDict)."""
    return old.apply(
        lambda o, n: torch.where(mask.view(-1, *([1] * (o.dim() - 1))), n, o), new
    )


class MorphogeneticEnv(EnvBase):
    """Batched torchrl environment over :class:`MorphogeneticBatch`."""

    def __init__(
        self,
        cfg: TrainingConfig,
        task: TaskData | None = None,
        n_envs: int | None = None,
        base_seed: int | None = None,
        env_offset: int = 0,
        profile: TelemetryConfig | None = None,
        hub: NissaHub | None = None,
    ) -> None:
        task = task if task is not None else load_config_task(cfg)
        n = n_envs if n_envs is not None else cfg.episode.envs
        seed = base_seed if base_seed is not None else cfg.episode.seed
        super().__init__(device=task.device, batch_size=torch.Size([n]))
        self.cfg = cfg
        self.n = n
        self.env_offset = env_offset  # env i here is env env_offset + i of the run
        self.episode_length = cfg.episode.length
        self.kasmina = MorphogeneticBatch(task, n, kasmina_config(cfg), base_seed=seed, env_offset=env_offset)
        mb = self.kasmina
        self.slots = mb.arch.slots
        self.blueprint_names = mb.blueprint_names
        self.observed = ObservedDiagnostics(load_profile(cfg.features.observe), list(mb.state["host"].keys()),
                                            task.num_classes)
        # Laid out over every registered blueprint (not this run's set) and with losses in units
        # of ln(classes): one controller's inputs mean the same on any blueprint set, host and task.
        catalogue = blueprint_catalogue()
        self.schema = ObservationSchema(
            history_length=cfg.history_length, blueprints=catalogue, slots=mb.arch.slots,
            extras=self.observed.names,
        )
        self.features = FeatureBuilder(self.schema, mb.host_params, cfg.episode.length, cfg.features,
                                       blueprint_columns=catalogue_index(mb.blueprint_names, catalogue),
                                       num_classes=task.num_classes).to(task.device)
        self.reward_fn = ShapedReward(cfg.reward, mb.host_params, task.device, gamma=cfg.ppo.gamma)
        self.tracker = self._new_tracker()
        self.signals = self._blank_signals()
        self._make_specs()
        self.pipeline = EpochPipeline(self, profile=profile, hub=hub)
        block = env_offset if env_offset or n != cfg.episode.envs else None  # a block of the run's envs
        self.faults = LossFaults.build(cfg.faults, n, self.device, offset=block)  # a drill's poisoned envs, or None
        self.reset_by_driver = False  # a collector resets every batch (runner.collector_for): no auto-reset

    # ------------------------------------------------------------------------- specs
    def _signal_shape(self, kind: str) -> tuple[int, ...]:
        s = len(self.slots)
        return {"env": (self.n,), "slot": (self.n, s), "gate": (self.n, s, NUM_GATES)}[kind]

    def _make_specs(self) -> None:
        n, s, b, dev = self.n, len(self.slots), len(self.blueprint_names), self.device

        def spec(shape: tuple[int, ...], dtype: torch.dtype) -> Unbounded | Binary:
            if dtype is torch.bool:
                return Binary(n=shape[-1], shape=shape, dtype=torch.bool, device=dev)
            return Unbounded(shape=shape, dtype=dtype, device=dev)

        signals = Composite(
            {k: spec(self._signal_shape(kind), dt) for k, (kind, dt) in SIGNAL_KEYS.items()},
            shape=(n,), device=dev,
        )
        tracker = Composite(
            {k: spec(tuple(v.shape), v.dtype) for k, v in self.tracker.items()}, shape=(n,), device=dev
        )
        components = Composite(
            {k: Unbounded(shape=(n,), device=dev) for k in RewardComponents.names()}, shape=(n,), device=dev
        )
        self.observation_spec = Composite(
            observation=Unbounded(shape=(n, self.schema.size), device=dev),
            op_mask=spec((n, NUM_OPS), torch.bool),
            slot_mask=spec((n, NUM_OPS, s), torch.bool),
            blueprint_mask=spec((n, b), torch.bool),
            tempo_mask=spec((n, len(TEMPOS)), torch.bool),
            signals=signals,
            tracker=tracker,
            reward_components=components,
            rolled_back=spec((n,), torch.bool),  # the governor undid this step (PPO masks it)
            shape=(n,),
            device=dev,
        )
        self.action_spec = Composite(
            op=Categorical(NUM_OPS, shape=(n,), device=dev),
            slot=Categorical(s, shape=(n,), device=dev),
            blueprint=Categorical(b, shape=(n,), device=dev),
            tempo=Categorical(len(TEMPOS), shape=(n,), device=dev),
            shape=(n,),
            device=dev,
        )
        self.reward_spec = Unbounded(shape=(n, 1), device=dev)
        self.done_spec = Composite(
            done=Categorical(2, shape=(n, 1), dtype=torch.bool, device=dev),
            terminated=Categorical(2, shape=(n, 1), dtype=torch.bool, device=dev),
            truncated=Categorical(2, shape=(n, 1), dtype=torch.bool, device=dev),
            shape=(n,),
            device=dev,
        )

    # ------------------------------------------------------------------------- helpers
    def _new_tracker(self) -> TensorDict:
        return new_tracker(self.n, len(self.slots), self.cfg.history_length, self.device,
                           extras=len(self.observed.names))

    def _blank_signals(self) -> TensorDict:
        """Signals of envs that have not trained yet: all slots DORMANT, nothing measured."""
        out = {}
        for k, (kind, dt) in SIGNAL_KEYS.items():
            out[k] = torch.zeros(self._signal_shape(kind), dtype=dt, device=self.device)
        out["stage"] = torch.full_like(out["stage"], int(SeedStage.DORMANT))
        out["stage_before"] = out["stage"].clone()
        out["action_accepted"] = torch.ones_like(out["action_accepted"])
        return TensorDict(out, batch_size=[self.n], device=self.device)

    def _observe(self, components: TensorDict, update_norm: bool) -> TensorDict:
        sig = self.signals
        masks = action_masks(sig["stage"], sig["gate_pass"], len(self.blueprint_names))
        norm = self.features.norm
        frozen = norm is not None and not update_norm and norm.training
        if frozen:
            norm.eval()
        obs = self.features(self.tracker, sig)
        if frozen:
            norm.train()
        return TensorDict(
            {
                "observation": obs,
                **{k: masks[k] for k in MASK_KEYS},
                "signals": sig.clone(),
                "tracker": self.tracker.clone(),
                "reward_components": components,
                "rolled_back": torch.zeros(self.n, dtype=torch.bool, device=self.device),
            },
            batch_size=[self.n],
            device=self.device,
        )

    # ------------------------------------------------------------------------- EnvBase
    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: object) -> TensorDictBase:
        reset = tensordict.get("_reset", None) if tensordict is not None else None
        if reset is None:
            mask = torch.ones(self.n, dtype=torch.bool, device=self.device)
        else:
            mask = reset.reshape(self.n).to(torch.bool)
        self.kasmina.reset_envs(mask)
        self.pipeline.on_reset(full=reset is None)
        fresh = self._new_tracker()
        self.tracker = _rows(mask, fresh, self.tracker)
        self.signals = _rows(mask, self._blank_signals(), self.signals)
        self.pipeline.after_reset(mask)
        zeros = TensorDict(
            {k: torch.zeros(self.n, device=self.device) for k in RewardComponents.names()},
            batch_size=[self.n],
        )
        out = self._observe(zeros, update_norm=False)
        false = torch.zeros(self.n, 1, dtype=torch.bool, device=self.device)
        out.set("done", false)
        out.set("terminated", false.clone())
        out.set("truncated", false.clone())
        return out

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        actions = TensorDict(
            {k: tensordict.get(k).reshape(self.n).long() for k in ACTION_KEYS}, batch_size=[self.n]
        )
        decided = self._decided(tensordict) if self.pipeline.hub is not None else None
        capture, test = self.pipeline.begin()
        if self.faults is not None:  # fault drill: a diverged step's weights, for the governor to catch
            self.faults.before_epoch(self.pipeline.host_epoch, self.kasmina.state["host"])
        raw = self.kasmina.run_epoch(actions, capture=capture | self.observed.captures, test=test)
        self.signals = raw.select(*SIGNAL_KEYS).to(self.device)
        extra = None
        if self.observed.names:
            extra = self.observed(raw.get("captured", None), self.kasmina.task.val_y.reshape(-1), self.n)
        self.tracker = self.features.update_tracker(self.tracker, self.signals, actions["op"], extra)
        truncated = self.signals["epoch"] >= self.episode_length
        components = self.reward_fn(self.signals, actions["op"], truncated)
        out = self._observe(components.to_tensordict(), update_norm=True)
        out.set("reward", components.total.unsqueeze(-1))
        out.set("terminated", torch.zeros(self.n, 1, dtype=torch.bool, device=self.device))
        out.set("truncated", truncated.unsqueeze(-1))
        out.set("done", truncated.unsqueeze(-1).clone())
        actions.set("reason", reason_or_unknown(tensordict, self.n, self.device))
        self.pipeline.end(actions, raw, out, decided)
        return out

    def _decided(self, tensordict: TensorDictBase) -> TensorDict:
        """What the controller decided from (for the decisions' context in telemetry): stages,
        gate reasons, validation accuracy and legal ops; a learned policy's op probabilities
        (masked softmax of its logits) and value estimate when it wrote them."""
        sig = self.signals
        mask = tensordict.get("op_mask", None)
        if mask is None:
            mask = action_masks(sig["stage"], sig["gate_pass"], len(self.blueprint_names))["op_mask"]
        out = TensorDict({"stage": sig["stage"], "gate_reason": sig["gate_reason"], "val_acc": sig["val_acc"],
                          "op_mask": mask.reshape(self.n, NUM_OPS)}, batch_size=[self.n])
        logits = tensordict.get(("params", "op", "logits"), None)
        if logits is not None:
            masked = logits.reshape(self.n, NUM_OPS).masked_fill(~out["op_mask"], float("-inf"))
            out.set("op_probs", torch.softmax(masked, dim=-1))
        value = tensordict.get("state_value", None)
        if value is not None:
            out.set("value", value.reshape(self.n).float())
        return out

    # ------------------------------------------------------------------------- host-known done
    def any_done(self, tensordict: TensorDictBase) -> bool:
        """torchrl's auto-reset test, answered from the epoch's snapshot instead of a sync.

        When every env is done (lockstep episodes, the usual case) no ``_reset`` mask is set:
        a full reset, which torchrl merges without reading a mask on the host.
        """
        done = self.pipeline.host_done
        if self.reset_by_driver or not done.any():
            return False
        if not done.all():
            tensordict.set("_reset", tensordict.get("done").clone())
        return True

    def _reset_check_done(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> None:
        """No env may be done right after a reset; checked on the device (torchrl's check syncs)."""
        torch._assert_async(~tensordict_reset.get("done").any(), "an env is done right after its reset")

    def _set_seed(self, seed: int | None) -> None:
        """Re-key the hosts: envs started after the next reset draw from ``seed``."""
        if seed is None:
            return
        self.kasmina.base_key = rng.stream_key(torch.tensor([int(seed)], device=self.device), 7)

    # ------------------------------------------------------------------------- helpers
    def describe(self, op: int, slot: int, blueprint: int, tempo: int) -> str:
        o = Op(op)
        if o is Op.GERMINATE:
            return f"germinate({self.blueprint_names[blueprint]}@{self.slots[slot]}, tempo {TEMPOS[tempo]})"
        if o is Op.WAIT:
            return "wait"
        return f"{o.name.lower()}({self.slots[slot]})"
