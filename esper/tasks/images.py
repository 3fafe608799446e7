"""A user's own image classification data: a torchvision-style ImageFolder tree, or arrays.

Formats:
- **ImageFolder**: ``root/<class>/<image>`` (the class list is the sorted folder names), or the
  same under ``root/train``, ``root/val`` and/or ``root/test`` for splits of the user's own.
- **Arrays**: an ``.npz`` or ``.pt`` file holding ``x`` and ``y``, or ``x_train``/``y_train``
  with optional ``x_val``/``y_val`` and ``x_test``/``y_test``; optional ``classes`` (names).
  ``x`` is ``[n, H, W]``, ``[n, C, H, W]`` or ``[n, H, W, C]`` with C 1 or 3, uint8 pixels or
  floats. ``y`` holds integer labels in ``[0, K)``.

Any image size, 1 or 3 channels, any number of classes (at least 2). The per-channel mean and
std are computed from the training split. Splits the data lacks are carved from its training
part with a seed (stratified, :mod:`esper.tasks.carve`). Every problem is one ``ValueError``
naming the file or folder and what is allowed, raised before anything is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from esper.tasks.base import TaskData
from esper.tasks.carve import complete_splits

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                                   ".ppm", ".pgm")
ARRAY_SUFFIXES: tuple[str, ...] = (".npz", ".pt")
SPLITS: tuple[str, ...] = ("train", "val", "test")
Split = tuple[Tensor, Tensor]  # (images [n, C, H, W] uint8 or float32, labels [n] int64)


# ----------------------------------------------------------------------------- ImageFolder
def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            gray = im.mode in ("1", "L", "I", "I;16", "F")
            arr = np.asarray(im.convert("L" if gray else "RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"images: cannot read image {path}: {err}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # [C, H, W]


def _read_folder(folder: Path, classes: list[str] | None) -> tuple[list[np.ndarray], list[int], list[str],
                                                                   list[Path]]:
    dirs = _class_dirs(folder)
    if not dirs:
        raise ValueError(f"images: {folder} holds no class folders; expected {folder}/<class>/<image> "
                         f"(an ImageFolder tree) with images {list(IMAGE_SUFFIXES)}")
    names = [d.name for d in dirs]
    if classes is None:
        classes = names
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ValueError(f"images: {folder} has class folders {unknown} that the train split lacks; "
                         f"allowed: {classes}")
    images: list[np.ndarray] = []
    labels: list[int] = []
    files: list[Path] = []
    for d in dirs:
        found = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ValueError(f"images: class folder {d} is empty: it holds no images {list(IMAGE_SUFFIXES)}")
        for p in found:
            images.append(_read_image(p))
            labels.append(classes.index(d.name))
            files.append(p)
    return images, labels, classes, files


def _stack(images: list[np.ndarray], files: list[Path]) -> Tensor:
    """One uint8 tensor; sizes must agree, and a grey image joins colour ones as RGB."""
    channels = max(im.shape[0] for im in images)
    first = images[0].shape[1:]
    for im, f in zip(images, files, strict=True):
        if im.shape[1:] != first:
            raise ValueError(f"images: mixed sizes: {files[0]} is {first[1]}x{first[0]} but {f} is "
                             f"{im.shape[2]}x{im.shape[1]}; every image must have one size (resize them first)")
    out = [np.repeat(im, channels, axis=0) if im.shape[0] != channels else im for im in images]
    return torch.from_numpy(np.stack(out))


def read_image_folder(root: Path) -> tuple[dict[str, Split], list[str]]:
    """The splits present in an ImageFolder tree and the class names."""
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if split_dirs and "train" not in split_dirs:
        raise ValueError(f"images: {root} has {sorted(split_dirs)} but no train/ folder; give train/ "
                         "(val/ and test/ optional), or class folders directly in it")
    folders = split_dirs or {"train": root}
    out: dict[str, Split] = {}
    classes: list[str] | None = None
    all_images: list[np.ndarray] = []
    all_files: list[Path] = []
    counts: dict[str, int] = {}
    labels_of: dict[str, list[int]] = {}
    for split in (s for s in SPLITS if s in folders):
        images, labels, classes, files = _read_folder(folders[split], classes)
        all_images += images
        all_files += files
        counts[split] = len(images)
        labels_of[split] = labels
    x = _stack(all_images, all_files)
    start = 0
    for split, n in counts.items():
        out[split] = (x[start : start + n], torch.tensor(labels_of[split], dtype=torch.int64))
        start += n
    assert classes is not None
    return out, classes


# ----------------------------------------------------------------------------- arrays
def _load_arrays(path: Path) -> dict[str, Any]:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is one clear error
        raise ValueError(f"images: cannot read arrays from {path}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"images: {path} must hold a dict of arrays (x, y, ...), got {type(data).__name__}")
    return data


def _images(x: Any, where: str) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if t.dim() == 3:
        t = t[:, None]
    elif t.dim() == 4 and t.shape[1] not in (1, 3) and t.shape[3] in (1, 3):
        t = t.permute(0, 3, 1, 2)
    if t.dim() != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"images: {where} has shape {list(t.shape)}; allowed: [n, H, W], [n, C, H, W] "
                         "or [n, H, W, C] with C 1 or 3")
    if t.dtype == torch.uint8:
        return t.contiguous()
    if t.dtype.is_floating_point:
        return t.float().contiguous()
    if t.dtype in (torch.int16, torch.int32, torch.int64, torch.uint16) and t.numel() and \
            int(t.min()) >= 0 and int(t.max()) <= 255:
        return t.to(torch.uint8).contiguous()
    raise ValueError(f"images: {where} is {t.dtype}; allowed: uint8 pixels (0..255) or floats")


def _labels(y: Any, n: int, where: str) -> Tensor:
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"images: {where} must be {n} integer labels (one per image), "
                         f"got {t.dtype} {list(t.shape)}")
    return t.to(torch.int64)


def read_arrays(path: Path) -> tuple[dict[str, Split], list[str] | None]:
    """The splits in an ``.npz``/``.pt`` file, and its class names when it has them."""
    data = _load_arrays(path)
    split_keys = [s for s in SPLITS if f"x_{s}" in data]
    if split_keys and "x" in data:
        raise ValueError(f"images: {path} has both x and x_{split_keys[0]}; give x/y, or per-split keys")
    wanted = {s: (f"x_{s}", f"y_{s}") for s in split_keys} if split_keys else {"train": ("x", "y")}
    if "train" not in wanted:
        raise ValueError(f"images: {path} has {[f'x_{s}' for s in split_keys]} but no x_train")
    out: dict[str, Split] = {}
    for split, (kx, ky) in wanted.items():
        if ky not in data:
            raise ValueError(f"images: {path} has {kx} but no {ky}; found keys {sorted(data)}")
        x = _images(data[kx], f"{path}[{kx}]")
        out[split] = (x, _labels(data[ky], x.shape[0], f"{path}[{ky}]"))
    shapes = {s: tuple(x.shape[1:]) for s, (x, _) in out.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"images: mixed sizes across splits in {path}: {shapes}")
    classes = [str(c) for c in np.asarray(data["classes"]).tolist()] if "classes" in data else None
    return out, classes


# ----------------------------------------------------------------------------- the task
def _check_labels(splits: dict[str, Split], classes: list[str] | None, where: str) -> int:
    ys = torch.cat([y for _, y in splits.values()])
    if ys.numel() == 0:
        raise ValueError(f"images: {where} holds no images")
    k = len(classes) if classes is not None else int(ys.max()) + 1
    bad = ys[(ys < 0) | (ys >= k)]
    if bad.numel():
        raise ValueError(f"images: label {int(bad[0])} out of range in {where}; allowed: 0..{k - 1}"
                         + (f" ({k} classes)" if classes is not None else ""))
    if k < 2:
        raise ValueError(f"images: {where} has {k} class; at least 2 are needed")
    present = torch.bincount(splits["train"][1], minlength=k)
    empty = (present == 0).nonzero().flatten().tolist()
    if empty:
        name = classes[empty[0]] if classes is not None else str(empty[0])
        raise ValueError(f"images: class {name!r} has no training images in {where}; every class "
                         f"in 0..{k - 1} needs some")
    return k


def _mean_std(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    f = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    mean = f.mean(dim=(0, 2, 3))
    std = f.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


def load_images(
    path: str | Path,
    *,
    seed: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    crop: bool = True,
    flip: bool = False,
    device: torch.device | str = "cpu",
) -> TaskData:
    """A user's images as a :class:`TaskData` on ``device``.

    ``seed`` carves the splits the data lacks (0 when None); it is refused when the data brings
    all three, since it would do nothing. ``*_size`` keep the first n of a split. ``crop`` is a
    random crop with zero padding of H/8 pixels, ``flip`` a horizontal mirror (off by default:
    it changes the meaning of digits and text).
    """
    root = Path(path)
    if not root.exists():
        raise ValueError(f"images: {root} does not exist; expected an ImageFolder directory or an "
                         f"array file {list(ARRAY_SUFFIXES)}")
    if root.is_dir():
        splits, classes = read_image_folder(root)
    elif root.suffix in ARRAY_SUFFIXES:
        splits, classes = read_arrays(root)
    else:
        raise ValueError(f"images: {root} is neither a directory (ImageFolder) nor an array file "
                         f"{list(ARRAY_SUFFIXES)}")
    k = _check_labels(splits, classes, str(root))
    if seed is not None and all(s in splits for s in SPLITS):
        raise ValueError(f"images: task.seed (--task-seed) has no effect: {root} brings its own train, "
                         "val and test splits; leave it unset")
    splits = complete_splits(splits, True, val_fraction, test_fraction, seed,
                             {"train": train_size, "val": val_size, "test": test_size}, str(root))
    mean, std = _mean_std(splits["train"][0])
    h = int(splits["train"][0].shape[2])
    dev = torch.device(device)
    (trx, try_), (vax, vay), (tex, tey) = (splits[s] for s in SPLITS)
    return TaskData(
        name=f"images:{root.name}",
        train_x=trx.contiguous().to(dev), train_y=try_.to(dev),
        val_x=vax.contiguous().to(dev), val_y=vay.to(dev),
        test_x=tex.contiguous().to(dev), test_y=tey.to(dev),
        num_classes=k, mean=mean, std=std,
        augment=crop or flip, crop_padding=max(1, h // 8) if crop else 0, flip=flip,
    )
