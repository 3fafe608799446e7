"""CIFAR-10 from the standard python-pickle directory, kept on the device as uint8.

Our own reader rather than torchvision's: torchvision verifies md5 sums, which any trimmed or
test copy of the directory fails, and its errors do not say which file is wrong. torchvision is
used only to download, when asked. The files are pickles, so only point this at a trusted copy.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from esper.tasks.base import TaskData

CIFAR_DIRNAME = "cifar-10-batches-py"
TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
CIFAR_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
_PIXELS = 3 * 32 * 32


def find_cifar_dir(root: str | Path) -> Path:
    """The batch directory: `root/cifar-10-batches-py` if present, else `root` itself."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 data directory {root} does not exist; expected it to contain "
            f"{CIFAR_DIRNAME}/ (pass download=True to fetch it)"
        )
    nested = root / CIFAR_DIRNAME
    return nested if nested.is_dir() else root


def _get(d: dict[object, object], key: str) -> object:
    """Look up a key stored as bytes (python-2 pickles) or str."""
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 images [n, 3, 32, 32], int64 labels [n]), validated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch file {path} is missing")
    try:
        with path.open("rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as exc:  # any unpickling failure means the file is not a CIFAR batch
        raise ValueError(f"{path}: not a readable CIFAR-10 pickle ({exc!r})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    data, labels = _get(obj, "data"), _get(obj, "labels")
    if data is None or labels is None:
        raise ValueError(
            f"{path}: expected keys b'data' and b'labels', found {sorted(map(repr, obj))}"
        )
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise ValueError(
            f"{path}: b'data' must be uint8 [n, {_PIXELS}], got {data.dtype} {list(data.shape)}"
        )
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != data.shape[0] or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(
            f"{path}: b'labels' must be {data.shape[0]} integers (one per image), "
            f"got {lab.dtype} {list(lab.shape)}"
        )
    if lab.size and (lab.min() < 0 or lab.max() > 9):
        raise ValueError(f"{path}: labels must lie in [0, 9], got [{lab.min()}, {lab.max()}]")
    return data.reshape(-1, 3, 32, 32), lab.astype(np.int64)


def _read_split(folder: Path, files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 directory {folder} lacks batch file(s) {missing}; expected "
            f"{[*TRAIN_FILES, TEST_FILE]} (the python-pickle format)"
        )
    parts = [read_cifar_batch(folder / f) for f in files]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(x), torch.from_numpy(y)


def load_cifar10(
    root: str | Path = "data",
    *,
    download: bool = False,
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    crop: bool = True,
    flip: bool = True,
    device: torch.device | str = "cpu",
) -> TaskData:
    """CIFAR-10 as a `TaskData` (uint8 on `device`, normalized and augmented at batch time).

    Validation is carved out of the training batches (their last `val_size` images, 5000 by
    default); the official test batch is the test split, which nothing decides from.
    `train_size`/`test_size` keep the first n images of those splits (the files are already
    shuffled), for quick CPU runs.
    """
    if download:
        import torchvision  # only needed for the network fetch

        Path(root).mkdir(parents=True, exist_ok=True)
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    folder = find_cifar_dir(root)
    all_x, all_y = _read_split(folder, TRAIN_FILES)
    test_x, test_y = _read_split(folder, (TEST_FILE,))
    n_val = val_size if val_size is not None else min(5000, len(all_y) // 10)
    if not 0 < n_val < len(all_y):
        raise ValueError(
            f"val_size={n_val} must be in [1, {len(all_y) - 1}]: validation is carved out of the "
            f"{len(all_y)} training images"
        )
    train_x, train_y = all_x[: len(all_y) - n_val], all_y[: len(all_y) - n_val]
    val_x, val_y = all_x[len(all_y) - n_val :], all_y[len(all_y) - n_val :]
    for name, size, total in (
        ("train_size", train_size, len(train_y)),
        ("test_size", test_size, len(test_y)),
    ):
        if size is not None and not 0 < size <= total:
            raise ValueError(f"{name}={size} must be in [1, {total}]")
    if train_size is not None:
        train_x, train_y = train_x[:train_size], train_y[:train_size]
    if test_size is not None:
        test_x, test_y = test_x[:test_size], test_y[:test_size]
    dev = torch.device(device)
    return TaskData(
        name="cifar10",
        train_x=train_x.contiguous().to(dev),
        train_y=train_y.to(dev),
        val_x=val_x.contiguous().to(dev),
        val_y=val_y.to(dev),
        test_x=test_x.contiguous().to(dev),
        test_y=test_y.to(dev),
        num_classes=10,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        augment=crop or flip,
        crop_padding=4 if crop else 0,
        flip=flip,
    )
