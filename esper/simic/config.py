"""The training configuration: one validated pydantic tree, presets, JSON/YAML loading."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from esper.kasmina.gates import GateConfig
from esper.leyline import CANONICAL_SLOTS
from esper.nissa.config import yaml_problem
from esper.simic.errors import ConfigError
from esper.tamiyo.config import FeatureConfig, FixedScheduleConfig, HeuristicConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Which task fields mean something for which task: a field set for a task it does nothing for
# is refused by name (a flag that does nothing is a trap, not a default).
_TASK_FIELDS: dict[str, frozenset[str]] = {
    "image_size": frozenset({"synthetic"}),
    "num_classes": frozenset({"synthetic"}),
    "seq_len": frozenset({"grammar", "tinystories", "text"}),
    "seed": frozenset({"synthetic", "grammar", "images", "text"}),
    "data_dir": frozenset({"cifar10", "tinystories", "images", "text"}),
    "download": frozenset({"cifar10"}),
    "val_fraction": frozenset({"images", "text"}),
    "test_fraction": frozenset({"images", "text"}),
    "crop": frozenset({"images", "cifar10"}),
    "flip": frozenset({"images", "cifar10"}),
    "pattern": frozenset({"text"}),
}
USER_DATA_TASKS: frozenset[str] = frozenset({"images", "text"})


class TaskConfig(_Strict):
    """Which dataset, and how much of it.

    ``images`` and ``text`` read a user's own data from ``data_dir`` (a folder or a file; see
    :mod:`esper.tasks.images` and :mod:`esper.tasks.text`). Their split sizes default to all of
    each split, and splits the data lacks are carved by ``seed`` at the given fractions.
    """

    name: Literal["synthetic", "cifar10", "grammar", "tinystories", "images", "text"] = "synthetic"
    train_size: int | None = Field(2048, ge=1, description="samples: images, or token windows")
    val_size: int | None = Field(512, ge=1)
    test_size: int | None = Field(1024, ge=1, description="held-out samples results are reported on")
    image_size: int = Field(16, ge=5, description="synthetic only")
    num_classes: int = Field(10, ge=2, description="synthetic only")
    seq_len: int = Field(64, ge=2, description="grammar/tinystories/text: tokens per sample (window)")
    seed: int = Field(0, ge=0, description="synthetic/grammar data seed (a grammar seed is a different task); "
                                           "images/text: the seed of the split carving")
    data_dir: str = Field("data", description="cifar10/tinystories: their folder; images: an ImageFolder tree "
                                              "or an .npz/.pt file; text: a folder of text files or one file")
    download: bool = False
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="images/text without their own val split")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="images/text without their own test split")
    crop: bool = Field(True, description="images/cifar10: random crop of training images (zero padding H/8)")
    flip: bool = Field(False, description="images/cifar10: random horizontal flip (off: it changes digits and text)")
    pattern: str = Field("*.txt", min_length=1, description="text: which files of the folder to read")

    def check_fields(self) -> TaskConfig:
        """Refuse a field changed for a task it does nothing for. Run on the merged config
        (``TrainingConfig.check_host``): a config file may set fields for the preset's task.
        """
        # A value somebody changed from its default, for a task it does nothing for (a full
        # config dump, as checkpoints store, sets every field at its default: not refused).
        fields = type(self).model_fields
        wrong = sorted(k for k in self.model_fields_set if k in _TASK_FIELDS and self.name not in _TASK_FIELDS[k]
                       and getattr(self, k) != fields[k].default)
        if wrong:
            uses = "; ".join(f"{k}: {sorted(_TASK_FIELDS[k])}" for k in wrong)
            raise ConfigError(f"task.{wrong[0]} has no effect for task {self.name!r} (used by {uses}); "
                              "drop it")
        if self.name in USER_DATA_TASKS and self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(f"val_fraction + test_fraction ({self.val_fraction} + {self.test_fraction}) "
                             "must be below 1: the rest trains")
        return self

    @property
    def family(self) -> str:
        """The host family the task needs: ``lm`` for token sequences, ``cnn`` for images."""
        return "lm" if self.name in ("grammar", "tinystories", "text") else "cnn"

    def loader_kwargs(self) -> dict[str, Any]:
        sizes = {k: getattr(self, k) for k in ("train_size", "val_size", "test_size")}
        if self.name in USER_DATA_TASKS:
            # Sizes default to all of each split; the seed is passed only when somebody set it
            # (the loader refuses one that would do nothing).
            kw: dict[str, Any] = {"path": self.data_dir, "val_fraction": self.val_fraction,
                                  "test_fraction": self.test_fraction,
                                  **{k: (v if k in self.model_fields_set else None) for k, v in sizes.items()}}
            if "seed" in self.model_fields_set and self.seed != 0:  # 0: the default carving
                kw["seed"] = self.seed
            if self.name == "text":
                return {**kw, "pattern": self.pattern, "seq_len": self.seq_len}
            return {**kw, "crop": self.crop, "flip": self.flip}
        if self.name == "grammar":
            return {"seed": self.seed, "seq_len": self.seq_len, **{k: v for k, v in sizes.items() if v is not None}}
        if self.name == "tinystories":
            return {"root": self.data_dir, "seq_len": self.seq_len, **sizes}
        if self.name == "synthetic":
            kw = {
                "num_classes": self.num_classes,
                "image_size": self.image_size,
                "seed": self.seed,
            }
            if self.train_size is not None:
                kw["train_size"] = self.train_size
            if self.val_size is not None:
                kw["val_size"] = self.val_size
            if self.test_size is not None:
                kw["test_size"] = self.test_size
            return kw
        return {
            "root": self.data_dir,
            "download": self.download,
            "train_size": self.train_size,
            "val_size": self.val_size,
            "test_size": self.test_size,
            "crop": self.crop,
            "flip": self.flip,
        }


class KasminaSection(_Strict):
    """The batched hosts: architecture, blueprint set, optimizer, gates."""

    host: str = "shallow"
    slots: tuple[str, ...] = CANONICAL_SLOTS
    blueprints: tuple[str, ...] | None = None
    batch_size: int = Field(64, ge=1)
    val_batch_size: int = Field(512, ge=1)
    host_lr: float = Field(0.05, gt=0.0)
    seed_lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum, or AdamW's beta1")
    weight_decay: float = Field(5e-4, ge=0.0)
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="host and seed optimizer: Nesterov SGD, or AdamW (transformer hosts)")
    beta2: float = Field(0.99, ge=0.0, lt=1.0, description="AdamW's second-moment decay")
    max_grad_norm: float = Field(5.0, gt=0.0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="host lr over each episode: constant, or cosine decay to lr_min_frac"
    )
    lr_min_frac: float = Field(0.05, ge=0.0, le=1.0)
    alpha_schedule: Literal["linear", "cosine", "sigmoid"] = Field(
        "linear", description="shape of the alpha ramp while a seed blends in (over its tempo)"
    )
    contribution: Literal["accuracy", "loss"] = Field(
        "accuracy", description="a seed's counterfactual contribution: validation accuracy points it "
        "adds, or percent of the validation loss without it that it removes")
    gates: GateConfig = Field(default_factory=GateConfig)

    @model_validator(mode="after")
    def _check(self) -> KasminaSection:
        bad = [s for s in self.slots if s not in CANONICAL_SLOTS]
        if bad or not self.slots:
            raise ValueError(f"slots must be a non-empty subset of {list(CANONICAL_SLOTS)}, got {bad}")
        from esper.kasmina.blueprints import BLUEPRINTS, family_blueprints
        from esper.kasmina.hosts import HOST_PRESETS

        if self.host not in HOST_PRESETS:
            raise ValueError(f"unknown host {self.host!r}; allowed: {sorted(HOST_PRESETS)}")
        if self.blueprints is not None:
            family = HOST_PRESETS[self.host].family
            allowed = family_blueprints(family)
            unknown = [b for b in self.blueprints if b not in BLUEPRINTS]
            if unknown or not self.blueprints:
                raise ValueError(f"unknown blueprints {unknown}; allowed: {allowed}")
            foreign = [b for b in self.blueprints if b not in allowed]
            if foreign:
                raise ValueError(f"blueprints {foreign} do not fit host {self.host!r} ({family}); allowed: {allowed}")
        return self


class EpisodeConfig(_Strict):
    """How long an episode is (one step = one host epoch) and how many envs run at once."""

    length: int = Field(30, ge=1)
    envs: int = Field(8, ge=1)
    episodes: int = Field(1, ge=1)
    seed: int = Field(0, ge=0)


REWARD_MODES = ("shaped", "simplified", "sparse")


class RewardConfig(_Strict):
    """The reward family and its components' weights (accuracies enter as fractions).

    ``mode``: ``shaped`` pays every component; ``simplified`` only the potential-based shaping,
    the action costs and the terminal accuracy (no per-epoch contribution, rent or bonus that a
    policy could farm); ``sparse`` only the terminal accuracy. Dropped components are logged as 0.
    """

    mode: Literal["shaped", "simplified", "sparse"] = Field("shaped", description="reward family: " + ", ".join(REWARD_MODES))
    contribution: float = Field(1.0, ge=0.0, description="per unit of live-seed contribution")
    shaping: float = Field(0.05, ge=0.0, description="stage-progress potential scale")
    rent: float = Field(0.02, ge=0.0, description="per epoch, times log(1 + added/host params)")
    germinate_cost: float = Field(0.02, ge=0.0)
    advance_cost: float = Field(0.005, ge=0.0)
    cull_cost: float = Field(0.01, ge=0.0)
    fossilize_cost: float = Field(0.005, ge=0.0)
    fossilize_bonus: float = Field(0.1, ge=0.0)
    terminal: float = Field(1.0, ge=0.0, description="times final val accuracy (fraction)")


class PPOConfig(_Strict):
    """Settings of the LSTM-PPO learner (consumed by simic.ppo_round)."""

    lr: float = Field(3e-4, gt=0.0)
    gamma: float = Field(0.99, gt=0.0, le=1.0, description="the one discount: PPO's and reward shaping's")
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0)
    clip_epsilon: float = Field(0.2, gt=0.0, lt=1.0)
    epochs: int = Field(4, ge=1)
    minibatch_envs: int = Field(4, ge=1)
    entropy_coef: dict[str, float] = Field(
        default_factory=lambda: {"op": 0.01, "slot": 0.005, "blueprint": 0.005, "tempo": 0.002}
    )
    value_coef: float = Field(0.5, ge=0.0)
    max_grad_norm: float = Field(0.5, gt=0.0)
    target_kl: float | None = Field(0.03, gt=0.0, description="stop a round's passes once their mean KL exceeds this")
    lr_final_frac: float = Field(0.1, ge=0.0, le=1.0, description="lr decays linearly to lr * this by the last round")
    entropy_final_frac: float = Field(0.3, ge=0.0, le=1.0,
                                      description="entropy coefficients decay linearly to this fraction by the last round")
    hidden_size: int = Field(128, ge=1)
    lstm_hidden_size: int = Field(128, ge=1)
    rounds: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _heads(self) -> PPOConfig:
        unknown = sorted(set(self.entropy_coef) - {"op", "slot", "blueprint", "tempo"})
        if unknown:
            raise ValueError(f"entropy_coef has unknown heads {unknown}")
        return self


class TelemetrySection(_Strict):
    """Which Nissa profile, where events go, and profile overrides (``key=value``)."""

    profile: str = "minimal"
    backends: list[str] = Field(default_factory=lambda: ["console"])
    overrides: list[str] = Field(default_factory=list)
    profile_file: str | None = None
    verbosity: int = Field(0, ge=0, le=3)
    prometheus_port: int = Field(9464, ge=0, le=65535,
                                 description="local port of the prometheus backend's /metrics (0: any free one)")


class FaultsConfig(_Strict):
    """Fault drills: failures injected on purpose, where they would really happen, to rehearse
    that a run survives them (and to test that it does). Off by default; an empty section costs
    nothing. See :mod:`esper.simic.faults`."""

    at_epoch: int = Field(1, ge=1, description="episode epoch (1 = the first) at which the loss faults hit, "
                                               "in every episode")
    nan_loss_envs: list[int] = Field(default_factory=list,
                                     description="envs whose host weights turn NaN before that epoch trains (a NaN loss)")
    explode_loss_envs: list[int] = Field(default_factory=list,
                                         description="envs whose host weights are scaled by explode_scale before "
                                                     "that epoch trains (a huge, finite loss)")
    explode_scale: float = Field(1e6, gt=1.0)
    failing_backend: Literal["console", "jsonl", "tensorboard"] | None = Field(
        None, description="telemetry backend on a disk that fills up: writes are buffered and succeed, "
                          "every flush fails and loses them")
    backend_fails_after: int = Field(0, ge=0, description="flushes of that backend that succeed first")
    checkpoint_fail_rounds: list[int] = Field(default_factory=list,
                                              description="PPO rounds whose checkpoint write fails half-way (disk full)")
    policy_nan_at_round: int | None = Field(None, ge=1,
                                            description="PPO round whose update leaves a NaN in the policy's weights")

    @property
    def ppo_training(self) -> list[str]:
        """The drills set here that only a PPO training run can play."""
        return [k for k in ("checkpoint_fail_rounds", "policy_nan_at_round") if getattr(self, k)]


class TrainingConfig(_Strict):
    """Everything a training or evaluation run needs."""

    task: TaskConfig = Field(default_factory=TaskConfig)
    kasmina: KasminaSection = Field(default_factory=KasminaSection)
    episode: EpisodeConfig = Field(default_factory=EpisodeConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    heuristic: HeuristicConfig = Field(default_factory=HeuristicConfig)
    fixed: FixedScheduleConfig = Field(default_factory=FixedScheduleConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    faults: FaultsConfig = Field(default_factory=FaultsConfig,
                                 description="fault drills (rehearsal only): failures injected on purpose")
    history_length: int = Field(4, ge=1, description="observation history (epochs)")
    device: str = Field("auto", description="auto (CUDA when available, else the CPU), cpu, cuda, cuda:N")
    compile: bool = False
    run_dir: str = "runs/latest"

    @model_validator(mode="after")
    def _finite(self) -> TrainingConfig:
        """Non-finite numbers (inf, nan) are refused anywhere in the tree."""
        bad = [k for k, v in _leaves(self.model_dump()) if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise ValueError(f"non-finite values are not allowed: {', '.join(bad)}")
        return self

    def check_host(self) -> TrainingConfig:
        """An image host cannot read tokens, nor a transformer images: refused before any work.

        Not a field validator: a config file may set the host and leave the task to the preset
        it is applied over, so this runs on the merged config (``simic.cli.build_config``)."""
        from esper.kasmina.hosts import HOST_PRESETS

        self.task.check_fields()
        need = self.task.family
        if HOST_PRESETS[self.kasmina.host].family != need:
            fits = sorted(n for n, h in HOST_PRESETS.items() if h.family == need)
            raise ConfigError(f"kasmina.host {self.kasmina.host!r} cannot run task {self.task.name!r} "
                              f"({need} task); allowed hosts: {fits}")
        return self

    def check_for(self, policy: str) -> TrainingConfig:
        """Refuse settings that the controller ``policy`` (a registry name) cannot run with.

        A policy's own section is checked only when that policy runs: a PPO run does not fail
        on a heuristic threshold. Called by ``tamiyo.policies.make_policy`` (and by whoever
        builds a controller another way, e.g. the PPO trainer); returns ``self``.
        """
        problems: list[str] = []
        h, length = self.heuristic, self.episode.length
        if policy == "heuristic":
            if h.warmup_epochs >= length:
                problems.append(
                    f"heuristic.warmup_epochs ({h.warmup_epochs}) must be below episode.length ({length})"
                )
            if h.plateau_epochs >= self.history_length:
                problems.append(
                    f"heuristic.plateau_epochs ({h.plateau_epochs}) must be below history_length "
                    f"({self.history_length}): the plateau is judged from that history"
                )
            if h.blueprints is not None and self.kasmina.blueprints is not None:
                missing = [b for b in h.blueprints if b not in self.kasmina.blueprints]
                if missing:
                    problems.append(f"heuristic.blueprints {missing} are not in kasmina.blueprints")
        elif policy == "fixed":
            # Only a schedule the user wrote is checked: the default's later epochs simply do
            # not fire in a shorter episode.
            late = [e for e in self.fixed.epochs if e >= length]
            if late and "epochs" in self.fixed.model_fields_set:
                problems.append(f"fixed.epochs {late} are not below episode.length ({length})")
        elif policy in ("ppo", "ppo_sample") and self.ppo.minibatch_envs > self.episode.envs:
            problems.append(
                f"ppo.minibatch_envs ({self.ppo.minibatch_envs}) exceeds episode.envs ({self.episode.envs})"
            )
        if problems:
            raise ConfigError(f"config for policy {policy!r}: " + "; ".join(problems))
        return self

    # ------------------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> TrainingConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(f"{source}: {_format(err)}") from err

    @classmethod
    def load(cls, path: str | Path) -> TrainingConfig:
        """Read a JSON or YAML file (by suffix; YAML otherwise)."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config {p}: {err}") from err
        try:
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{p}: cannot parse JSON: {err}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: cannot parse YAML: {yaml_problem(err)}") from err
        return cls.from_dict(data if data is not None else {}, str(p))

    @classmethod
    def preset(cls, name: str) -> TrainingConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        return cls.from_dict(PRESETS[name], f"preset {name}")

    def user_set(self) -> dict[str, Any]:
        """Only the values somebody wrote (preset, file, flags), nested: never a default.

        Re-validating this (merged with more user values) keeps defaults unset, so rules such
        as "only a schedule the user wrote is checked" still hold after a merge.
        """
        return self.model_dump(exclude_unset=True)

    def updated(self, **sections: Any) -> TrainingConfig:
        """A re-validated copy with some fields of some sections replaced (the rest as set)."""
        unknown = sorted(set(sections) - set(type(self).model_fields))
        if unknown:
            raise ConfigError(f"unknown config section {unknown[0]!r}")
        return TrainingConfig.from_dict(merge_config(self.user_set(), sections), "overrides")


