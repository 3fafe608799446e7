"""Slot state for N envs and its lifecycle operations as masked tensor updates.

Each slot's state is a TensorDict with batch ``[N]``. Every operation takes a request mask
``[N]``, checks the requested moves against Leyline's transition table as one tensor lookup,
applies them with ``torch.where`` and returns the accepted mask: a refused env is untouched.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from esper.kasmina.gates import GateConfig
from esper.kasmina.schedules import alpha_ramp
from esper.leyline import (
    COMPUTING_STAGES,
    ISOLATED_STAGES,
    LIVE_STAGES,
    MEASURED_STAGES,
    TEMPOS,
    AlphaSchedule,
    SeedStage,
    stage_mask,
    transition_table,
    valid_transitions_mask,
)

S = SeedStage
# Derived from Leyline's predicates (defined there once): a seed trains with its own learning
# rate while it is live and computing (TRAINING..PROBATIONARY; fossilized seeds train as host),
# and it trains straight-through (the host never sees its gradient) while it is isolated and
# computing (TRAINING: a GERMINATED seed does not compute yet).
TRAINABLE_STAGES = LIVE_STAGES & COMPUTING_STAGES
STRAIGHT_THROUGH_STAGES = ISOLATED_STAGES & COMPUTING_STAGES


def new_slot_state(n: int, device: torch.device | str) -> TensorDict:
    """All slots start DORMANT with alpha 0."""
    long = {"dtype": torch.long, "device": device}
    flt = {"dtype": torch.float32, "device": device}
    return TensorDict(
        {
            "stage": torch.full((n,), int(S.DORMANT), **long),
            "blueprint": torch.zeros(n, **long),
            "schedule": torch.zeros(n, **long),
            "tempo": torch.full((n,), TEMPOS[1], **long),
            "alpha": torch.zeros(n, **flt),
            "blend_step": torch.zeros(n, **long),
            "epochs_in_stage": torch.zeros(n, **long),
            "seed_age": torch.zeros(n, **long),
            "embargo_left": torch.zeros(n, **long),
            "germinations": torch.zeros(n, **long),
            "contribution": torch.zeros(n, **flt),
            "acc_at_germination": torch.zeros(n, **flt),
        },
        batch_size=[n],
        device=device,
    )


class Lifecycle:
    """Lifecycle operations over the slot states of N envs (lookup tables live on the device)."""

    def __init__(
        self,
        gates: GateConfig,
        device: torch.device | str,
        schedule: AlphaSchedule | int | str = AlphaSchedule.LINEAR,
    ) -> None:
        self.gates = gates
        # The blending ramp of seeds germinated here (``kasmina.alpha_schedule``).
        self.schedule = AlphaSchedule[schedule.upper()] if isinstance(schedule, str) else AlphaSchedule(schedule)
        self.table = transition_table(device)
        self.live = stage_mask(LIVE_STAGES, device)
        self.blended = stage_mask(MEASURED_STAGES, device)
        self.isolated = stage_mask(STRAIGHT_THROUGH_STAGES, device)
        self.trainable = stage_mask(TRAINABLE_STAGES, device)
        self.tempos = torch.tensor(TEMPOS, device=device)

    def _move(self, slot: TensorDict, request: torch.Tensor, target: int) -> torch.Tensor:
        stage = slot["stage"]
        accepted = request & valid_transitions_mask(self.table, stage, torch.full_like(stage, target))
        slot["stage"] = torch.where(accepted, torch.full_like(stage, target), stage)
        slot["epochs_in_stage"] = torch.where(accepted, torch.zeros_like(stage), slot["epochs_in_stage"])
        return accepted

    def germinate(
        self,
        slot: TensorDict,
        request: torch.Tensor,
        blueprint: torch.Tensor,
        tempo_index: torch.Tensor,
        num_blueprints: int,
        val_acc: torch.Tensor,
        schedule: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DORMANT -> GERMINATED for requested envs whose blueprint and tempo are in range.

        The caller re-initializes the accepted envs' seed parameters and optimizer state.
        """
        in_range = (blueprint >= 0) & (blueprint < num_blueprints)
        in_range &= (tempo_index >= 0) & (tempo_index < len(TEMPOS))
        accepted = self._move(slot, request & in_range, int(S.GERMINATED))
        tempo = self.tempos[tempo_index.clamp(0, len(TEMPOS) - 1)]
        sched = schedule if schedule is not None else torch.full_like(blueprint, int(self.schedule))
        slot["blueprint"] = torch.where(accepted, blueprint, slot["blueprint"])
        slot["tempo"] = torch.where(accepted, tempo, slot["tempo"])
        slot["schedule"] = torch.where(accepted, sched, slot["schedule"])
        zero_l = torch.zeros_like(slot["seed_age"])
        zero_f = torch.zeros_like(slot["alpha"])
        for key in ("seed_age", "blend_step"):
            slot[key] = torch.where(accepted, zero_l, slot[key])
        for key in ("alpha", "contribution"):
            slot[key] = torch.where(accepted, zero_f, slot[key])
        slot["acc_at_germination"] = torch.where(accepted, val_acc, slot["acc_at_germination"])
        slot["germinations"] = slot["germinations"] + accepted.long()
        return accepted

    def advance(self, slot: TensorDict, request: torch.Tensor, gate_pass: torch.Tensor) -> torch.Tensor:
        """One step along the success path (not FOSSILIZED: that is :meth:`fossilize`).

        ``gate_pass`` is ``[N, num_gates]``: the gate guarding each env's next stage must pass.
        """
        stage = slot["stage"]
        nxt = stage + 1
        guarded = (stage >= S.GERMINATED) & (stage <= S.SHADOWING)
        # Gate guarding GERMINATED->TRAINING is G1 (index 1), TRAINING->BLENDING G2, ...
        gate_index = (stage - int(S.GERMINATED) + 1).clamp(0, gate_pass.shape[-1] - 1)
        gate_ok = gate_pass.gather(-1, gate_index.unsqueeze(-1)).squeeze(-1)
        accepted = request & guarded & gate_ok & valid_transitions_mask(self.table, stage, nxt.clamp(max=S.RESETTING))
        slot["stage"] = torch.where(accepted, nxt, stage)
        slot["epochs_in_stage"] = torch.where(accepted, torch.zeros_like(stage), slot["epochs_in_stage"])
        # Entering BLENDING: the first blending epoch already uses one ramp step.
        entered_blend = accepted & (nxt == S.BLENDING)
        slot["blend_step"] = torch.where(entered_blend, torch.ones_like(stage), slot["blend_step"])
        self._update_alpha(slot)
        return accepted

    def fossilize(self, slot: TensorDict, request: torch.Tensor, g5_pass: torch.Tensor) -> torch.Tensor:
        """PROBATIONARY -> FOSSILIZED when G5 (counterfactual contribution) passes."""
        accepted = self._move(slot, request & g5_pass, int(S.FOSSILIZED))
        slot["alpha"] = torch.where(accepted, torch.ones_like(slot["alpha"]), slot["alpha"])
        return accepted

    def cull(self, slot: TensorDict, request: torch.Tensor) -> torch.Tensor:
        """Any live seed -> CULLED; its output leaves the host at once (alpha 0)."""
        accepted = self._move(slot, request & self.live[slot["stage"]], int(S.CULLED))
        slot["alpha"] = torch.where(accepted, torch.zeros_like(slot["alpha"]), slot["alpha"])
        return accepted

    def end_epoch(self, slot: TensorDict) -> dict[str, torch.Tensor]:
        """Epoch boundary: age counters, ramp alpha, run the failure path's countdown.

        Returns the masks of the automatic moves made (for telemetry).
        """
        stage = slot["stage"]
        live = self.live[stage]
        slot["epochs_in_stage"] = slot["epochs_in_stage"] + 1
        slot["seed_age"] = slot["seed_age"] + (live | (stage == S.FOSSILIZED)).long()
        blending = stage == S.BLENDING
        slot["blend_step"] = torch.where(blending, (slot["blend_step"] + 1).clamp(max=slot["tempo"]), slot["blend_step"])
        self._update_alpha(slot)

        # Failure path: RESETTING -> DORMANT, EMBARGOED countdown -> RESETTING, CULLED -> EMBARGOED.
        reset_done = self._move(slot, stage == S.RESETTING, int(S.DORMANT))
        embargo_left = slot["embargo_left"] - (stage == S.EMBARGOED).long()
        slot["embargo_left"] = embargo_left
        embargo_done = self._move(slot, (stage == S.EMBARGOED) & (embargo_left <= 0), int(S.RESETTING))
        culled = stage == S.CULLED
        embargoed = self._move(slot, culled, int(S.EMBARGOED))
        slot["embargo_left"] = torch.where(
            embargoed, torch.full_like(embargo_left, self.gates.embargo_epochs), slot["embargo_left"]
        )
        return {"reset": reset_done, "embargo_end": embargo_done, "embargoed": embargoed}

    def _update_alpha(self, slot: TensorDict) -> None:
        stage = slot["stage"]
        progress = slot["blend_step"].float() / slot["tempo"].float()
        ramp = alpha_ramp(progress, slot["schedule"])  # 0 -> 1 over the tempo
        alpha = torch.where(stage == S.BLENDING, ramp, slot["alpha"])
        # Blending ends at full alpha: shadowing, probation and fossilized seeds run at 1.
        done = (stage == S.SHADOWING) | (stage == S.PROBATIONARY) | (stage == S.FOSSILIZED)
        alpha = torch.where(done, torch.ones_like(alpha), alpha)
        alpha = torch.where(self.blended[stage], alpha, torch.zeros_like(alpha))
        slot["alpha"] = alpha

    def controls(self, slot: TensorDict, seed_lr: float, host_lr: torch.Tensor, num_blueprints: int) -> dict[str, torch.Tensor]:
        """What the training step needs per env: alpha, straight-through, seed lr, blueprint."""
        stage = slot["stage"]
        isolated = self.isolated[stage].float()
        lr = torch.where(
            stage == S.FOSSILIZED,
            host_lr,  # fossilized seeds are host: they train at the host's (scheduled) rate
            self.trainable[stage].float() * seed_lr,
        )
        return {
            "alpha": slot["alpha"],
            "isolated": isolated,
            "lr": lr,
            "onehot": torch.nn.functional.one_hot(slot["blueprint"], num_blueprints).float(),
        }
