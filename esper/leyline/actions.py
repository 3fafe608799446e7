"""The factored action space: op, slot, blueprint and tempo heads."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from esper.leyline.constants import CANONICAL_SLOTS, TEMPOS


class Op(IntEnum):
    """What the controller does this epoch; values index the op head."""

    WAIT = 0
    GERMINATE = 1
    ADVANCE = 2
    CULL = 3
    FOSSILIZE = 4


NUM_OPS = len(Op)
HEADS: tuple[str, ...] = ("op", "slot", "blueprint", "tempo")

# Which sub-heads carry meaning for each op; the others are ignored (and must not count
# towards log-probabilities or entropies).
HEADS_FOR_OP: dict[Op, frozenset[str]] = {
    Op.WAIT: frozenset({"op"}),
    Op.GERMINATE: frozenset({"op", "slot", "blueprint", "tempo"}),
    Op.ADVANCE: frozenset({"op", "slot"}),
    Op.CULL: frozenset({"op", "slot"}),
    Op.FOSSILIZE: frozenset({"op", "slot"}),
}


def head_relevance() -> dict[str, list[bool]]:
    """Per head, a list indexed by op value: does this head matter for that op?"""
    return {head: [head in HEADS_FOR_OP[op] for op in Op] for head in HEADS}


@dataclass(frozen=True, slots=True)
class ActionSpace:
    """Sizes of the factored heads. Blueprints come from Kasmina's registry at run time."""

    blueprints: tuple[str, ...]
    slots: tuple[str, ...] = CANONICAL_SLOTS
    tempos: tuple[int, ...] = TEMPOS

    def __post_init__(self) -> None:
        if not self.blueprints:
            raise ValueError("ActionSpace needs at least one blueprint")
        unknown = [s for s in self.slots if s not in CANONICAL_SLOTS]
        if unknown:
            raise ValueError(f"unknown slots {unknown}; allowed: {list(CANONICAL_SLOTS)}")
        if list(self.slots) != [s for s in CANONICAL_SLOTS if s in self.slots]:
            raise ValueError(f"slots must be in canonical order {list(CANONICAL_SLOTS)}")

    @property
    def sizes(self) -> dict[str, int]:
        return {
            "op": NUM_OPS,
            "slot": len(self.slots),
            "blueprint": len(self.blueprints),
            "tempo": len(self.tempos),
        }

    def describe(self, op: int, slot: int, blueprint: int, tempo: int) -> str:
        """Human-readable action, e.g. ``germinate(conv_light@mid, tempo 5)``."""
        o = Op(op)
        if o is Op.WAIT:
            return "wait"
        if o is Op.GERMINATE:
            return f"germinate({self.blueprints[blueprint]}@{self.slots[slot]}, tempo {self.tempos[tempo]})"
        return f"{o.name.lower()}({self.slots[slot]})"
