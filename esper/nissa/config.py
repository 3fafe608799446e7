"""Telemetry profiles: one pydantic model, YAML files shipped as package data, CLI overrides.

The named profiles are package data (``esper/nissa/profiles/*.yaml``), read through
``importlib.resources`` so they load from an installed wheel as well as from a checkout; the
repository's top-level ``profiles/`` holds identical copies (a test keeps them in sync).
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROFILE_NAMES: tuple[str, ...] = ("minimal", "standard", "diagnostic", "research")


def profiles_dir() -> Traversable:
    """The packaged profile directory (``esper.nissa``'s ``profiles/``), wherever installed."""
    return resources.files("esper.nissa").joinpath("profiles")


class ProfileError(ValueError):
    """A profile file, name or override is invalid; the message names the field or key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class GradientConfig(_Strict):
    """Per-layer gradient statistics (computed by ``esper_kernels.grad_stats``)."""

    enabled: bool = False
    layers: Literal["all"] | list[str] = "all"
    track_norm: bool = True
    track_std: bool = False
    percentiles: list[float] = Field(default_factory=list)
    detect_vanishing: bool = True
    detect_exploding: bool = True
    vanishing_threshold: float = Field(1e-7, gt=0.0)
    exploding_threshold: float = Field(1e3, gt=0.0)
    full_histogram: bool = False
    histogram_bins: int = Field(32, ge=2, le=1024)
    histogram_range: tuple[float, float] = (-0.05, 0.05)

    @field_validator("layers")
    @classmethod
    def _layers_nonempty(cls, v: Literal["all"] | list[str]) -> Literal["all"] | list[str]:
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("layers must be 'all' or a non-empty list of distinct layer names")
        return v

    @field_validator("percentiles")
    @classmethod
    def _percentiles_in_range(cls, v: list[float]) -> list[float]:
        bad = [q for q in v if not 0.0 <= q <= 100.0]
        if bad:
            raise ValueError(f"percentiles must lie in [0, 100], got {bad}")
        if len(set(v)) != len(v):
            raise ValueError("percentiles must be distinct")
        return sorted(v)

    @model_validator(mode="after")
    def _check(self) -> GradientConfig:
        if self.vanishing_threshold >= self.exploding_threshold:
            raise ValueError("vanishing_threshold must be below exploding_threshold")
        lo, hi = self.histogram_range
        if not lo < hi:
            raise ValueError(f"histogram_range must be (low, high) with low < high, got {lo, hi}")
        return self


class PerClassConfig(_Strict):
    """Per-class accuracy / loss / confusion from logits and labels."""

    enabled: bool = False
    track_accuracy: bool = True
    track_loss: bool = False
    track_confusion: bool = False


class LossLandscapeConfig(_Strict):
    """Sharpness by batched random perturbation of the parameters."""

    enabled: bool = False
    perturbation_samples: int = Field(4, ge=1, le=256)
    perturbation_scale: float = Field(1e-2, gt=0.0, le=1.0)
    estimate_sharpness: bool = True


class TelemetryConfig(_Strict):
    """A telemetry profile: which diagnostics are computed, and where escalation goes."""

    name: str = "custom"
    history_length: int = Field(10, ge=2, le=10_000)
    gradients: GradientConfig = Field(default_factory=GradientConfig)
    per_class: PerClassConfig = Field(default_factory=PerClassConfig)
    loss_landscape: LossLandscapeConfig = Field(default_factory=LossLandscapeConfig)
    track_weight_norms: bool = False
    track_activation_stats: bool = False
    escalate_to: str | None = None
    escalation_epochs: int = Field(3, ge=1, le=1000)
    hindsight_epochs: int = Field(5, ge=1, le=1000, description="epochs after a decision its hindsight is judged")

    @field_validator("escalate_to")
    @classmethod
    def _known_profile(cls, v: str | None) -> str | None:
        if v is not None and v not in PROFILE_NAMES:
            raise ValueError(f"escalate_to must be one of {list(PROFILE_NAMES)} or null, got {v!r}")
        return v


def _format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def validate_config(data: Any, source: str) -> TelemetryConfig:
    """Validate a mapping as a ``TelemetryConfig``; errors name each bad field."""
    if not isinstance(data, dict):
        raise ProfileError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return TelemetryConfig.model_validate(data)
    except ValidationError as err:
        raise ProfileError(f"{source}: {_format_errors(err)}") from err


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: PyYAML's own text spans several lines (a source excerpt and a
    caret), which would break the CLIs' one-line ``error: ...`` format."""
    mark = getattr(err, "problem_mark", None)
    what = "; ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x)
    what = what or " ".join(str(err).split())
    return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else what


def load_profile_file(path: str | Path | Traversable) -> TelemetryConfig:
    """Load and validate one YAML profile file (a path or an ``importlib.resources`` file)."""
    p = path if isinstance(path, Traversable) else Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise ProfileError(f"cannot read profile file {p}: {err}") from err
    except yaml.YAMLError as err:
        raise ProfileError(f"{p}: invalid YAML: {yaml_problem(err)}") from err
    return validate_config(data if data is not None else {}, str(p))


def available_profiles() -> list[str]:
    """Names of the packaged profiles."""
    return sorted(q.name[: -len(".yaml")] for q in profiles_dir().iterdir() if q.name.endswith(".yaml"))


def load_profile(name: str) -> TelemetryConfig:
    """Load a named profile from the package data (``esper/nissa/profiles/<name>.yaml``)."""
    path = profiles_dir().joinpath(f"{name}.yaml")
    if not path.is_file():
        raise ProfileError(f"unknown telemetry profile {name!r}; available: {available_profiles()}")
    return load_profile_file(path)


def apply_overrides(cfg: TelemetryConfig, overrides: list[str]) -> TelemetryConfig:
    """Return a re-validated copy of ``cfg`` with ``dotted.key=value`` overrides applied.

    Values are parsed with ``yaml.safe_load`` (``true``, ``20``, ``[1, 50]``, ``null``).
    """
    data = cfg.model_dump(mode="python")
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ProfileError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ProfileError(f"override {key!r}: cannot parse value {raw!r}: {yaml_problem(err)}") from err
        node: Any = data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:depth]) or "<root>"
                known = sorted(node) if isinstance(node, dict) else []
                raise ProfileError(
                    f"override {key!r}: unknown key {part!r} under {where}; known: {known}"
                )
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return validate_config(data, f"overrides {overrides}")
