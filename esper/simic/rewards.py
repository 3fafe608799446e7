"""The reward, computed per env on the device and returned component by component.

Three families (``RewardConfig.mode``): ``shaped`` (every component), ``simplified`` (shaping,
action costs, terminal) and ``sparse`` (terminal only). A dropped component is computed and
multiplied by 0, so every family logs the same components and ``total`` is always their sum.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from tensordict import TensorDict

from esper.leyline import NUM_STAGES, PRESENT_STAGES, Op, SeedStage, stage_mask
from esper.simic.config import RewardConfig

S = SeedStage

# Potential of a slot's stage: progress along the success path (failure path and empty: 0).
STAGE_POTENTIAL: dict[SeedStage, float] = {
    S.GERMINATED: 1.0,
    S.TRAINING: 2.0,
    S.BLENDING: 3.0,
    S.SHADOWING: 4.0,
    S.PROBATIONARY: 5.0,
    S.FOSSILIZED: 6.0,
}


# The components each reward family pays.
MODE_TERMS: dict[str, frozenset[str]] = {
    "shaped": frozenset({"contribution", "shaping", "rent", "action_cost", "fossilize", "terminal"}),
    "simplified": frozenset({"shaping", "action_cost", "terminal"}),
    "sparse": frozenset({"terminal"}),
}


@dataclass(slots=True)
class RewardComponents:
    """Per-env ``[N]`` reward terms; ``total`` is their sum."""

    contribution: torch.Tensor
    shaping: torch.Tensor
    rent: torch.Tensor
    action_cost: torch.Tensor
    fossilize: torch.Tensor
    terminal: torch.Tensor
    total: torch.Tensor

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {
            "contribution": self.contribution,
            "shaping": self.shaping,
            "rent": self.rent,
            "action_cost": self.action_cost,
            "fossilize": self.fossilize,
            "terminal": self.terminal,
            "total": self.total,
        }

    def to_tensordict(self) -> TensorDict:
        return TensorDict(self.to_dict(), batch_size=self.total.shape)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


class ShapedReward:
    """Reward from one epoch's Kasmina signals, the requested op and the episode-end mask."""

    def __init__(self, cfg: RewardConfig, host_params: float, device: torch.device | str,
                 gamma: float) -> None:
        self.cfg = cfg
        self.gamma = gamma
        self.host_params = host_params
        pot = torch.zeros(NUM_STAGES)
        for stage, value in STAGE_POTENTIAL.items():
            pot[stage] = value
        self.potential = pot.to(device)
        self.host_potential = pot.numpy()  # the same table on the host (the governor's rollback term)
        # Seeds whose counterfactual contribution is paid: live ones and fossilized ones. Paying
        # live seeds only (the reference design) made never fossilizing pay: a 20-round PPO run
        # learned to keep seeds in limbo (README, "Longer training games the reward").
        self.present = stage_mask(PRESENT_STAGES, device)
        cost = torch.zeros(len(Op))
        cost[Op.GERMINATE] = cfg.germinate_cost
        cost[Op.ADVANCE] = cfg.advance_cost
        cost[Op.CULL] = cfg.cull_cost
        cost[Op.FOSSILIZE] = cfg.fossilize_cost
        self.op_cost = cost.to(device)
        self.terms = MODE_TERMS[cfg.mode]

    def phi(self, stage: torch.Tensor) -> torch.Tensor:
        """Potential of an env's slots ``[N, S] -> [N]``."""
        return self.cfg.shaping * self.potential[stage].sum(dim=1)

    def __call__(self, signals: TensorDict, op: torch.Tensor, end: torch.Tensor) -> RewardComponents:
        cfg = self.cfg
        stage, before = signals["stage"], signals["stage_before"]
        measured = self.present[stage] & (signals["alpha"] > 0)
        contribution = cfg.contribution * 0.01 * torch.where(measured, signals["contribution"], 0.0).sum(1)
        # Potential-based shaping (Ng et al. 1999) with the learner's discount; the final state's
        # potential is 0, so over an episode the *discounted* shaping terms sum to -Phi(s_0) (0: no
        # seed at the start) whatever the policy. Their undiscounted sum, in the reported return,
        # is -(1 - gamma) * sum_t Phi(s_t) and does depend on the policy.
        shaping = self.gamma * torch.where(end, 0.0, self.phi(stage)) - self.phi(before)
        rent = -cfg.rent * torch.log1p(signals["params_added"] / self.host_params)
        action_cost = -self.op_cost[op.long()]
        fossilized = ((stage == S.FOSSILIZED) & (before == S.PROBATIONARY)).sum(1).float()
        fossilize = cfg.fossilize_bonus * fossilized
        terminal = torch.where(end, cfg.terminal * 0.01 * signals["val_acc"], 0.0)
        parts = {"contribution": contribution, "shaping": shaping, "rent": rent, "action_cost": action_cost,
                 "fossilize": fossilize, "terminal": terminal}
        parts = {k: v if k in self.terms else torch.zeros_like(v) for k, v in parts.items()}
        total = sum(parts.values())
        return RewardComponents(**parts, total=total)
