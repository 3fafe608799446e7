"""Leyline contracts: every transition, the tensor check, the schema round trip, events."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from esper.leyline import (
    EVENT_TYPES,
    HEADS,
    HEADS_FOR_OP,
    NUM_STAGES,
    VALID_TRANSITIONS,
    EventKind,
    ObservationSchema,
    Op,
    SeedStage,
    StageTransitionError,
    check_transition,
    head_relevance,
    is_failure_stage,
    is_terminal_stage,
    is_valid_transition,
    ordered_slots,
    transition_table,
    valid_transitions_mask,
)

S = SeedStage
EXPECTED_VALID = {
    (S.UNKNOWN, S.DORMANT),
    (S.DORMANT, S.GERMINATED),
    (S.GERMINATED, S.TRAINING),
    (S.TRAINING, S.BLENDING),
    (S.BLENDING, S.SHADOWING),
    (S.SHADOWING, S.PROBATIONARY),
    (S.PROBATIONARY, S.FOSSILIZED),
    (S.GERMINATED, S.CULLED),
    (S.TRAINING, S.CULLED),
    (S.BLENDING, S.CULLED),
    (S.SHADOWING, S.CULLED),
    (S.PROBATIONARY, S.CULLED),
    (S.CULLED, S.EMBARGOED),
    (S.EMBARGOED, S.RESETTING),
    (S.RESETTING, S.DORMANT),
}


def test_eleven_stages_in_fixed_order() -> None:
    assert NUM_STAGES == 11
    assert [s.name for s in SeedStage][:3] == ["UNKNOWN", "DORMANT", "GERMINATED"]
    assert S.FOSSILIZED == 7


@pytest.mark.parametrize("src,dst", list(itertools.product(SeedStage, SeedStage)))
def test_every_transition(src: SeedStage, dst: SeedStage) -> None:
    expected = (src, dst) in EXPECTED_VALID
    assert is_valid_transition(src, dst) is expected
    if expected:
        check_transition(src, dst)
    else:
        with pytest.raises(StageTransitionError) as err:
            check_transition(src, dst)
        message = str(err.value)
        assert src.name in message and dst.name in message
        for allowed in VALID_TRANSITIONS[src]:
            assert allowed.name in message


def test_terminal_and_failure_stages() -> None:
    assert {s for s in SeedStage if is_terminal_stage(s)} == {S.FOSSILIZED, S.CULLED}
    assert {s for s in SeedStage if is_failure_stage(s)} == {S.CULLED, S.EMBARGOED, S.RESETTING}
    assert "none (terminal)" in str(StageTransitionError(S.FOSSILIZED, S.DORMANT))


def test_tensor_table_matches_python_table() -> None:
    table = transition_table()
    assert table.shape == (NUM_STAGES, NUM_STAGES) and table.dtype == torch.bool
    pairs = list(itertools.product(range(NUM_STAGES), repeat=2))
    src = torch.tensor([p[0] for p in pairs])
    dst = torch.tensor([p[1] for p in pairs])
    got = valid_transitions_mask(table, src, dst)
    want = torch.tensor([is_valid_transition(a, b) for a, b in pairs])
    assert torch.equal(got, want)
    assert int(got.sum()) == len(EXPECTED_VALID)


def test_batched_transition_check_keeps_shape() -> None:
    table = transition_table()
    src = torch.tensor([[S.DORMANT, S.TRAINING], [S.FOSSILIZED, S.CULLED]])
    dst = torch.tensor([[S.GERMINATED, S.GERMINATED], [S.CULLED, S.EMBARGOED]])
    assert valid_transitions_mask(table, src, dst).tolist() == [[True, False], [False, True]]


def test_heads_for_ops() -> None:
    assert HEADS == ("op", "slot", "blueprint", "tempo")
    assert HEADS_FOR_OP[Op.WAIT] == {"op"}
    assert HEADS_FOR_OP[Op.GERMINATE] == set(HEADS)
    rel = head_relevance()
    assert rel["blueprint"] == [op is Op.GERMINATE for op in Op]
    assert rel["op"] == [True] * len(Op)


def test_ordered_slots() -> None:
    with pytest.raises(ValueError, match="unknown slot"):
        ordered_slots(["mid", "top"])
    assert ordered_slots(["late", "early"]) == ("early", "late")


def test_schema_round_trip_and_index() -> None:
    schema = ObservationSchema(history_length=4, blueprints=("noop", "norm", "conv_light"))
    again = ObservationSchema.from_json(schema.to_json())
    assert again == schema
    assert again.names == schema.names
    assert len(set(schema.names)) == schema.size
    assert all(schema.names[i] == n for n, i in schema.index.items())
    assert schema.names[schema.index["mid.alpha"]] == "mid.alpha" and schema.per_slot[0] == "alpha"
    assert "late.blueprint_conv_light" in schema.index
    assert "val_acc_hist_3" in schema.index


def test_schema_refuses_bad_input() -> None:
    schema = ObservationSchema(history_length=2, blueprints=("noop",))
    data = schema.to_dict()
    with pytest.raises(ValueError, match="version"):
        ObservationSchema.from_dict({**data, "version": 99})
    with pytest.raises(ValueError, match="missing keys"):
        ObservationSchema.from_dict({"version": 1})
    with pytest.raises(ValueError, match="do not match"):
        ObservationSchema.from_dict({**data, "names": data["names"][:-1]})
    with pytest.raises(ValueError, match="history_length"):
        ObservationSchema(history_length=0, blueprints=("noop",))


@pytest.mark.parametrize("cls", EVENT_TYPES)
def test_event_to_dict_covers_every_field(cls: type) -> None:
    event = cls(kind=EventKind.EPOCH, env=3, epoch=7, payload={"x": 1.0})
    out = event.to_dict()
    assert list(out) == [f.name for f in dataclasses.fields(cls)]  # declaration order: JSONL key order
    assert out["kind"] == "epoch" and out["env"] == 3 and out["epoch"] == 7
    assert out["payload"] == {"x": 1.0} and out["payload"] is not event.payload
    assert not hasattr(event, "__dict__"), "events must be slots=True dataclasses"
