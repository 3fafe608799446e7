"""The PPO pieces Esper adds to torchrl's: the factored loss, the step-masked GAE, the env as
the policy sees it, the network sizes and the explained variance.

Hand-written only what torchrl lacks: the per-head entropy of the factored distribution
(:class:`FactoredPPOLoss`), value-target normalization inside the critic loss (the hook
torchrl's MAPPO uses), and the rolled-back steps' validity fed to torchrl's ``shifted_valid``
(:class:`StepMaskedGAE`).
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDictBase
from torchrl.envs import TransformedEnv
from torchrl.modules.value_norm import RunningValueNorm
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from esper.kasmina.blueprints import blueprint_catalogue
from esper.simic.config import TrainingConfig
from esper.simic.env import MorphogeneticEnv
from esper.tamiyo.lstm_policy import FactoredActionDistribution, PolicyShape

WAIT_BIAS = 1.0  # the initial actor's bias toward WAIT (PPO and offline pretraining alike)


class FactoredPPOLoss(ClipPPOLoss):
    """ClipPPOLoss with the factored distribution's own per-head entropy and a value normalizer.

    torchrl's composite entropy calls each component's ``entropy()`` independently, which would
    count heads irrelevant to the op; the factored distribution weights them itself. The critic
    loss is computed on normalized targets and predictions (``_critic_loss_inputs``, the hook
    torchrl's MAPPO uses for value normalization); the normalizer is updated once per batch by
    the trainer, not per minibatch.
    """

    def __init__(self, *args: Any, value_norm: RunningValueNorm, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.value_norm = value_norm

    def _get_entropy(self, dist: torch.distributions.Distribution, adv_shape: torch.Size) -> Any:
        if isinstance(dist, FactoredActionDistribution):
            entropy = dist.entropy()
            entropy.batch_size = adv_shape
            return entropy.unsqueeze(-1)
        return super()._get_entropy(dist, adv_shape)

    def _critic_loss_inputs(
        self, target_return: torch.Tensor, state_value: torch.Tensor, old_state_value: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        vn = self.value_norm
        old = vn.normalize(old_state_value) if old_state_value is not None else None
        return vn.normalize(target_return.detach()), vn.normalize(state_value), old


VALID_KEY = "shifted_valid"  # torchrl's per-step validity: GAE truncates before it, the loss masks by it


class StepMaskedGAE(GAE):
    """torchrl's GAE with the steps the governor rolled back (``("next", "rolled_back")``) marked
    invalid, through torchrl's own ``shifted_valid`` path: the step before an invalid one is
    truncated (it bootstraps from the value of the state the rolled-back step started in), the
    invalid step's advantage and target are 0, and ClipPPOLoss leaves it out of every loss term."""

    def _call_value_nets(self, data: TensorDictBase, *args: Any, **kwargs: Any) -> Any:
        value, next_value, valid = super()._call_value_nets(data, *args, **kwargs)
        rolled = data.get(("next", "rolled_back"), None)
        if rolled is not None:
            ok = ~rolled.reshape(value.shape[:-1])
            valid = ok if valid is None else valid & ok
        return value, next_value, valid


class RecurrentEnv(TransformedEnv):
    """The env as the policy sees it (recurrent-state primer, init tracker).

    torchrl's auto-reset test is answered by the base env's host snapshot, as without the
    transforms, so collection keeps one device-to-host transfer per epoch.
    """

    def any_done(self, tensordict: TensorDictBase) -> bool:
        return self.base_env.any_done(tensordict)

    def _reset_check_done(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> None:
        self.base_env._reset_check_done(tensordict, tensordict_reset)


def policy_shape(cfg: TrainingConfig, env: MorphogeneticEnv) -> PolicyShape:
    """Network sizes for ``env`` under ``cfg``."""
    sizes = env.action_spec
    catalogue = blueprint_catalogue()
    return PolicyShape(
        obs_size=env.schema.size,
        n_slots=int(sizes["slot"].space.n),
        n_blueprints=len(catalogue),
        n_tempos=int(sizes["tempo"].space.n),
        hidden_size=cfg.ppo.hidden_size,
        lstm_hidden_size=cfg.ppo.lstm_hidden_size,
        blueprints=catalogue,
    )


def explained_variance(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - Var(target - pred) / Var(target)`` over the ``valid`` steps (0 when the target is
    constant), on the device."""
    w = torch.ones_like(target) if valid is None else valid.to(target.dtype)
    while w.dim() < target.dim():
        w = w.unsqueeze(-1)
    w = w.expand_as(target)
    count = w.sum().clamp_min(2.0)

    def var(x: torch.Tensor) -> torch.Tensor:
        mean = (x * w).sum() / count
        return ((x - mean).pow(2) * w).sum() / (count - 1)

    v = var(target)
    ev = 1.0 - var(target - pred) / v.clamp_min(1e-12)
    return torch.where(v > 1e-12, ev, torch.zeros_like(ev))
