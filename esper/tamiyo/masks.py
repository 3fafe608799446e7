"""Action masks from slot stages and gate results: only actions Kasmina will accept are legal."""

from __future__ import annotations

import torch
from tensordict import TensorDict

from esper.leyline import LIVE_STAGES, NUM_OPS, TEMPOS, GateId, Op, SeedStage, stage_mask

S = SeedStage
MASK_KEYS: tuple[str, ...] = ("op_mask", "slot_mask", "blueprint_mask", "tempo_mask")
_LIVE: dict[torch.device, torch.Tensor] = {}  # LIVE_STAGES lookup per device, made once


def _live_lookup(device: torch.device) -> torch.Tensor:
    """The live-stage lookup on ``device``, cached: masks are built every epoch, and a fresh
    constant each time would be a host-to-device copy per call."""
    if device not in _LIVE:
        _LIVE[device] = stage_mask(LIVE_STAGES, device)
    return _LIVE[device]


def action_masks(
    stage: torch.Tensor,
    gate_pass: torch.Tensor,
    num_blueprints: int,
    blueprint_allowed: torch.Tensor | None = None,
) -> TensorDict:
    """Legal actions per env from ``stage [N, S]`` and ``gate_pass [N, S, 6]``.

    Returns ``op_mask [N, 5]``, ``slot_mask [N, 5, S]`` (legal slots per op),
    ``blueprint_mask [N, B]`` and ``tempo_mask [N, 3]``. WAIT is always legal; an op is
    legal when at least one slot is legal for it (WAIT's slot row is all True: ignored). ADVANCE is offered only from TRAINING (G2):
    the other success-path moves are automatic.
    """
    n, _n_slots = stage.shape
    live = _live_lookup(stage.device)[stage]
    slot_mask = torch.stack(
        [
            torch.ones_like(live),  # WAIT ignores the slot head: any slot is fine
            stage == S.DORMANT,
            (stage == S.TRAINING) & gate_pass[..., GateId.G2_BLENDING],
            live,
            (stage == S.PROBATIONARY) & gate_pass[..., GateId.G5_FOSSILIZE],
        ],
        dim=1,
    )  # [N, 5, S]
    if blueprint_allowed is None:
        bp = torch.ones(n, num_blueprints, dtype=torch.bool, device=stage.device)
    else:
        bp = blueprint_allowed.to(torch.bool).expand(n, num_blueprints).clone()
    slot_mask[:, Op.GERMINATE] &= bp.any(dim=1, keepdim=True)
    op_mask = slot_mask.any(dim=2)
    op_mask[:, Op.WAIT] = True
    assert op_mask.shape[1] == NUM_OPS
    return TensorDict(
        {
            "op_mask": op_mask,
            "slot_mask": slot_mask,
            "blueprint_mask": bp,
            "tempo_mask": torch.ones(n, len(TEMPOS), dtype=torch.bool, device=stage.device),
        },
        batch_size=[n],
        device=stage.device,
    )
