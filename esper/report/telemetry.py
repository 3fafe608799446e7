"""Follow a run directory's JSONL telemetry, rotated files included, reading each line once.

The JSONL backend appends to ``telemetry.jsonl`` and rotates it to ``telemetry.jsonl.1`` ...
``.K`` (oldest). A reader that re-parsed everything on each refresh would cost more the longer
a run goes, so :class:`TelemetryReader` remembers the newest file it read and how far: a
rotated file keeps its inode under its new name, so the reader finds it, reads the lines it
gained before it was renamed, then the newer files. A half-written last line waits for the
next poll. Narratives are skipped unparsed (the report draws none; they are most of the bytes),
and so are ``wait`` decisions (decisions only name slots and blueprints for the report).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

TELEMETRY = "telemetry.jsonl"
REPORT = "report.html"  # written beside it
_SKIP = (b'{"kind": "narrative"',)
_WAIT = b'"action": "wait"'


def telemetry_files(run_dir: Path) -> list[Path]:
    """The run's JSONL files, oldest first: ``telemetry.jsonl.K`` ... ``.1``, then the live one."""
    pattern = re.compile(re.escape(TELEMETRY) + r"\.(\d+)$")
    rotated = []
    for p in run_dir.glob(f"{TELEMETRY}.*"):
        m = pattern.match(p.name)
        if m:
            rotated.append((int(m.group(1)), p))
    live = run_dir / TELEMETRY
    return [p for _, p in sorted(rotated, reverse=True)] + ([live] if live.exists() else [])


class TelemetryReader:
    """Each :meth:`poll` returns the events written since the last one, oldest first.

    It remembers the newest file it read (identity and first line, so a recycled inode is not
    taken for it) and how far: the next poll finds that file under whatever name rotation gave
    it, reads its remainder, then every newer file whole.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.last: tuple[tuple[int, int], bytes] | None = None  # (device, inode), first line
        self.offset = 0
        self.unreadable = 0  # lines that were not JSON objects (a corrupted write)

    def _find_last(self, files: list[Path]) -> int | None:
        if self.last is None:
            return None
        ident, head = self.last
        for i, path in enumerate(files):
            try:
                st = path.stat()
                if (st.st_dev, st.st_ino) == ident:
                    with path.open("rb") as f:
                        return i if f.read(len(head)) == head else None
            except FileNotFoundError:
                continue
        return None

    def poll(self) -> list[dict[str, Any]]:
        files = telemetry_files(self.run_dir)
        i = self._find_last(files)
        todo = [(p, 0) for p in files] if i is None else [(files[i], self.offset)] + [(p, 0) for p in files[i + 1:]]
        events: list[dict[str, Any]] = []
        for path, start in todo:
            try:
                with path.open("rb") as f:
                    st = os.fstat(f.fileno())
                    head = f.readline()
                    f.seek(start)
                    data = f.read()
            except FileNotFoundError:  # rotated away between listing and opening
                continue
            end = data.rfind(b"\n") + 1  # a half-written last line waits for the next poll
            events += self._parse(data[:end])
            if head.endswith(b"\n"):  # a file is known by its first complete line
                self.last, self.offset = ((st.st_dev, st.st_ino), head), start + end
        return events

    def _parse(self, data: bytes) -> list[dict[str, Any]]:
        out = []
        for line in data.splitlines():
            if not line.strip() or line.startswith(_SKIP):
                continue
            if line.startswith(b'{"kind": "decision"') and _WAIT in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                self.unreadable += 1
                continue
            if isinstance(event, dict) and "kind" in event:
                out.append(event)
            else:
                self.unreadable += 1
        return out
