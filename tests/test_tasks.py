"""Tasks: synthetic determinism, CIFAR reader and its errors, per-env sampler, augmentation."""

from __future__ import annotations

import dataclasses
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from esper.tasks import (
    CIFAR_MEAN,
    CIFAR_STD,
    TASKS,
    EnvBatchSampler,
    TaskData,
    crop_flip,
    load_cifar10,
    load_task,
    make_synthetic_task,
)

SMALL = {"train_size": 300, "val_size": 70}


@pytest.fixture(scope="module")
def synth() -> TaskData:
    return make_synthetic_task(**SMALL, seed=3)


def _write_batch(path: Path, n: int, offset: int, rng: np.random.Generator) -> None:
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [(offset + i) % 10 for i in range(n)]
    with path.open("wb") as f:
        pickle.dump({b"batch_label": b"x", b"data": data, b"labels": labels}, f)


@pytest.fixture()
def cifar_dir(tmp_path: Path) -> Path:
    """A miniature CIFAR-10 directory: 20 images per batch file."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _write_batch(folder / f"data_batch_{i}", 20, 20 * i, rng)
    _write_batch(folder / "test_batch", 20, 0, rng)
    return tmp_path


# ---------------------------------------------------------------- synthetic


def test_synthetic_same_seed_bit_identical(synth: TaskData) -> None:
    again = make_synthetic_task(**SMALL, seed=3)
    for a, b in ((synth.train_x, again.train_x), (synth.val_x, again.val_x)):
        assert torch.equal(a, b)
    assert torch.equal(synth.train_y, again.train_y)
    assert torch.equal(synth.val_y, again.val_y)


def test_synthetic_different_seed_differs(synth: TaskData) -> None:
    other = make_synthetic_task(**SMALL, seed=4)
    assert not torch.equal(synth.train_x, other.train_x)


def test_synthetic_shapes_and_stats() -> None:
    task = make_synthetic_task(num_classes=5, image_size=12, channels=2, **SMALL)
    assert task.image_shape == (2, 12, 12)
    assert task.train_x.dtype == torch.float32 and task.train_y.dtype == torch.int64
    assert task.train_size == 300 and task.val_size == 70
    assert task.num_classes == 5 and not task.augment
    assert int(task.train_y.min()) >= 0 and int(task.train_y.max()) < 5
    assert len(torch.unique(task.train_y)) == 5
    assert abs(float(task.train_x.mean())) < 0.05
    assert abs(float(task.train_x.std()) - 1.0) < 0.05
    assert torch.equal(task.prepare(task.val_x), task.val_x)


def test_synthetic_default_generation_is_fast() -> None:
    times = []
    for _ in range(2):  # best of two: the first call also pays one-off lazy initialization
        start = time.perf_counter()
        task = load_task()
        times.append(time.perf_counter() - start)
    assert task.name == "synthetic" and task.train_size == 4096 and task.val_size == 1024
    assert task.image_shape == (3, 16, 16) and task.num_classes == 10
    assert min(times) < 2.0


def test_synthetic_rejects_impossible_config() -> None:
    with pytest.raises(ValueError, match="combinations"):
        make_synthetic_task(num_motifs=4, modes_per_class=3, **SMALL)
    with pytest.raises(ValueError):
        make_synthetic_task(train_size=0)


# ---------------------------------------------------------------- registry


def test_registry_names_and_unknown_task() -> None:
    assert set(TASKS) == {"synthetic", "cifar10", "grammar", "tinystories", "images", "text"}
    with pytest.raises(ValueError, match=r"unknown task 'mnist'.*cifar10.*synthetic"):
        load_task("mnist")


def test_registry_loads_cifar(cifar_dir: Path) -> None:
    task = load_task("cifar10", root=cifar_dir)
    # validation is carved out of the 100 training images; the test batch is the test split
    assert task.name == "cifar10" and (task.train_size, task.val_size, task.test_size) == (90, 10, 20)


# ---------------------------------------------------------------- cifar


def test_cifar_reader(cifar_dir: Path) -> None:
    task = load_cifar10(cifar_dir)
    assert task.train_x.shape == (90, 3, 32, 32) and task.train_x.dtype == torch.uint8
    assert task.val_x.shape == (10, 3, 32, 32) and task.test_x.shape == (20, 3, 32, 32)
    # train and val split the training batches (val is their tail); test is test_batch
    assert torch.equal(task.train_y, torch.tensor([i % 10 for i in range(20, 110)]))
    assert torch.equal(task.val_y, torch.tensor([i % 10 for i in range(110, 120)]))
    assert torch.equal(task.test_y, torch.tensor([i % 10 for i in range(20)]))
    assert task.augment and task.mean == CIFAR_MEAN and task.std == CIFAR_STD
    # Rows are laid out channel-major (R plane, G plane, B plane) as in the real files.
    with (cifar_dir / "cifar-10-batches-py" / "data_batch_1").open("rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    assert torch.equal(task.train_x[0, 1].reshape(-1), torch.from_numpy(raw[0, 1024:2048]))
    # The batch directory itself is accepted as root; subsets keep the first n.
    sub = load_cifar10(cifar_dir / "cifar-10-batches-py", train_size=30, val_size=5, test_size=7)
    assert (sub.train_size, sub.val_size, sub.test_size) == (30, 5, 7)
    assert torch.equal(sub.train_x, task.train_x[:30]) and torch.equal(sub.test_x, task.test_x[:7])
    assert torch.equal(sub.val_x, task.val_x[5:])  # the last 5 training images
    with pytest.raises(ValueError, match="val_size=100"):
        load_cifar10(cifar_dir, val_size=100)


def test_cifar_prepare_normalizes(cifar_dir: Path) -> None:
    task = load_cifar10(cifar_dir)
    x = task.prepare(task.val_x[:4])
    assert x.dtype == torch.float32
    mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(3, 1, 1)
    torch.testing.assert_close(x, (task.val_x[:4].float() / 255 - mean) / std)


def test_cifar_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")


def test_cifar_missing_batch_file(cifar_dir: Path) -> None:
    (cifar_dir / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(cifar_dir)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([1, 2, 3], "expected a pickled dict"),
        ({b"pixels": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, "expected keys"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"uint8 \[n, 3072\]"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, r"uint8 \[n, 3072\]"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "one per image"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, r"\[0, 9\]"),
    ],
)
def test_cifar_malformed_file(cifar_dir: Path, content: object, message: str) -> None:
    path = cifar_dir / "cifar-10-batches-py" / "data_batch_2"
    with path.open("wb") as f:
        pickle.dump(content, f)
    with pytest.raises(ValueError, match=message) as info:
        load_cifar10(cifar_dir)
    assert "data_batch_2" in str(info.value)


def test_cifar_garbage_file(cifar_dir: Path) -> None:
    (cifar_dir / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"test_batch.*not a readable"):
        load_cifar10(cifar_dir)


# ---------------------------------------------------------------- augmentation


def test_crop_flip_matches_reference() -> None:
    x = torch.arange(2 * 3 * 3 * 5, dtype=torch.float32).view(2, 3, 3, 5)
    imgs = x.reshape(1, 2, 3, 3, 5)  # [N=1, B=2, C=3, H=3, W=5]
    oy = torch.tensor([[0, 2]])
    ox = torch.tensor([[2, 1]])
    flip = torch.tensor([[False, True]])
    out = crop_flip(imgs, 1, oy, ox, flip)
    padded = torch.nn.functional.pad(imgs[0], (1, 1, 1, 1))
    for b in range(2):
        ref = padded[b, :, oy[0, b] : oy[0, b] + 3, ox[0, b] : ox[0, b] + 5]
        if flip[0, b]:
            ref = ref.flip(-1)
        assert torch.equal(out[0, b], ref)


# ---------------------------------------------------------------- sampler (keyed per env)


def _signatures(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One number per image ([..., C, H, W] + labels [...]) to match images across orders."""
    return x.flatten(-3).sum(-1) * 1000 + y


