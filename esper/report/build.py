"""Build ``report.html`` for a run directory: read its telemetry, draw every section, write the
page atomically (a browser reloading it mid-write sees the old page or the new one)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from esper.atomic import atomic_write
from esper.report.accuracy import accuracy_section
from esper.report.anomalies import anomaly_section
from esper.report.blueprints import blueprint_section
from esper.report.config import config_section, find_config, slot_names
from esper.report.learning import learning_section
from esper.report.page import render, render_sections
from esper.report.rewards import reward_section
from esper.report.run import RunData
from esper.report.section import Section
from esper.report.telemetry import REPORT, TELEMETRY, TelemetryReader, telemetry_files
from esper.report.timeline import timeline_section
from esper.simic.errors import UsageError

DRAW_ENVS = 8  # envs drawn in full (all of them in a run with no more)
TIMELINE_ROWS = 48  # env x slot rows at most
ALLOWED = "a run directory written with --backends jsonl --run-dir DIR (it holds telemetry.jsonl)"


def check_run_dir(run_dir: Path, need_telemetry: bool = True) -> None:
    """The run directory exists (and holds JSONL telemetry, unless ``need_telemetry`` is off)."""
    if not run_dir.exists():
        raise UsageError(f"run directory {run_dir} does not exist", "RUN_DIR", ALLOWED)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a directory", "RUN_DIR", ALLOWED)
    if need_telemetry and not telemetry_files(run_dir):
        raise UsageError(f"no {TELEMETRY} in {run_dir}", "RUN_DIR", ALLOWED)


def sections(run: RunData, run_dir: Path, draw: int = DRAW_ENVS, rows: int = TIMELINE_ROWS) -> list[Section]:
    config, source = find_config(run, run_dir)
    run.slot_names = {**slot_names(config, run.n_slots), **run.slot_names}  # what decisions named wins
    setting = config_section(config, source, run_dir)
    if not run.steps:
        return [Section("waiting", "Waiting for the first epoch", note="The telemetry holds no epoch yet."), setting]
    drawn = run.pick_envs(draw)
    return [accuracy_section(run, draw), timeline_section(run, drawn, rows), blueprint_section(run),
            reward_section(run), learning_section(run), anomaly_section(run), setting]


def summary(run: RunData, reader: TelemetryReader) -> list[tuple[str, str]]:
    files = ", ".join(p.name for p in telemetry_files(reader.run_dir))
    rows = [("telemetry", f"{files}: {run.events} events read"
             + (f", {reader.unreadable} unreadable lines skipped" if reader.unreadable else ""))]
    if run.earlier_runs:
        rows.append(("earlier runs", f"{run.earlier_runs} earlier run(s) in the same files; the latest is shown"))
    if run.steps:
        rows.append(("envs", f"{run.n_envs} envs x {run.n_slots} slots, {run.steps} epochs"))
    latest: dict[int, float] = {}
    for _, p in run.episodes:  # each env's latest finished episode
        if p.get("test_acc") is not None:
            latest[int(p.get("env", -1))] = float(p["test_acc"])
    if latest:
        acc = np.array(list(latest.values()))
        rows.append(("test accuracy", f"{acc.mean():.2f} ± {acc.std():.2f} (each env's latest episode; "
                                      f"{len(run.episodes)} episodes ended)"))
    stages = [ev.to_stage for ev in run.lifecycle]
    rows.append(("seeds", f"{stages.count('GERMINATED')} germinated, {stages.count('FOSSILIZED')} fossilized, "
                          f"{stages.count('CULLED')} culled"))
    if run.ppo:
        rows.append(("PPO", f"{len(run.ppo)} rounds"))
    rollbacks = sum(a.action == "rollback" for a in run.anomalies)
    rows.append(("anomalies", f"{len(run.anomalies)}, {rollbacks} governor rollbacks"))
    return rows


class Report:
    """A run directory's report, kept current by :meth:`update` (new telemetry only)."""

    def __init__(self, run_dir: str | Path, out: str | Path | None = None, draw: int = DRAW_ENVS,
                 rows: int = TIMELINE_ROWS) -> None:
        self.run_dir = Path(run_dir)
        self.out = Path(out) if out is not None else self.run_dir / REPORT
        self.reader = TelemetryReader(self.run_dir)
        self.run = RunData()
        self.draw, self.rows = draw, rows
        self._drawn: tuple[int, str, str] | None = None  # (events seen, nav, body) last drawn

    def update(self) -> int:
        """Read what the telemetry gained; the number of new events."""
        events = self.reader.poll()
        self.run.add(events)
        return len(events)

    def html(self, refresh: float | None = None) -> str:
        """The page; its sections are drawn again only when new events arrived."""
        if self._drawn is None or self._drawn[0] != self.run.events:
            self._drawn = (self.run.events, *render_sections(sections(self.run, self.run_dir, self.draw, self.rows)))
        _, nav, body = self._drawn
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        return render(f"Esper run {self.run_dir}", f"written {stamp} by python -m esper.report",
                      summary(self.run, self.reader), nav, body, refresh)

    def write(self, refresh: float | None = None) -> Path:
        text = self.html(refresh)
        return atomic_write(self.out, lambda f: f.write(text), binary=False)


def write_report(run_dir: str | Path, out: str | Path | None = None, draw: int = DRAW_ENVS,
                 rows: int = TIMELINE_ROWS) -> Path:
    """Read the whole run and write its report (``RUN_DIR/report.html`` unless ``out``)."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    report = Report(run_dir, out, draw, rows)
    report.update()
    if not report.run.steps:
        raise UsageError(f"the telemetry in {run_dir} holds no epoch", "RUN_DIR",
                         "a run that finished at least one epoch (or --watch to wait for one)")
    return report.write()
