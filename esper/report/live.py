"""``python -m esper.report RUN_DIR --live``: a run followed in the terminal while it trains.

Read from the run's JSONL telemetry (new lines only, rotation included, like ``--watch``), so it
works beside any run, from another terminal, and costs the run nothing: each env's seed stage
per slot (a grid), the mean validation accuracy per epoch (a sparkline), seeds by stage over all
envs, PPO rounds, and the last lifecycle decisions with their reasons. Not on a terminal it
prints the view once (a snapshot).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from esper.leyline.stages import SeedStage
from esper.report.telemetry import TelemetryReader
from esper.simic.preflight import StopSignals

SPARK = "▁▂▃▄▅▆▇█"
# One character and a colour per stage for the grid.
STAGE_CELL = {
    SeedStage.UNKNOWN: ("?", "dim"), SeedStage.DORMANT: ("·", "dim"), SeedStage.GERMINATED: ("G", "cyan"),
    SeedStage.TRAINING: ("T", "blue"), SeedStage.BLENDING: ("B", "magenta"), SeedStage.SHADOWING: ("S", "magenta"),
    SeedStage.PROBATIONARY: ("P", "yellow"), SeedStage.FOSSILIZED: ("F", "bold green"),
    SeedStage.CULLED: ("C", "red"), SeedStage.EMBARGOED: ("E", "red"), SeedStage.RESETTING: ("R", "dim"),
}
TICK = 0.2  # seconds between checks for a stop signal
ENVS_PER_LINE = 8


def sparkline(values: list[float], width: int) -> str:
    """The last ``width`` values as block characters, scaled from their min to their max."""
    tail = values[-width:]
    if not tail:
        return ""
    lo, hi = min(tail), max(tail)
    span = hi - lo or 1.0
    return "".join(SPARK[min(int((v - lo) / span * len(SPARK)), len(SPARK) - 1)] for v in tail)


class LiveView:
    """What the telemetry said so far, folded into what the view draws."""

    def __init__(self, run_dir: str | Path, envs: int = 128, decisions: int = 8, width: int = 60) -> None:
        self.run_dir = Path(run_dir)
        self.reader = TelemetryReader(run_dir)
        self.envs, self.width = envs, width
        self.slots: list[str] = []
        self.acc: list[float] = []  # mean validation accuracy per epoch event
        self.stage: list[list[int]] = []  # [env][slot] at the last epoch
        self.epoch = 0
        self.length: int | None = None
        self.decisions: deque[str] = deque(maxlen=decisions)
        self.rounds: deque[str] = deque(maxlen=3)
        self.episodes_done = 0
        self.test_acc: list[float] = []

    def update(self) -> bool:
        """Fold in the events written since the last call; True when there were any."""
        events = self.reader.poll()
        for e in events:
            self._fold(e)
        return bool(events)

    def _fold(self, e: dict[str, Any]) -> None:
        kind, p = e.get("kind"), e.get("payload") or {}
        if kind == "run":
            cfg = p.get("config", {})
            self.slots = list(cfg.get("kasmina", {}).get("slots", []))
            self.length = cfg.get("episode", {}).get("length")
        elif kind == "epoch":
            acc = p.get("signals.val_acc") or []
            if acc:
                self.acc.append(sum(acc) / len(acc))
            self.stage = p.get("signals.stage") or self.stage
            epochs = p.get("signals.epoch") or [e.get("epoch", 0)]
            self.epoch = max(epochs)
        elif kind == "episode":
            self.episodes_done += 1
            if p.get("test_acc") is not None:
                self.test_acc.append(float(p["test_acc"]))
        elif kind == "decision" and e.get("action") != "wait":
            why = (p.get("context") or {}).get("why_this_action", "")
            verdict = "accepted" if e.get("accepted") else f"refused ({e.get('reason') or 'invalid'})"
            self.decisions.append(f"epoch {e.get('epoch')} env {e.get('env')}: {e.get('action')} {verdict}"
                                  + (f" - {why}" if why else ""))
        elif kind == "ppo_update":
            self.rounds.append(f"round {p.get('round')}: test {p.get('test_acc', float('nan')):.2f}  return "
                               f"{p.get('mean_return', float('nan')):+.3f}  EV {p.get('explained_variance', 0):+.2f}")

    def render(self) -> RenderableType:
        head = Text(f"{self.run_dir}  epoch {self.epoch}"
                    + (f"/{self.length}" if self.length else "") + f"  episodes done {self.episodes_done}",
                    style="bold")
        parts: list[RenderableType] = [head]
        if self.acc:
            parts.append(Text(f"val acc  {sparkline(self.acc, self.width)}  {self.acc[-1]:.2f} "
                              f"(min {min(self.acc[-self.width:]):.2f}, max {max(self.acc[-self.width:]):.2f})"))
        if self.test_acc:
            parts.append(Text(f"test acc of finished episodes: mean {sum(self.test_acc) / len(self.test_acc):.2f} "
                              f"over {len(self.test_acc)}"))
        if self.stage:
            slots = self.slots or [f"slot{i}" for i in range(len(self.stage[0]))]
            parts.append(Text(f"seed stage per env ({' '.join(slots)} in each cell, {ENVS_PER_LINE} envs a line):",
                              style="bold"))
            shown = self.stage[:self.envs]
            for start in range(0, len(shown), ENVS_PER_LINE):
                line = Text(f"{start:>4}  ")
                for row in shown[start:start + ENVS_PER_LINE]:
                    for v in row:
                        line.append(*STAGE_CELL.get(SeedStage(v), ("?", "dim")))
                    line.append("  ")
                parts.append(line)
            if len(self.stage) > self.envs:
                parts.append(Text(f"... {len(self.stage) - self.envs} more envs", style="dim"))
            counts = Counter(SeedStage(v).name for row in self.stage for v in row)
            parts.append(Text("seeds by stage: " + ", ".join(f"{name} {n}" for name, n in counts.most_common())))
        legend = "  ".join(f"{c} {s.name.lower()}" for s, (c, _) in STAGE_CELL.items() if s != SeedStage.UNKNOWN)
        parts.append(Text(legend, style="dim"))
        if self.rounds:
            parts.append(Text("PPO " + " | ".join(self.rounds)))
        parts.append(Text("last decisions:" if self.decisions else "no lifecycle decision yet", style="bold"))
        parts += [Text("  " + d, overflow="ellipsis", no_wrap=True) for d in self.decisions]
        return Group(*parts)


def live(run_dir: Path, interval: float, console: Console | None = None) -> LiveView:
    """Draw the view, redrawn as the telemetry grows, until SIGINT/SIGTERM; a snapshot when
    the console is not a terminal."""
    console = console or Console()
    view = LiveView(run_dir)
    view.update()
    if not console.is_terminal:
        console.print(view.render())
        return view
    with StopSignals(first=None) as stop, Live(view.render(), console=console, refresh_per_second=4) as screen:
        while stop.signum is None:
            deadline = time.monotonic() + interval
            while stop.signum is None and time.monotonic() < deadline:
                time.sleep(TICK)
            if view.update():
                screen.update(view.render())
    return view
