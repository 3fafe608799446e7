"""PPO checkpoints: one file, written atomically, validated on load with errors naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from esper.atomic import atomic_write
from esper.simic.errors import CheckpointError

CHECKPOINT_VERSION = 1
REQUIRED_KEYS: tuple[str, ...] = (
    "version",
    "round",
    "config",
    "policy_shape",
    "modules",
    "optimizer",
    "obs_norm",
    "env_episode",
    "rng",
    "history",
)


def provenance() -> dict[str, Any]:
    """What made a checkpoint: the command line, the code version (package version and, in a
    git checkout, the commit and whether the tree was dirty) and when."""
    import subprocess
    import sys
    import time
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("esper-morphogenetic")
    except PackageNotFoundError:
        pkg = None
    root = Path(__file__).resolve().parents[2]
    git: dict[str, Any] | None = None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip() != ""
        git = {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        git = None
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0] if sys.argv else '?'}"
    return {
        "command": " ".join([program, *sys.argv[1:]]),
        "code": {"package": pkg, "git": git},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    p = Path(path)
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{p}: refusing to write a checkpoint without {missing}")
    return atomic_write(p, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and structurally validate a checkpoint (tensors go to the CPU)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        why = _load_problem(err)
        raise CheckpointError(f"{p}: not a readable checkpoint (corrupt or truncated?): {why}") from err
    if not isinstance(payload, dict):
        raise CheckpointError(f"{p}: expected a checkpoint dict, found {type(payload).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{p}: not an Esper PPO checkpoint (missing {missing})")
    if payload["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint version {payload['version']}, this build reads {CHECKPOINT_VERSION}"
        )
    return payload


def _load_problem(err: Exception) -> str:
    """One line saying why ``torch.load`` failed. Its weights-only message spans lines of advice
    (re-run with ``weights_only=False``, wrong for a damaged file); the unpickler's own words are
    kept, or the first line, or the error's type when it has no words (an empty file)."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_matches(path: str | Path, what: str, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise naming every (nested, dotted) field of ``what`` that differs between the checkpoint
    and this run."""
    saved, current = _flatten(saved), _flatten(current)
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: checkpoint {saved.get(k)!r} != run {current.get(k)!r}" for k in keys
             if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"{path}: {what} mismatch: " + "; ".join(diffs))
