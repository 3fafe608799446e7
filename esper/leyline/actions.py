"""The factored action space: op, slot, blueprint and tempo heads."""

from __future__ import annotations

from enum import IntEnum


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
