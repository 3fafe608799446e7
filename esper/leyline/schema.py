"""Observation schema: named features with indices and a version, serializable.

Data files carry their schema (``to_dict``), so a file is self-describing and a reader can
refuse one written under a different layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from esper.leyline.actions import NUM_OPS
from esper.leyline.constants import CANONICAL_SLOTS
from esper.leyline.stages import SeedStage

SCHEMA_VERSION = 4  # 4: losses in units of ln(classes); 3: optional diagnostic extras appended
READABLE_VERSIONS = (2, 3, 4)  # columns are laid out alike; 4 scales the loss columns

# Base (per-env) features that are not histories.
BASE_SCALARS: tuple[str, ...] = (
    "epoch_frac",
    "train_loss",
    "val_loss",
    "train_acc",
    "val_acc",
    "best_val_acc",
    "loss_delta",
    "acc_delta",
    "plateau_epochs",
    "epochs_since_improvement",
    "epochs_since_cull",
    "seeds_live",
    "seeds_fossilized",
    "seeds_culled",
    "params_added_ratio",
    "last_action_success",
)

SLOT_SCALARS: tuple[str, ...] = (
    "alpha",
    "contribution",
    "contribution_velocity",
    "contribution_measured",
    "epochs_in_stage",
    "seed_age",
    "seed_grad_norm",
    "seed_grad_ratio",
    "seed_grad_healthy",
)


@dataclass(frozen=True, slots=True)
class ObservationSchema:
    """Feature names in order; ``index[name]`` is the column of a feature.

    Base and per-slot features are always present; ``extras`` (the diagnostics a richer
    telemetry profile collects, e.g. per-layer gradient norms and per-class accuracy) are
    appended after them, so a minimal layout is a prefix of every richer one.
    """

    history_length: int
    blueprints: tuple[str, ...]
    slots: tuple[str, ...] = CANONICAL_SLOTS
    extras: tuple[str, ...] = ()
    version: int = SCHEMA_VERSION
    base: tuple[str, ...] = field(init=False)
    per_slot: tuple[str, ...] = field(init=False)
    names: tuple[str, ...] = field(init=False)
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        if self.history_length < 1:
            raise ValueError(f"history_length must be >= 1, got {self.history_length}")
        if not self.blueprints:
            raise ValueError("ObservationSchema needs at least one blueprint name")
        base = list(BASE_SCALARS)
        base += [f"val_loss_hist_{i}" for i in range(self.history_length)]
        base += [f"val_acc_hist_{i}" for i in range(self.history_length)]
        base += [f"last_op_{i}" for i in range(NUM_OPS)]
        per_slot = list(SLOT_SCALARS)
        per_slot += [f"stage_{s.name.lower()}" for s in SeedStage]
        per_slot += [f"blueprint_{b}" for b in self.blueprints]
        names = list(base)
        for slot in self.slots:
            names += [f"{slot}.{f}" for f in per_slot]
        names += list(self.extras)
        if len(set(names)) != len(names):
            raise ValueError("ObservationSchema extras repeat a feature name")
        object.__setattr__(self, "base", tuple(base))
        object.__setattr__(self, "per_slot", tuple(per_slot))
        object.__setattr__(self, "names", tuple(names))
        object.__setattr__(self, "index", {n: i for i, n in enumerate(names)})

    @property
    def size(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "history_length": self.history_length,
            "blueprints": list(self.blueprints),
            "slots": list(self.slots),
            "extras": list(self.extras),
            "names": list(self.names),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ObservationSchema:
        missing = {"version", "history_length", "blueprints", "slots"} - set(data)
        if missing:
            raise ValueError(f"observation schema is missing keys {sorted(missing)}")
        if data["version"] not in READABLE_VERSIONS:
            raise ValueError(
                f"observation schema version {data['version']} is not supported; "
                f"this build reads versions {list(READABLE_VERSIONS)}"
            )
        schema = cls(
            history_length=int(data["history_length"]),
            blueprints=tuple(data["blueprints"]),
            slots=tuple(data["slots"]),
            extras=tuple(data.get("extras", ())),
        )
        if "names" in data and list(data["names"]) != list(schema.names):
            raise ValueError("observation schema names do not match the layout they declare")
        return schema

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> ObservationSchema:
        return cls.from_dict(json.loads(text))
