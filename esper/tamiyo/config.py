"""Thresholds of the rule-based Tamiyo (pydantic, validated, part of the training config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class HeuristicConfig(BaseModel):
    """When the heuristic germinates, advances, culls and fossilizes (accuracies in points)."""

    model_config = ConfigDict(extra="forbid")

    warmup_epochs: int = Field(3, ge=0, description="no germination before this epoch")
    plateau_epochs: int = Field(2, ge=1, description="window (epochs) over which the plateau is judged")
    plateau_delta: float = Field(
        2.0, ge=0.0,
        description="plateau: mean val-acc gain per epoch over the window below this (points)",
    )
    wait_for: Literal["live", "isolated", "nothing"] = Field(
        "isolated",
        description="germinate only when no seed is live (reference); once none is in "
        "isolated training (GERMINATED/TRAINING), so the next seed may train while one blends; "
        "or on any plateau with a free slot",
    )
    cull_cooldown: int = Field(3, ge=0, description="epochs after a cull before germinating")
    drop_threshold: float = Field(4.0, ge=0.0, description="cull when val acc fell this much (points; above epoch-to-epoch noise)")
    min_epochs_before_cull: int = Field(2, ge=0, description="epochs in stage before a drop cull")
    fossilize_threshold: float = Field(0.5, description="min contribution to fossilize")
    probation_patience: int = Field(2, ge=0, description="epochs in PROBATIONARY before culling")
    max_seeds: int = Field(3, ge=1, description="seeds (live + fossilized) per env at most")
    blueprints: tuple[str, ...] | None = Field(
        None, description="blueprints to rotate through (None: all but noop)"
    )
    tempo_index: int = Field(0, ge=0, le=2, description="index into leyline.TEMPOS")
    slot_preference: Literal["deepest", "shallowest"] = Field(
        "deepest", description="which free slot to grow into: deeper slots are wider"
    )
    cull_penalty: float = Field(1.0, ge=0.0, description="rotation penalty added on a cull")
    penalty_decay: float = Field(0.9, ge=0.0, le=1.0, description="per-epoch penalty decay")


class FeatureConfig(BaseModel):
    """Thresholds of the observation's trackers and health flags (accuracies in points)."""

    model_config = ConfigDict(extra="forbid")

    plateau_delta: float = Field(
        0.5, ge=0.0, description="an epoch whose val acc rose less than this counts towards plateau_epochs"
    )
    improvement_delta: float = Field(
        0.1, ge=0.0, description="val acc must beat its best by more than this to reset epochs_since_improvement"
    )
    grad_explode: float = Field(
        1e3, gt=0.0, description="a seed gradient norm at or above this is not healthy (seed_grad_healthy)"
    )
    observe: Literal["minimal", "standard", "diagnostic", "research"] = Field(
        "minimal",
        description="telemetry profile whose diagnostics the observation appends (standard: per-layer "
        "gradient norm and std; diagnostic/research: also per-class validation accuracy and loss); independent of the run's telemetry profile, so a policy's inputs never change "
        "when telemetry escalates",
    )


class FixedScheduleConfig(BaseModel):
    """The fixed growth schedule baseline: one blueprint germinated at set epochs."""

    model_config = ConfigDict(extra="forbid")

    blueprint: str = "conv_light"
    epochs: tuple[int, ...] = Field((4, 10, 16), min_length=1)
    tempo_index: int = Field(0, ge=0, le=2)
    slot_preference: Literal["deepest", "shallowest"] = "deepest"
