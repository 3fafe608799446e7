"""Seed lifecycle stages and the transition table, as Python and as a device tensor."""

from __future__ import annotations

from enum import IntEnum

import torch


class SeedStage(IntEnum):
    """The 11 stages a seed slot can be in; values index tensors, so never reorder."""

    UNKNOWN = 0
    DORMANT = 1
    GERMINATED = 2
    TRAINING = 3
    BLENDING = 4
    SHADOWING = 5
    PROBATIONARY = 6
    FOSSILIZED = 7
    CULLED = 8
    EMBARGOED = 9
    RESETTING = 10


NUM_STAGES = len(SeedStage)

_S = SeedStage
# Success path DORMANT -> ... -> FOSSILIZED; any live stage may be culled;
# failure path CULLED -> EMBARGOED -> RESETTING -> DORMANT.
VALID_TRANSITIONS: dict[SeedStage, frozenset[SeedStage]] = {
    _S.UNKNOWN: frozenset({_S.DORMANT}),
    _S.DORMANT: frozenset({_S.GERMINATED}),
    _S.GERMINATED: frozenset({_S.TRAINING, _S.CULLED}),
    _S.TRAINING: frozenset({_S.BLENDING, _S.CULLED}),
    _S.BLENDING: frozenset({_S.SHADOWING, _S.CULLED}),
    _S.SHADOWING: frozenset({_S.PROBATIONARY, _S.CULLED}),
    _S.PROBATIONARY: frozenset({_S.FOSSILIZED, _S.CULLED}),
    _S.FOSSILIZED: frozenset(),
    _S.CULLED: frozenset({_S.EMBARGOED}),
    _S.EMBARGOED: frozenset({_S.RESETTING}),
    _S.RESETTING: frozenset({_S.DORMANT}),
}

# Stage predicates, defined once here; every package reads these (never its own copy).
#
# LIVE: a seed exists and is not permanent yet, so it may be culled (GERMINATED..PROBATIONARY).
LIVE_STAGES: frozenset[SeedStage] = frozenset(
    {_S.GERMINATED, _S.TRAINING, _S.BLENDING, _S.SHADOWING, _S.PROBATIONARY}
)
# PRESENT: the seed's parameters belong to the model (live or fossilized): seed counts, rent.
PRESENT_STAGES: frozenset[SeedStage] = LIVE_STAGES | {_S.FOSSILIZED}
# ISOLATED: the seed exists but does not reach the host yet (alpha 0, the host never sees its
# gradient): GERMINATED and TRAINING, i.e. live and not yet blended.
ISOLATED_STAGES: frozenset[SeedStage] = frozenset({_S.GERMINATED, _S.TRAINING})
# COMPUTING: the seed's module runs in forward. A GERMINATED seed is allocated this epoch and
# first computes at the next (G1 -> TRAINING is automatic at the epoch boundary).
COMPUTING_STAGES: frozenset[SeedStage] = frozenset(
    {_S.TRAINING, _S.BLENDING, _S.SHADOWING, _S.PROBATIONARY, _S.FOSSILIZED}
)
# MEASURED: the seed's output is blended in (alpha > 0), so its counterfactual contribution
# (validation accuracy with the slot's alpha forced to 0 versus actual) is measured.
MEASURED_STAGES: frozenset[SeedStage] = frozenset(
    {_S.BLENDING, _S.SHADOWING, _S.PROBATIONARY, _S.FOSSILIZED}
)
FAILURE_STAGES: frozenset[SeedStage] = frozenset({_S.CULLED, _S.EMBARGOED, _S.RESETTING})
TERMINAL_STAGES: frozenset[SeedStage] = frozenset({_S.FOSSILIZED, _S.CULLED})


class StageTransitionError(ValueError):
    """A requested lifecycle move that the transition table does not allow."""

    def __init__(self, source: SeedStage, target: SeedStage) -> None:
        allowed = sorted(VALID_TRANSITIONS[source])
        names = ", ".join(s.name for s in allowed) or "none (terminal)"
        super().__init__(
            f"invalid seed transition {source.name} -> {target.name}; "
            f"allowed from {source.name}: {names}"
        )
        self.source = source
        self.target = target


def is_valid_transition(source: SeedStage | int, target: SeedStage | int) -> bool:
    return SeedStage(target) in VALID_TRANSITIONS[SeedStage(source)]


def check_transition(source: SeedStage | int, target: SeedStage | int) -> None:
    """Raise :class:`StageTransitionError` unless ``source -> target`` is allowed."""
    if not is_valid_transition(source, target):
        raise StageTransitionError(SeedStage(source), SeedStage(target))


def is_terminal_stage(stage: SeedStage | int) -> bool:
    """Terminal for a seed's life: fossilized for good, or culled."""
    return SeedStage(stage) in TERMINAL_STAGES


def is_failure_stage(stage: SeedStage | int) -> bool:
    return SeedStage(stage) in FAILURE_STAGES


def is_live(stage: SeedStage | int) -> bool:
    return SeedStage(stage) in LIVE_STAGES


def is_isolated(stage: SeedStage | int) -> bool:
    return SeedStage(stage) in ISOLATED_STAGES


def is_computing(stage: SeedStage | int) -> bool:
    return SeedStage(stage) in COMPUTING_STAGES


def is_measured(stage: SeedStage | int) -> bool:
    return SeedStage(stage) in MEASURED_STAGES


def transition_table(device: torch.device | str | None = None) -> torch.Tensor:
    """``[NUM_STAGES, NUM_STAGES]`` bool tensor; ``table[src, dst]`` is True when allowed."""
    table = torch.zeros(NUM_STAGES, NUM_STAGES, dtype=torch.bool)
    for src, targets in VALID_TRANSITIONS.items():
        for dst in targets:
            table[src, dst] = True
    return table.to(device) if device is not None else table


def stage_mask(stages: frozenset[SeedStage], device: torch.device | str | None = None) -> torch.Tensor:
    """``[NUM_STAGES]`` bool lookup: ``mask[stage]`` is True for members of ``stages``.

    Made on ``device`` in one host-to-device copy: a constant for its callers to keep (as a
    buffer or per-device cache), never to rebuild in a per-epoch path.
    """
    members = {int(s) for s in stages}
    return torch.tensor([i in members for i in range(NUM_STAGES)], dtype=torch.bool, device=device)


def valid_transitions_mask(
    table: torch.Tensor, source: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Check a batch of requested transitions at once: a bool tensor shaped like ``source``."""
    return table[source.long(), target.long()]
