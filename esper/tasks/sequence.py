"""The task contract for next-token prediction: token windows resident on one device.

`SequenceTask` mirrors `TaskData` (three splits, `split`, `to`, `prepare`, sizes) so the
sampler and the engine handle language tasks the way they handle images: a training example is
one window of `seq_len` tokens and its label is the same window shifted by one token, so every
position is a prediction. Tokens are the network input as they are (an embedding reads them), so
`prepare` is the identity and there is no augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from esper.tasks.base import TaskSplits


def windows(tokens: Tensor, seq_len: int, count: int | None = None) -> tuple[Tensor, Tensor]:
    """Cut a 1-D token stream into `count` non-overlapping windows: (x, y), each [count, L].

    Window i is ``tokens[i*(L+1) : (i+1)*(L+1)]``; x is its first L tokens and y its last L, so
    y[:, t] is the token that follows x[:, t]. `count=None` takes every full window. x and y are
    int64 views of one [count, L+1] buffer (half the memory of two copies; `.to(device)` on
    another device copies each).
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must have an integer dtype, got {tokens.dtype}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    span = seq_len + 1
    available = tokens.shape[0] // span
    if count is None:
        count = available
        if count == 0:
            raise ValueError(
                f"a stream of {tokens.shape[0]} tokens holds no full window of "
                f"seq_len+1={span} tokens"
            )
    elif count < 1:
        raise ValueError(f"count must be >= 1 (or None for every full window), got {count}")
    elif count > available:
        raise ValueError(
            f"asked for {count} windows of seq_len+1={span} tokens, but a stream of "
            f"{tokens.shape[0]} tokens holds only {available}"
        )
    buf = tokens[: count * span].to(torch.int64).reshape(count, span)
    return buf[:, :-1], buf[:, 1:]


@dataclass(frozen=True, eq=False)
class SequenceTask(TaskSplits):
    """A next-token-prediction task resident on one device.

    Splits as in `TaskData`: `train` (what hosts fit), `val` (what controllers, gates and rewards
    decide from), `test` (what results are reported on). `*_x` and `*_y` are [T, L] int64 token
    ids in [0, num_classes), y being x shifted by one token. `vocab[i]` is token i's text;
    `decode` joins token texts with `joiner` (" " for words, "" for bytes).
    """

    num_classes: int
    vocab: tuple[str, ...]
    joiner: str = " "
    augment: bool = False
    crop_padding: int = 0

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"{self.name}: num_classes (vocabulary size) must be >= 2, "
                             f"got {self.num_classes}")
        if len(self.vocab) != self.num_classes:
            raise ValueError(f"{self.name}: vocab has {len(self.vocab)} entries, "
                             f"num_classes is {self.num_classes}; they must be equal")
        if self.augment:
            raise ValueError(f"{self.name}: augment must be False: token windows have no "
                             "crop/flip augmentation")
        dev = self.train_x.device
        seq_len = self.train_x.shape[-1] if self.train_x.dim() == 2 else None
        for split, x, y in self.splits():
            for which, t in (("x", x), ("y", y)):
                if t.dim() != 2 or t.dtype != torch.int64:
                    raise ValueError(f"{self.name}: {split}_{which} must be int64 [n, seq_len], "
                                     f"got {t.dtype} {tuple(t.shape)}")
                if t.device != dev:
                    raise ValueError(f"{self.name}: all tensors must be on one device; "
                                     f"{split}_{which} is on {t.device}, train_x on {dev}")
            if y.shape != x.shape:
                raise ValueError(f"{self.name}: {split}_y must have {split}_x's shape "
                                 f"{tuple(x.shape)}, got {tuple(y.shape)}")
            if x.shape[0] == 0 or x.shape[1] == 0:
                raise ValueError(f"{self.name}: the {split} split is empty "
                                 f"(shape {tuple(x.shape)})")
            if x.shape[1] != seq_len:
                raise ValueError(f"{self.name}: {split} windows have {x.shape[1]} tokens, "
                                 f"train windows {seq_len}; seq_len must be the same everywhere")
            lo = int(torch.minimum(x.min(), y.min()))
            hi = int(torch.maximum(x.max(), y.max()))
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"{self.name}: {split} token ids span [{lo}, {hi}]; they must "
                                 f"lie in [0, {self.num_classes - 1}]")

    @property
    def seq_len(self) -> int:
        """Tokens per window (L)."""
        return int(self.train_x.shape[1])

    @property
    def sample_shape(self) -> tuple[int]:
        """Shape of one example: (L,) token ids."""
        return (self.seq_len,)

    @property
    def label_shape(self) -> tuple[int]:
        """Shape of one label: (L,) next-token ids, one per position."""
        return (self.seq_len,)

    def prepare(self, x: Tensor) -> Tensor:
        """Stored tokens -> network input: unchanged, since the network embeds token ids."""
        return x

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """Token ids (1-D tensor or sequence of ints) -> text, token texts joined by `joiner`."""
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(f"{self.name}: decode takes a 1-D sequence of token ids, "
                                 f"got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = []
        for i in ids:
            if not 0 <= int(i) < self.num_classes:
                raise ValueError(f"{self.name}: token id {i} is outside the vocabulary "
                                 f"[0, {self.num_classes - 1}]")
            out.append(self.vocab[int(i)])
        return self.joiner.join(out)