def merge_config(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, section by section (nested mappings merge, values replace)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


def _leaves(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        return [leaf for k, v in d.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    if isinstance(d, list | tuple):
        return [leaf for i, v in enumerate(d) for leaf in _leaves(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), d)]


def _format(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


# Shared by the language-model presets (lm, tinystories): quick gates, a heuristic that grows
# every seed as early as it may, and PPO entropy at half the default (seed 002's TinyStories row).
_LM_GATES = {"min_training_epochs": 1, "shadow_epochs": 0, "min_probation_epochs": 0}
_LM_HEURISTIC = {"warmup_epochs": 1, "plateau_epochs": 1, "plateau_delta": 100.0, "max_seeds": 3,
                 "wait_for": "nothing", "drop_threshold": 3.0, "probation_patience": 2, "fossilize_threshold": 0.0}
_LM_ENTROPY = {"op": 0.005, "slot": 0.0025, "blueprint": 0.0025, "tempo": 0.001}

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The setting the learned controller trains on (``python -m esper.train``): the cheapest
    # episode found where growth clearly pays (bench/preset_search/LOG.md). 12x12 images, 1024
    # training images, 20-epoch episodes; growth pays only if it starts early here, so the
    # heuristic's thresholds were tuned on task seed 0 to germinate from epoch 2.
    "ppo": {
        "task": {"train_size": 1024, "val_size": 256, "image_size": 12, "num_classes": 10},
        "kasmina": {"batch_size": 32, "val_batch_size": 256, "host_lr": 0.1, "seed_lr": 0.1,
                    "blueprints": ["conv_light", "conv_heavy", "depthwise", "bottleneck"],
                    "gates": {"min_training_epochs": 1, "shadow_epochs": 0, "min_probation_epochs": 0}},
        "episode": {"length": 20, "envs": 16},
        "heuristic": {"warmup_epochs": 1, "plateau_epochs": 1, "plateau_delta": 100.0, "max_seeds": 3,
                      "drop_threshold": 8.0, "probation_patience": 2},
        "fixed": {"epochs": [1, 4, 7]},
        # Rent 0.04 (not 0.02): at 0.02 the controller added 3 x conv_light, more parameters
        # than the heuristic; at 0.04 it adds fewer and stays as accurate (README, Results).
        "reward": {"rent": 0.04},
        "ppo": {"lr": 5e-4, "gamma": 0.99, "gae_lambda": 0.95, "epochs": 4, "minibatch_envs": 4,
                "hidden_size": 64, "lstm_hidden_size": 64, "rounds": 3},
    },
    # Language modelling on the embedded grammar corpus (no files): a one-block transformer
    # grown with MLP blocks, attention heads and LoRA attention. AdamW, not SGD: SGD left
    # transformer hosts far behind and unstable (README, language-model hosts). Entropy and
    # plateau settings follow the reference's TinyStories row (seed 002): entropy half the
    # default, plateau threshold 0.3 instead of 0.5.
    # Chosen on task seed 1 (4 envs, host seed 7; README): 30-epoch episodes (static keeps
    # improving too), every seed germinated as early as it may ("nothing" to wait for), and seeds
    # at half the host's learning rate (test perplexity ratio grown/static 0.98 at 2x the host's
    # rate, 0.92 at 1x, 0.88 at 0.5x and at 0.25x).
    "lm": {
        "task": {"name": "grammar", "seq_len": 64, "train_size": 2048, "val_size": 256, "test_size": 1024},
        "kasmina": {"host": "lm_small", "batch_size": 32, "val_batch_size": 256, "optimizer": "adamw",
                    "host_lr": 0.003, "seed_lr": 0.0015, "weight_decay": 0.01,
                    "gates": _LM_GATES},
        "episode": {"length": 30, "envs": 8},
        "heuristic": _LM_HEURISTIC,
        "fixed": {"blueprint": "block", "epochs": [1, 4, 7]},
        "features": {"plateau_delta": 0.3},
        "ppo": {"entropy_coef": _LM_ENTROPY,
                "hidden_size": 64, "lstm_hidden_size": 64, "rounds": 3},
    },
    # TinyStories (a local copy: task.data_dir names the file or its folder; nothing is
    # downloaded), byte-level, 128-byte windows.
    "tinystories": {
        # 16k windows (2 MB of text) per epoch: the whole 1.9 GB training file is too much for an
        # episode of epochs; set task.train_size null for all of it.
        "task": {"name": "tinystories", "seq_len": 128, "train_size": 16384, "val_size": 512, "test_size": 512},
        "kasmina": {"host": "lm_base", "batch_size": 32, "val_batch_size": 128, "optimizer": "adamw",
                    "host_lr": 0.002, "seed_lr": 0.001, "weight_decay": 0.01,
                    "gates": _LM_GATES},
        "episode": {"length": 10, "envs": 8},
        "heuristic": _LM_HEURISTIC,
        "fixed": {"blueprint": "block", "epochs": [1, 3, 5]},
        "features": {"plateau_delta": 0.3},
        "ppo": {"entropy_coef": _LM_ENTROPY},
    },
    # A user's own images (task.data_dir: an ImageFolder tree or an .npz/.pt file; see README,
    # "Bring your own data"). A 3-block host (16-32-64 channels) at SGD lr 0.05 with cosine decay
    # trains stably on data it has never seen; the `ppo` preset's early-growth heuristic and
    # blueprints (what the shipped controller knows). Crop on, flip off (a flip changes digits
    # and text). Change first: episode.length (longer for larger data), kasmina.host_lr.
    "images": {
        "task": {"name": "images"},
        "kasmina": {"host": "baseline", "batch_size": 32, "val_batch_size": 256, "host_lr": 0.05, "seed_lr": 0.05,
                    "blueprints": ["conv_light", "conv_heavy", "depthwise", "bottleneck"],
                    "gates": {"min_training_epochs": 1, "shadow_epochs": 0, "min_probation_epochs": 0}},
        "episode": {"length": 20, "envs": 8},
        "heuristic": {"warmup_epochs": 1, "plateau_epochs": 1, "plateau_delta": 100.0, "max_seeds": 3,
                      "drop_threshold": 8.0, "probation_patience": 2},
        "fixed": {"epochs": [1, 4, 7]},
        "reward": {"rent": 0.04},
        "ppo": {"lr": 5e-4, "epochs": 4, "minibatch_envs": 4, "hidden_size": 64, "lstm_hidden_size": 64},
    },
    # A user's own text (task.data_dir: a folder of files matching task.pattern, or one file),
    # byte-level, 64-byte windows, on the `lm` preset's host and growth settings.
    "text": {
        "task": {"name": "text", "seq_len": 64},
        "kasmina": {"host": "lm_small", "batch_size": 32, "val_batch_size": 256, "optimizer": "adamw",
                    "host_lr": 0.003, "seed_lr": 0.0015, "weight_decay": 0.01, "gates": _LM_GATES},
        "episode": {"length": 20, "envs": 8},
        "heuristic": _LM_HEURISTIC,
        "fixed": {"blueprint": "block", "epochs": [1, 4, 7]},
        "features": {"plateau_delta": 0.3},
        "ppo": {"entropy_coef": _LM_ENTROPY, "hidden_size": 64, "lstm_hidden_size": 64},
    },
    "cifar10": {
        "task": {"name": "cifar10", "train_size": None, "val_size": 5000, "test_size": None, "flip": True},
        "kasmina": {"host": "baseline", "batch_size": 128, "val_batch_size": 1000},
        "episode": {"length": 25, "envs": 16},
        "heuristic": {"warmup_epochs": 5, "plateau_epochs": 3},
    },
    "cifar10_deep": {
        "task": {"name": "cifar10", "train_size": None, "val_size": 5000, "test_size": None, "flip": True},
        "kasmina": {"host": "deep", "batch_size": 128, "val_batch_size": 1000},
        "episode": {"length": 40, "envs": 16},
        "heuristic": {"warmup_epochs": 8, "plateau_epochs": 3},
    },
}
