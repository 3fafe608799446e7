"""Decision reason codes: why a controller chose its action (one per env per epoch).

Policies write ``reason`` (an index into :data:`REASONS`, -1 for none); the runner reports
the name (``REASONS[i]``, e.g. ``"germinate_plateau"``) and Nissa's narratives put it in words.
"""

from __future__ import annotations

from enum import IntEnum


class Reason(IntEnum):
    """Why a controller chose what it chose; values index :data:`REASONS`, so never reorder."""

    WAIT_WARMUP = 0
    WAIT_SEED_LIVE = 1
    WAIT_NO_PLATEAU = 2
    WAIT_COOLDOWN = 3
    WAIT_NO_SLOT = 4
    WAIT_MAX_SEEDS = 5
    GERMINATE_PLATEAU = 6
    ADVANCE_GATE_PASSED = 7
    CULL_ACC_DROP = 8
    FOSSILIZE_CONTRIBUTION = 9
    CULL_LOW_CONTRIBUTION = 10
    WAIT_SCHEDULE = 11
    GERMINATE_SCHEDULE = 12
    RANDOM = 13
    STATIC = 14


# The names the runner sends with each decision (lower case), indexed by reason code.
REASONS: tuple[str, ...] = tuple(r.name.lower() for r in Reason)


def reason_from_name(name: str) -> Reason | None:
    """The code of a reason name (either case), or None when it is not one."""
    return Reason.__members__.get(name.strip().upper())
