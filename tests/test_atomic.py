"""Atomic writes: all or nothing, orphans cleaned, ordinary permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from esper.atomic import atomic_write


def test_atomic_write_replaces_whole_file_with_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    (tmp_path / ".out.json.abc.tmp").write_text("orphan of a killed write")
    old = os.umask(0o022)
    try:
        atomic_write(target, lambda f: f.write("new"), binary=False)
    finally:
        os.umask(old)
    assert target.read_text() == "new"
    assert (target.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"previous")

    def boom(f) -> None:
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, boom)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
