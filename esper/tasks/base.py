"""The task contract shared by every dataset, and batched on-device augmentation.

A task is a handful of tensors already on the training device. Images may be stored as uint8
(CIFAR: four times less memory, and augmentation gathers move bytes) or float32 (the synthetic
task); `TaskData.prepare` turns either into normalized float32 at batch time, on the device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor


def crop_flip(x: Tensor, padding: int, oy: Tensor, ox: Tensor, flip: Tensor) -> Tensor:
    """Crop (zero padding of `padding` pixels) and optionally mirror every image of `x`.

    `x` is [..., C, H, W] of any dtype; `oy`, `ox` (int64 in [0, 2*padding]) and `flip` (bool)
    hold one value per image, shaped like x's leading dims. The images are padded once and the
    result is ONE advanced-indexing gather with computed row/column indices: no loop over envs
    or samples. Padding happens before normalization, as torchvision's RandomCrop does on pixels.
    """
    *lead, c, h, w = x.shape
    flat = x.reshape(-1, c, h, w)
    n = flat.shape[0]
    dev = x.device
    oy, ox, flip = oy.reshape(n), ox.reshape(n), flip.reshape(n)
    padded = F.pad(flat, (padding, padding, padding, padding)) if padding > 0 else flat
    cols = torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], (w - 1) - cols, cols) + ox[:, None]  # [n, W]
    rows = oy[:, None] + torch.arange(h, device=dev)  # [n, H]
    out = padded[
        torch.arange(n, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    return out.reshape(*lead, c, h, w)


@dataclass(frozen=True, eq=False)
class TaskSplits:
    """The three splits' tensors and the accessors every task shares: image classification
    (:class:`TaskData`) and next-token prediction (``SequenceTask``) add their own fields."""

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def splits(self) -> tuple[tuple[str, Tensor, Tensor], ...]:
        """``(name, x, y)`` of the train, val and test splits, in that order."""
        return (
            ("train", self.train_x, self.train_y),
            ("val", self.val_x, self.val_y),
            ("test", self.test_x, self.test_y),
        )

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of split ``name`` (train, val or test)."""
        for split, x, y in self.splits():
            if split == name:
                return x, y
        raise ValueError(f"{self.name}: unknown split {name!r}; allowed: train, val, test")

    @property
    def train_size(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def val_size(self) -> int:
        return int(self.val_x.shape[0])

    @property
    def test_size(self) -> int:
        return int(self.test_x.shape[0])

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def to(self, device: torch.device | str) -> Self:
        """The same task with every tensor moved to `device`."""
        device = torch.device(device)
        if device == self.device:
            return self
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            val_x=self.val_x.to(device),
            val_y=self.val_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )


@dataclass(frozen=True, eq=False)
class TaskData(TaskSplits):
    """An image-classification task resident on one device.

    Three splits: `train` (what hosts fit), `val` (what controllers, gates and rewards decide
    from) and `test` (what results are reported on; nothing decides from it). `*_x` are
    [T, C, H, W] (uint8 raw pixels or float32), `*_y` are [T] int64. `mean`/`std` (per channel,
    on the [0, 1] scale for uint8 data) are applied by `prepare`; `augment` asks the sampler for
    random crop (zero padding of ``crop_padding`` pixels; 0: no crop) and, when ``flip``, a
    horizontal mirror, on training batches only. Validation and test are each one shared set:
    every env is scored on the same images.
    """

    num_classes: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: bool = False
    crop_padding: int = 4
    flip: bool = True
    _mean_t: Tensor | None = field(init=False, repr=False, default=None)
    _std_t: Tensor | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        for split, x, y in self.splits():
            if x.dim() != 4:
                raise ValueError(
                    f"{self.name}: {split}_x must be [n, C, H, W], got {tuple(x.shape)}"
                )
            if x.dtype not in (torch.uint8, torch.float32):
                raise ValueError(f"{self.name}: {split}_x must be uint8 or float32, got {x.dtype}")
            if y.shape != (x.shape[0],) or y.dtype != torch.int64:
                raise ValueError(
                    f"{self.name}: {split}_y must be int64 [{x.shape[0]}], "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
            if x.device != self.train_x.device or y.device != self.train_x.device:
                raise ValueError(f"{self.name}: all tensors must be on one device")
        for split, x, _ in self.splits():
            if x.shape[1:] != self.train_x.shape[1:]:
                raise ValueError(f"{self.name}: {split} images are {tuple(x.shape[1:])}, "
                                 f"train images {tuple(self.train_x.shape[1:])}")
            if x.shape[0] == 0:
                raise ValueError(f"{self.name}: the {split} split is empty")
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"{self.name}: give both mean and std, or neither")
        if self.mean is not None and self.std is not None:
            c = self.train_x.shape[1]
            if len(self.mean) != c or len(self.std) != c:
                raise ValueError(f"{self.name}: mean/std need {c} entries")
            dev = self.train_x.device
            object.__setattr__(self, "_mean_t", torch.tensor(self.mean, device=dev).view(c, 1, 1))
            object.__setattr__(self, "_std_t", torch.tensor(self.std, device=dev).view(c, 1, 1))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One network input's shape (the image's (C, H, W)); sequence tasks give (L,)."""
        return self.image_shape

    @property
    def label_shape(self) -> tuple[int, ...]:
        """One sample's target shape: a single class per image."""
        return ()

    def prepare(self, x: Tensor) -> Tensor:
        """Stored images [..., C, H, W] -> normalized float32 network input, on x's device."""
        out = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self._mean_t is not None and self._std_t is not None:
            out = (out - self._mean_t.to(out.device)) / self._std_t.to(out.device)
        return out
