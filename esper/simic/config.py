"""The training configuration: one validated pydantic tree, JSON/YAML loading, the presets
(:mod:`esper.simic.presets`) by name. The task section is :mod:`esper.simic.task_config`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from esper.kasmina.blueprints import BLUEPRINTS, family_blueprints
from esper.kasmina.gates import GateConfig
from esper.kasmina.hosts import HOST_PRESETS
from esper.leyline import CANONICAL_SLOTS
from esper.nissa.config import yaml_problem
from esper.simic.errors import ConfigError
from esper.simic.presets import PRESETS
from esper.simic.task_config import Strict, TaskConfig
from esper.tamiyo.config import FeatureConfig, FixedScheduleConfig, HeuristicConfig


class KasminaSection(Strict):
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


class EpisodeConfig(Strict):
    """How long an episode is (one step = one host epoch) and how many envs run at once."""

    length: int = Field(30, ge=1)
    envs: int = Field(8, ge=1)
    episodes: int = Field(1, ge=1)
    seed: int = Field(0, ge=0)


REWARD_MODES = ("shaped", "simplified", "sparse")


class RewardConfig(Strict):
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


class PPOConfig(Strict):
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
    heldout_hosts: int = Field(8, ge=0, description="after every round, the greedy controller and the heuristic on "
                                                   "this many held-out hosts, at most episode.envs (simic.heldout); 0: no check")

    @model_validator(mode="after")
    def _heads(self) -> PPOConfig:
        unknown = sorted(set(self.entropy_coef) - {"op", "slot", "blueprint", "tempo"})
        if unknown:
            raise ValueError(f"entropy_coef has unknown heads {unknown}")
        return self


class TelemetrySection(Strict):
    """Which Nissa profile, where events go, and profile overrides (``key=value``)."""

    profile: str = "minimal"
    backends: list[str] = Field(default_factory=lambda: ["console"])
    overrides: list[str] = Field(default_factory=list)
    profile_file: str | None = None
    verbosity: int = Field(0, ge=0, le=3)
    prometheus_port: int = Field(9464, ge=0, le=65535,
                                 description="local port of the prometheus backend's /metrics (0: any free one)")


class FaultsConfig(Strict):
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


class TrainingConfig(Strict):
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