def _epoch(s: EnvBatchSampler, keys: torch.Tensor, epoch: torch.Tensor | int):
    """All steps of one keyed epoch, concatenated: x [N, T', C, H, W], y [N, T']."""
    steps = list(s.epoch(keys, epoch))
    assert len(steps) == s.steps_per_epoch == len(s)
    return torch.cat([x for x, _ in steps], 1), torch.cat([y for _, y in steps], 1)


def test_sampler_covers_every_example_once(synth: TaskData) -> None:
    s = EnvBatchSampler(synth, n_envs=3, batch_size=64)  # 64 does not divide T = 300
    assert s.steps_per_epoch == len(s) == 5
    steps = list(s.epoch(torch.tensor([1, 2, 3]), 0))
    assert [y.shape[1] for _, y in steps] == [64, 64, 64, 64, 44]
    for x, y in steps:
        assert x.shape[0] == 3 and x.shape[2:] == (3, 16, 16) and x.dtype == torch.float32
        assert y.shape == x.shape[:2] and y.dtype == torch.int64
    x_all, y_all = torch.cat([x for x, _ in steps], 1), torch.cat([y for _, y in steps], 1)
    assert x_all.shape == (3, 300, 3, 16, 16)
    # Every env saw every training image exactly once (match sorted per-image signatures).
    want = torch.sort(_signatures(synth.train_x, synth.train_y)).values
    for env in range(3):
        got = _signatures(x_all[env], y_all[env])
        torch.testing.assert_close(torch.sort(got).values, want)
    # Envs get different orders.
    assert not torch.equal(y_all[0], y_all[1]) and not torch.equal(y_all[1], y_all[2])


