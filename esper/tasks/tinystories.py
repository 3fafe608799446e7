"""TinyStories as byte-level next-token prediction, read from local files (nothing downloaded).

Why bytes: a fixed 256-token vocabulary needs no tokenizer files or training, is identical for
every copy of the data, and any text (including the odd non-ASCII character in the dataset)
round-trips exactly. Each story enters the stream as one boundary byte (0, never in the text)
followed by its UTF-8 bytes, and the stream is cut into non-overlapping windows.

Formats read, as the dataset is distributed: ``.txt`` files whose stories are separated by
``<|endoftext|>`` (TinyStories-train.txt, TinyStories-valid.txt, TinyStoriesV2-GPT4-*.txt),
``.json`` files holding a list of objects with a "story" (or "text") field (the
TinyStories_all_data/*.json shards) and ``.jsonl`` files of such objects, one per line.
Text files are streamed, so asking for `train_size` windows reads only that much of a large
training file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from esper.tasks.sequence import SequenceTask, windows

STORY_DELIMITER = b"<|endoftext|>"
BOUNDARY_BYTE = 0
BYTE_VOCAB: tuple[str, ...] = tuple(bytes([i]).decode("latin-1") for i in range(256))
SUFFIXES: tuple[str, ...] = (".txt", ".json", ".jsonl")
_CHUNK = 1 << 20
_LOOKED_FOR = (
    "TinyStories*.txt (stories separated by <|endoftext|>), *.json (a list of objects with a "
    '"story" or "text" field, e.g. TinyStories_all_data/*.json) or *.jsonl; nothing is '
    "downloaded: fetch the dataset yourself and pass root=<file or directory>"
)


def find_tinystories_files(root: str | Path) -> list[Path]:
    """The story files under `root`, sorted.

    `root` may be one file, or a directory; in a directory, files whose name contains
    "tinystories" win, then those of a subdirectory named like that (TinyStories_all_data),
    then any .txt/.json/.jsonl file directly in it.
    """
    root = Path(root)
    if root.is_file():
        if root.suffix not in SUFFIXES:
            raise ValueError(f"tinystories: {root} is not a .txt, .json or .jsonl file; "
                             f"expected {_LOOKED_FOR}")
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"tinystories: {root} does not exist; expected {_LOOKED_FOR}")

    def story_files(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in SUFFIXES)

    direct = story_files(root)
    named = [p for p in direct if "tinystories" in p.name.lower()]
    if named:
        return named
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if "tinystories" in sub.name.lower() and (found := story_files(sub)):
            return found
    if direct:
        return direct
    raise FileNotFoundError(f"tinystories: no story files in {root}; expected {_LOOKED_FOR}")


def _record_text(record: object, where: str) -> str:
    """The "story" (or "text") string of one JSON record."""
    if isinstance(record, dict):
        for key in ("story", "text"):
            if isinstance(record.get(key), str):
                return record[key]
    raise ValueError(f"tinystories: {where} must be an object with a string \"story\" or "
                     f"\"text\" field, got {str(record)[:80]!r}")


def iter_stories(path: Path) -> Iterator[bytes]:
    """The non-empty stories of one file, as UTF-8 bytes, in file order."""
    if path.suffix == ".txt":
        rest = b""
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                *done, rest = (rest + chunk).split(STORY_DELIMITER)
                yield from (s for s in (d.strip() for d in done) if s)
        if rest.strip():
            yield rest.strip()
    elif path.suffix == ".json":
        try:
            records = json.loads(path.read_bytes())
        except json.JSONDecodeError as exc:
            raise ValueError(f"tinystories: {path} is not valid JSON ({exc})") from exc
        if not isinstance(records, list):
            raise ValueError(f"tinystories: {path} must hold a JSON list of story objects, "
                             f"got {type(records).__name__}")
        for i, record in enumerate(records):
            story = _record_text(record, f"{path} entry {i}").strip()
            if story:
                yield story.encode("utf-8")
    elif path.suffix == ".jsonl":
        with path.open("rb") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"tinystories: {path} line {line_no} is not valid JSON "
                                     f"({exc})") from exc
                story = _record_text(record, f"{path} line {line_no}").strip()
                if story:
                    yield story.encode("utf-8")
    else:
        raise ValueError(f"tinystories: cannot read {path}; allowed suffixes: {SUFFIXES}")


def _collect(files: list[Path], limit: int | None) -> tuple[bytearray, list[int]]:
    """Byte stream of the files' stories (each after one boundary byte) and story offsets.

    Reading stops once the stream holds `limit` bytes (None: read everything).
    """
    buf, starts = bytearray(), []
    for path in files:
        for story in iter_stories(path):
            starts.append(len(buf))
            buf.append(BOUNDARY_BYTE)
            buf += story.replace(bytes([BOUNDARY_BYTE]), b"")
            if limit is not None and len(buf) >= limit:
                return buf, starts
    return buf, starts


def _cut(buf: bytearray | memoryview, seq_len: int, count: int | None, what: str
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` windows (None: all) of a byte stream, with an error naming the split."""
    span = seq_len + 1
    have = len(buf) // span
    if have == 0 or (count is not None and count > have):
        asked = "at least one" if count is None else str(count)
        raise ValueError(f"tinystories: not enough text: {what} holds {len(buf)} bytes = {have} "
                         f"windows of seq_len+1={span} bytes; asked for {asked}")
    return windows(torch.frombuffer(buf, dtype=torch.uint8), seq_len, count)


