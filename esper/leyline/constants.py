"""Constants shared by every subsystem."""

from __future__ import annotations

from enum import IntEnum

# Slots in canonical order: features and masks are always laid out in this order.
CANONICAL_SLOTS: tuple[str, ...] = ("early", "mid", "late")

# Blending tempos (epochs for alpha to go from 0 to its target).
TEMPOS: tuple[int, ...] = (3, 5, 8)


class AlphaSchedule(IntEnum):
    """Shape of the alpha ramp while blending."""

    LINEAR = 0
    COSINE = 1
    SIGMOID = 2


class GateId(IntEnum):
    """Quality gates, one per lifecycle step (reference system's G0-G5)."""

    G0_GERMINATE = 0
    G1_TRAINING = 1
    G2_BLENDING = 2
    G3_SHADOWING = 3
    G4_PROBATIONARY = 4
    G5_FOSSILIZE = 5


NUM_GATES = len(GateId)


class GateReason(IntEnum):
    """Why a gate passed or failed; reported per env and slot for telemetry."""

    PASSED = 0
    WRONG_STAGE = 1
    NO_FREE_SLOT = 2
    TOO_FEW_EPOCHS = 3
    GRADIENT_UNHEALTHY = 4
    GRADIENT_RATIO_LOW = 5
    NO_IMPROVEMENT = 6
    ALPHA_NOT_REACHED = 7
    REGRESSION = 8
    CONTRIBUTION_LOW = 9
    EMBARGOED = 10


def ordered_slots(enabled: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The enabled slots in canonical order; unknown names are refused."""
    unknown = sorted(set(enabled) - set(CANONICAL_SLOTS))
    if unknown:
        raise ValueError(f"unknown slot(s) {unknown}; allowed: {list(CANONICAL_SLOTS)}")
    return tuple(s for s in CANONICAL_SLOTS if s in set(enabled))