def test_sampler_drop_last(synth: TaskData) -> None:
    d = EnvBatchSampler(synth, n_envs=2, batch_size=64, drop_last=True)
    assert d.steps_per_epoch == len(d) == 4
    x_all, y_all = _epoch(d, torch.tensor([5, 6]), 0)
    assert x_all.shape[:2] == (2, 256)
    for env in range(2):  # a shuffle's prefix: no example repeats within the epoch
        sig = _signatures(x_all[env], y_all[env])
        assert len(torch.unique(sig)) == 256


def test_sampler_keyed_epochs_reproduce_and_reshuffle(synth: TaskData) -> None:
    keys = torch.tensor([7, 8, 9])
    a = EnvBatchSampler(synth, 3, 64)
    b = EnvBatchSampler(synth, 3, 64)
    xa, ya = _epoch(a, keys, 2)
    xb, yb = _epoch(b, keys, torch.tensor([2, 2, 2]))  # scalar epoch == per-env epochs
    assert torch.equal(xa, xb) and torch.equal(ya, yb)  # same (keys, epoch): same data
    xa2, ya2 = _epoch(a, keys, 2)
    assert torch.equal(xa, xa2) and torch.equal(ya, ya2)  # no hidden state in the sampler
    x3, _ = _epoch(a, keys, 3)
    for env in range(3):  # a new epoch reshuffles every env
        assert not torch.equal(x3[env], xa[env])


def test_sampler_keyed_epoch_independent_of_batch(cifar_dir: Path) -> None:
    task = load_cifar10(cifar_dir)
    assert task.augment
    keys = torch.tensor([11, 22, 33])
    epoch = torch.tensor([0, 4, 1])
    full = EnvBatchSampler(task, 3, 32)
    solo = EnvBatchSampler(task, 1, 32)
    batched = list(full.epoch(keys, epoch))
    alone = list(solo.epoch(keys[1:2], epoch[1:2]))
    assert len(batched) == full.steps_per_epoch == 3  # 90 training images, 32 a batch
    for (xb, yb), (xs, ys) in zip(batched, alone, strict=True):
        assert torch.equal(xb[1:2], xs) and torch.equal(yb[1:2], ys)
    ys_all = torch.cat([y for _, y in batched], 1)
    for env in range(3):
        assert torch.equal(torch.sort(ys_all[env]).values, torch.sort(task.train_y).values)
    again = list(full.epoch(keys, epoch + 1))
    assert not torch.equal(again[0][1], batched[0][1])


