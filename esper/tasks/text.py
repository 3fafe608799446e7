"""A user's own text as byte-level next-token prediction: any folder of text files.

Why bytes: a fixed 256-token vocabulary needs no tokenizer, fits every language and source code,
and round-trips any file exactly. Files are read in sorted path order; each enters the stream as
one boundary byte (0) followed by its bytes, and the stream is cut into non-overlapping windows
of ``seq_len + 1`` bytes. A folder holding ``train/`` (and optionally ``val/``, ``test/``)
subfolders brings its own splits; otherwise the windows are carved with a seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from esper.tasks.carve import complete_splits
from esper.tasks.sequence import SequenceTask, windows
from esper.tasks.tinystories import BOUNDARY_BYTE, BYTE_VOCAB

SPLITS: tuple[str, ...] = ("train", "val", "test")


def find_text_files(root: Path, pattern: str) -> list[Path]:
    """Files under ``root`` matching ``pattern`` (recursively, sorted), or ``[root]`` for a file."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ValueError(f"text: {root} does not exist; expected a folder of text files ({pattern}) or one file")
    files = sorted(p for p in root.rglob(pattern) if p.is_file())
    if not files:
        raise ValueError(f"text: {root} holds no files matching {pattern!r}; set task.pattern "
                         "(e.g. '*.txt', '*.py', '*') to the files to read")
    return files


def read_stream(files: list[Path]) -> torch.Tensor:
    """One uint8 byte stream: a boundary byte before each file's bytes."""
    parts = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as err:
            raise ValueError(f"text: cannot read {f}: {err}") from None
        parts.append(bytes([BOUNDARY_BYTE]) + data)
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


def _cut(stream: torch.Tensor, seq_len: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return windows(stream, seq_len)
    except ValueError as err:
        raise ValueError(f"text: {where}: {err}") from None


def load_text(
    path: str | Path,
    *,
    pattern: str = "*.txt",
    seq_len: int = 64,
    seed: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    device: torch.device | str = "cpu",
) -> SequenceTask:
    """The text under ``path`` as a :class:`SequenceTask` of byte windows on ``device``.

    ``seed`` carves the splits the folder lacks (0 when None); it is refused when the folder
    brings all three. ``*_size`` keep the first n windows of a split.
    """
    root = Path(path)
    own = {s: root / s for s in SPLITS if root.is_dir() and (root / s).is_dir()}
    if own and "train" not in own:
        raise ValueError(f"text: {root} has {sorted(own)} but no train/ folder; give train/ (val/ and "
                         "test/ optional), or the text files directly in it")
    if seed is not None and len(own) == len(SPLITS):
        raise ValueError(f"text: task.seed (--task-seed) has no effect: {root} brings its own train, val "
                         "and test splits; leave it unset")
    folders = own or {"train": root}
    splits = {s: _cut(read_stream(find_text_files(f, pattern)), seq_len, str(f)) for s, f in folders.items()}
    splits = complete_splits(splits, False, val_fraction, test_fraction, seed,
                             {"train": train_size, "val": val_size, "test": test_size}, str(root))
    dev = torch.device(device)
    (trx, try_), (vax, vay), (tex, tey) = (splits[s] for s in SPLITS)
    return SequenceTask(
        name=f"text:{root.name}",
        train_x=trx.to(dev), train_y=try_.to(dev),
        val_x=vax.to(dev), val_y=vay.to(dev),
        test_x=tex.to(dev), test_y=tey.to(dev),
        num_classes=256, vocab=BYTE_VOCAB, joiner="",
    )
