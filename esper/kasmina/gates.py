"""Quality gates G0-G5, evaluated as tensors for every env and slot at once."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from esper.leyline import GateId, GateReason, SeedStage

S = SeedStage


class GateConfig(BaseModel):
    """Thresholds of the lifecycle gates (reference-system semantics)."""

    model_config = ConfigDict(extra="forbid")

    min_training_epochs: int = Field(3, ge=0, description="G2: epochs in TRAINING first")
    grad_ratio_floor: float = Field(0.01, ge=0.0, description="G2: seed/host grad-norm ratio")
    grad_explode: float = Field(1e3, gt=0.0, description="G2: seed grad norm above this is unhealthy")
    improvement_threshold: float | None = Field(
        None, description="G2 (optional): val-acc gain since germination, in accuracy points"
    )
    shadow_epochs: int = Field(1, ge=0, description="G4: epochs in SHADOWING first")
    regression_tolerance: float = Field(0.5, ge=0.0, description="G4: allowed contribution < 0, points")
    min_probation_epochs: int = Field(1, ge=0, description="G5: epochs in PROBATIONARY first")
    fossilize_threshold: float = Field(0.5, description="G5: counterfactual contribution, points")
    embargo_epochs: int = Field(3, ge=1, description="epochs a slot stays EMBARGOED after a cull")


def evaluate_gates(
    cfg: GateConfig,
    stage: torch.Tensor,
    epochs_in_stage: torch.Tensor,
    alpha: torch.Tensor,
    seed_grad_norm: torch.Tensor,
    host_grad_norm: torch.Tensor,
    contribution: torch.Tensor,
    acc_gain: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass/fail ``[N, S, 6]`` bool and reason code ``[N, S, 6]`` long for every gate.

    Inputs are ``[N, S]``; contributions and gains are in accuracy points. A gate whose
    stage does not match reports WRONG_STAGE, so every entry carries a reason.
    """
    R = GateReason
    shape = stage.shape
    device = stage.device

    def code(value: int) -> torch.Tensor:
        return torch.full(shape, int(value), dtype=torch.long, device=device)

    passes: list[torch.Tensor] = []
    reasons: list[torch.Tensor] = []

    # G0: a free (DORMANT) slot; EMBARGOED slots say so.
    g0 = stage == S.DORMANT
    r0 = torch.where(g0, code(R.PASSED), torch.where(stage == S.EMBARGOED, code(R.EMBARGOED), code(R.NO_FREE_SLOT)))
    passes.append(g0)
    reasons.append(r0)

    # G1: a germinated seed starts training.
    g1 = stage == S.GERMINATED
    passes.append(g1)
    reasons.append(torch.where(g1, code(R.PASSED), code(R.WRONG_STAGE)))

    # G2: enough TRAINING epochs, healthy and non-negligible seed gradients, optional gain.
    in_training = stage == S.TRAINING
    enough = epochs_in_stage >= cfg.min_training_epochs
    healthy = torch.isfinite(seed_grad_norm) & (seed_grad_norm < cfg.grad_explode)
    ratio = seed_grad_norm / host_grad_norm.clamp_min(1e-12)
    ratio_ok = ratio >= cfg.grad_ratio_floor
    gain_ok = (
        acc_gain >= cfg.improvement_threshold
        if cfg.improvement_threshold is not None
        else torch.ones_like(in_training)
    )
    g2 = in_training & enough & healthy & ratio_ok & gain_ok
    r2 = code(R.PASSED)
    r2 = torch.where(~gain_ok, code(R.NO_IMPROVEMENT), r2)
    r2 = torch.where(~ratio_ok, code(R.GRADIENT_RATIO_LOW), r2)
    r2 = torch.where(~healthy, code(R.GRADIENT_UNHEALTHY), r2)
    r2 = torch.where(~enough, code(R.TOO_FEW_EPOCHS), r2)
    r2 = torch.where(~in_training, code(R.WRONG_STAGE), r2)
    passes.append(g2)
    reasons.append(r2)

    # G3: blending has ramped alpha all the way up (to 1).
    in_blending = stage == S.BLENDING
    reached = alpha >= 1.0 - 1e-6
    g3 = in_blending & reached
    r3 = torch.where(in_blending, torch.where(reached, code(R.PASSED), code(R.ALPHA_NOT_REACHED)), code(R.WRONG_STAGE))
    passes.append(g3)
    reasons.append(r3)

    # G4: shadowed long enough with no regression.
    in_shadow = stage == S.SHADOWING
    long_enough = epochs_in_stage >= cfg.shadow_epochs
    no_regression = contribution >= -cfg.regression_tolerance
    g4 = in_shadow & long_enough & no_regression
    r4 = torch.where(~no_regression, code(R.REGRESSION), code(R.PASSED))
    r4 = torch.where(~long_enough, code(R.TOO_FEW_EPOCHS), r4)
    r4 = torch.where(~in_shadow, code(R.WRONG_STAGE), r4)
    passes.append(g4)
    reasons.append(r4)

    # G5: measured counterfactual contribution above the fossilization threshold.
    in_probation = stage == S.PROBATIONARY
    probation_done = epochs_in_stage >= cfg.min_probation_epochs
    contributes = contribution > cfg.fossilize_threshold
    g5 = in_probation & probation_done & contributes
    r5 = torch.where(~contributes, code(R.CONTRIBUTION_LOW), code(R.PASSED))
    r5 = torch.where(~probation_done, code(R.TOO_FEW_EPOCHS), r5)
    r5 = torch.where(~in_probation, code(R.WRONG_STAGE), r5)
    passes.append(g5)
    reasons.append(r5)

    assert len(passes) == len(GateId)
    return torch.stack(passes, dim=-1), torch.stack(reasons, dim=-1)