def test_sampler_augments_cifar(cifar_dir: Path) -> None:
    task = load_cifar10(cifar_dir)
    keys = torch.tensor([3, 4])
    s = EnvBatchSampler(task, n_envs=2, batch_size=90)
    x, y = next(iter(s.epoch(keys, 0)))
    assert x.shape == (2, 90, 3, 32, 32) and x.dtype == torch.float32
    lo = (0 - max(CIFAR_MEAN)) / min(CIFAR_STD)
    hi = (1 - min(CIFAR_MEAN)) / min(CIFAR_STD)
    assert float(x.min()) >= lo - 1e-4 and float(x.max()) <= hi + 1e-4
    # Augmentation does not change the order: without it, the same keys give the same labels
    # and the plain normalized training images, which the augmented batch differs from.
    off = EnvBatchSampler(dataclasses.replace(task, augment=False), 2, 90)
    x2, y2 = next(iter(off.epoch(keys, 0)))
    assert torch.equal(y, y2) and not torch.equal(x, x2)
    want = torch.sort(_signatures(task.prepare(task.train_x), task.train_y)).values
    for env in range(2):
        got = _signatures(x2[env], y2[env])
        torch.testing.assert_close(torch.sort(got).values, want)


def test_sampler_crop_flip_varies_per_sample() -> None:
    # Every training image is the same picture, so the outputs differ only by crop and flip.
    base = torch.randint(
        1, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    task = TaskData(
        name="one-image",
        train_x=base.expand(64, 3, 8, 8).contiguous(),
        train_y=torch.zeros(64, dtype=torch.int64),
        val_x=base[None].clone(),
        val_y=torch.zeros(1, dtype=torch.int64),
        test_x=base[None].clone(),
        test_y=torch.zeros(1, dtype=torch.int64),
        num_classes=1,
        augment=True,
        crop_padding=2,
    )
    s = EnvBatchSampler(task, n_envs=4, batch_size=64)
    x, _ = _epoch(s, torch.tensor([0, 1, 2, 3]), 0)
    assert x.shape == (4, 64, 3, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0  # values stay in range
    plain = task.prepare(base)
    assert len(torch.unique(x.reshape(256, -1), dim=0)) > 20  # offsets/flips differ per sample
    # Some samples are the original, some exactly its mirror, some shifted (zeros padded in).
    assert bool((x == plain).all(dim=(-3, -2, -1)).any())
    assert bool((x == plain.flip(-1)).all(dim=(-3, -2, -1)).any())
    assert bool((x == 0).any())
    for env in range(4):  # and every env gets its own draws
        assert len(torch.unique(x[env].reshape(64, -1), dim=0)) > 10
    assert not torch.equal(x[0], x[1])


def test_sampler_val_batches_shared(synth: TaskData) -> None:
    s = EnvBatchSampler(synth, 4, 32)
    chunks = list(s.val_batches(32))
    assert [y.shape[0] for _, y in chunks] == [32, 32, 6]
    assert chunks[0][0].shape == (32, 3, 16, 16)
    assert torch.equal(torch.cat([x for x, _ in chunks]), synth.val_x)
    assert torch.equal(torch.cat([y for _, y in chunks]), synth.val_y)
    assert [y.shape[0] for _, y in s.val_batches()] == [32, 32, 6]  # default: the train B


def test_sampler_rejects_bad_args(synth: TaskData) -> None:
    with pytest.raises(ValueError, match="positive"):
        EnvBatchSampler(synth, 0, 32)
    with pytest.raises(ValueError, match="positive"):
        EnvBatchSampler(synth, 2, 0)
    with pytest.raises(ValueError, match="drop_last"):
        EnvBatchSampler(synth, 2, 1000, drop_last=True)
    with pytest.raises(ValueError, match="keys must be"):
        next(EnvBatchSampler(synth, 2, 32).epoch(torch.tensor([1, 2, 3]), 0))
