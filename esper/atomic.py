"""Write a file atomically: into a temp file beside it, fsync, then rename over the target.

A reader sees the old file or the new one, never half of one; a write killed mid-way (SIGKILL)
leaves a ``.NAME.*.tmp`` orphan that the next write to the same target removes. The file gets
the usual permissions (``0666`` less the umask), not the temp file's private ``0600``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], binary: bool = True) -> Path:
    """Call ``write(f)`` on a temp file next to ``path`` and move it into place."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    for stale in p.parent.glob(f".{p.name}.*.tmp"):  # orphans of a write killed mid-way
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
