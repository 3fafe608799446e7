"""Per-blueprint outcome statistics from lifecycle events."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from esper.leyline.events import EventKind, LifecycleEvent, TelemetryEvent

GERMINATED = "GERMINATED"
FOSSILIZED = "FOSSILIZED"
CULLED = "CULLED"


@dataclass(slots=True)
class BlueprintStats:
    """Counts and costs for one blueprint."""

    germinated: int = 0
    fossilized: int = 0
    culled: int = 0
    acc_delta_sum: float = 0.0
    acc_delta_count: int = 0
    params_sum: float = 0.0
    flops_sum: float = 0.0
    cost_count: int = 0

    @property
    def fossilization_rate(self) -> float:
        """Fossilized / finished (fossilized + culled); NaN before any finished."""
        done = self.fossilized + self.culled
        return self.fossilized / done if done else math.nan

    @property
    def mean_acc_delta(self) -> float:
        return self.acc_delta_sum / self.acc_delta_count if self.acc_delta_count else math.nan

    @property
    def mean_params(self) -> float:
        return self.params_sum / self.cost_count if self.cost_count else math.nan

    @property
    def mean_flops(self) -> float:
        return self.flops_sum / self.cost_count if self.cost_count else math.nan

    def to_dict(self) -> dict[str, float | int]:
        return {
            "germinated": self.germinated,
            "fossilized": self.fossilized,
            "culled": self.culled,
            "fossilization_rate": self.fossilization_rate,
            "mean_acc_delta": self.mean_acc_delta,
            "mean_params": self.mean_params,
            "mean_flops": self.mean_flops,
        }


class BlueprintAnalytics:
    """Consumes LifecycleEvents (``to_stage`` GERMINATED / FOSSILIZED / CULLED).

    Payload keys: ``params`` and ``flops`` on GERMINATED events (cost of the seed),
    ``accuracy_delta`` on FOSSILIZED / CULLED events (averaged over finished seeds).
    """

    def __init__(self) -> None:
        self.stats: dict[str, BlueprintStats] = {}

    def record(self, event: LifecycleEvent) -> None:
        stage = event.to_stage.upper()
        if stage not in (GERMINATED, FOSSILIZED, CULLED) or not event.blueprint:
            return
        s = self.stats.setdefault(event.blueprint, BlueprintStats())
        p = event.payload
        if stage == GERMINATED:
            s.germinated += 1
            if "params" in p or "flops" in p:
                s.params_sum += float(p.get("params", 0.0))
                s.flops_sum += float(p.get("flops", 0.0))
                s.cost_count += 1
        else:
            if stage == FOSSILIZED:
                s.fossilized += 1
            else:
                s.culled += 1
            if "accuracy_delta" in p:
                s.acc_delta_sum += float(p["accuracy_delta"])
                s.acc_delta_count += 1

    def summary(self) -> str:
        """A rich table rendered as plain text."""
        table = Table(title="Blueprint analytics")
        for col in (
            "blueprint",
            "germ",
            "foss",
            "cull",
            "foss rate",
            "mean Δacc",
            "params",
            "flops",
        ):
            table.add_column(col, justify="left" if col == "blueprint" else "right")
        for name in sorted(self.stats):
            d = self.stats[name].to_dict()
            table.add_row(
                name,
                str(d["germinated"]),
                str(d["fossilized"]),
                str(d["culled"]),
                f"{d['fossilization_rate']:.2f}",
                f"{d['mean_acc_delta']:+.4f}",
                f"{d['mean_params']:.0f}",
                f"{d['mean_flops']:.3g}",
            )
        buf = io.StringIO()
        Console(file=buf, width=100, color_system=None).print(table)
        return buf.getvalue()

    def to_event(self, epoch: int = -1) -> TelemetryEvent:
        """An ANALYTICS event for the end of an episode (per-blueprint stats and the table)."""
        return TelemetryEvent(
            kind=EventKind.ANALYTICS,
            epoch=epoch,
            payload={
                "blueprints": {k: v.to_dict() for k, v in sorted(self.stats.items())},
                "table": self.summary(),
            },
        )

    def reset(self) -> None:
        self.stats.clear()