def load_tinystories(
    *,
    root: str | Path = "data",
    seq_len: int = 128,
    train_size: int | None = None,
    val_size: int = 512,
    test_size: int = 512,
    device: torch.device | str = "cpu",
) -> SequenceTask:
    """TinyStories as a byte-level `SequenceTask` (vocabulary: the 256 byte values).

    Validation then test windows come from the "valid" file(s) when they sit beside training
    files (in a directory, or as the train file's sibling with "train" -> "valid" in its name);
    otherwise the last stories are held out for them, so no story is split between training
    and evaluation. `train_size=None` takes every full training window; all of TinyStories
    is then several GB of int64 tokens, so give a size for quick runs.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if val_size < 1 or test_size < 1 or (train_size is not None and train_size < 1):
        raise ValueError(f"train_size (or None), val_size and test_size must be positive, got "
                         f"{train_size}, {val_size}, {test_size}")
    files = find_tinystories_files(root)
    root_path = Path(root)
    if root_path.is_file() and "train" in root_path.name:
        sibling = root_path.with_name(root_path.name.replace("train", "valid"))
        if sibling.is_file():
            files = [root_path, sibling]
    held_files = [p for p in files if "valid" in p.name.lower()]
    train_files = [p for p in files if p not in held_files]
    span = seq_len + 1
    n_held = (val_size + test_size) * span
    if held_files and train_files:
        limit = None if train_size is None else train_size * span
        train_buf, starts = _collect(train_files, limit)
        held_buf, held_starts = _collect(held_files, n_held)
        if not starts or not held_starts:
            empty = train_files if not starts else held_files
            raise ValueError(f"tinystories: no stories found in {[str(p) for p in empty]}; "
                             f"expected {_LOOKED_FOR}")
        train_view, held_view = memoryview(train_buf), memoryview(held_buf)
        train_what = f"the training text ({[p.name for p in train_files]})"
        held_what = f"the validation text ({[p.name for p in held_files]})"
    else:
        buf, starts = _collect(files, None)
        if not starts:
            raise ValueError(f"tinystories: no stories found in {[str(p) for p in files]}; "
                             f"expected {_LOOKED_FOR}")
        # Hold out the fewest last stories whose bytes cover val + test.
        k = len(starts) - 1
        while k > 0 and len(buf) - starts[k] < n_held:
            k -= 1
        if len(buf) - starts[k] < n_held or k == 0:
            raise ValueError(
                f"tinystories: not enough text: {[p.name for p in files]} hold {len(starts)} "
                f"stories, {len(buf)} bytes = {len(buf) // span} windows of seq_len+1={span} "
                f"bytes; val_size + test_size = {val_size + test_size} windows must come from "
                "the last stories with at least one story left for training"
            )
        view = memoryview(buf)
        train_view, held_view = view[: starts[k]], view[starts[k] :]
        train_what = f"the training stories (all but the last {len(starts) - k})"
        held_what = f"the last {len(starts) - k} stories"
    train_x, train_y = _cut(train_view, seq_len, train_size, train_what)
    held_x, held_y = _cut(held_view, seq_len, val_size + test_size, held_what)
    dev = torch.device(device)
    return SequenceTask(
        name="tinystories",
        train_x=train_x.to(dev),
        train_y=train_y.to(dev),
        val_x=held_x[:val_size].to(dev),
        val_y=held_y[:val_size].to(dev),
        test_x=held_x[val_size:].to(dev),
        test_y=held_y[val_size:].to(dev),
        num_classes=256,
        vocab=BYTE_VOCAB,
        joiner="",
    )
