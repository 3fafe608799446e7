"""The run's configuration: from its ``run`` event, else from a checkpoint the run wrote into
its directory (a PPO run's ``ppo.pt`` holds its config), else said to be missing; and the
files the directory holds."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from esper.leyline.constants import CANONICAL_SLOTS
from esper.report.run import RunData
from esper.report.section import Section, table

HIGHLIGHTS = (("episode", "envs"), ("episode", "length"), ("episode", "episodes"), ("episode", "seed"),
              ("task", "name"), ("task", "seed"), ("kasmina", "host"), ("kasmina", "blueprints"),
              ("telemetry", "profile"), ("device",), ("compile",))


def find_config(run: RunData, run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """The configuration and where it came from."""
    if run.config:
        return run.config, "the run event at the start of the telemetry"
    for path in sorted(run_dir.glob("*.pt")):
        try:
            from esper.simic.checkpoint import load_checkpoint

            config = load_checkpoint(path).get("config")
        except Exception:  # any unreadable checkpoint: try the next, then say none
            continue
        if isinstance(config, dict):
            return config, f"checkpoint {path.name} (the telemetry holds no run event)"
    return None, ""


def _get(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = config
    for k in keys:
        if not isinstance(value, dict) or k not in value:
            return None
        value = value[k]
    return value


def slot_names(config: dict[str, Any] | None, n_slots: int) -> dict[int, str]:
    """Slot index -> name from the config's enabled slots (canonical order, as Kasmina builds)."""
    enabled = _get(config or {}, ("kasmina", "slots"))
    if not isinstance(enabled, list):
        return {}
    names = [s for s in CANONICAL_SLOTS if s in enabled]
    return dict(enumerate(names)) if len(names) == n_slots else {}


def config_section(config: dict[str, Any] | None, source: str, run_dir: Path) -> Section:
    files = [[p.name, f"{p.stat().st_size:,}"] for p in sorted(run_dir.iterdir()) if p.is_file()]
    listing = "<h3>Files in the run directory</h3>" + table(["file", "bytes"], files)
    if config is None:
        return Section("config", "Configuration", note="No configuration recorded: the telemetry has no run "
                       "event and the directory no readable checkpoint.", html=listing)
    rows = [[".".join(k), json.dumps(v)] for k in HIGHLIGHTS if (v := _get(config, k)) is not None]
    full = escape(json.dumps(config, indent=2, sort_keys=True))
    html = (table(["setting", "value"], rows)
            + f"<details><summary>full configuration</summary><pre>{full}</pre></details>" + listing)
    return Section("config", "Configuration", note=f"From {source}.", html=html)
