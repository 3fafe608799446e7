"""A user's own data: ImageFolder trees, .npz/.pt arrays and text folders; their splits, their
statistics, and one clear error (exit 2, before any work) for every kind of bad data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from esper.evaluate import main as evaluate_main
from esper.tasks import EnvBatchSampler
from esper.tasks.images import load_images
from esper.tasks.text import load_text


def image_folder(root: Path, classes: int = 3, per_class: int = 10, size: tuple[int, int] = (12, 10),
                 mode: str = "RGB") -> Path:
    """``root/<class>/<i>.png``: class c's images are brighter in channel c (learnable)."""
    rng = np.random.default_rng(0)
    w, h = size
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            px = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
            px[..., c % 3] += 150
            img = Image.fromarray(px, mode="RGB")
            (img.convert("L") if mode == "L" else img).save(folder / f"{i}.png")
    return root


def test_image_folder_carved_stratified_with_train_statistics(tmp_path: Path) -> None:
    task = load_images(image_folder(tmp_path / "imgs"), val_fraction=0.2, test_fraction=0.2)
    assert task.image_shape == (3, 10, 12) and task.num_classes == 3
    assert (task.train_size, task.val_size, task.test_size) == (18, 6, 6)
    for split in ("train", "val", "test"):  # stratified: every class in every split, equally
        counts = torch.bincount(task.split(split)[1], minlength=3)
        assert counts.min() == counts.max(), (split, counts)
    pixels = task.train_x.float() / 255.0
    torch.testing.assert_close(torch.tensor(task.mean), pixels.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(torch.tensor(task.std), pixels.std(dim=(0, 2, 3)))
    assert task.augment and task.crop_padding == 1 and not task.flip  # H/8, flip off by default
    # The same seed carves the same split; another seed another one.
    again = load_images(tmp_path / "imgs", val_fraction=0.2, test_fraction=0.2)
    other = load_images(tmp_path / "imgs", val_fraction=0.2, test_fraction=0.2, seed=5)
    assert torch.equal(again.test_x, task.test_x) and not torch.equal(other.test_x, task.test_x)


def test_grey_images_have_one_channel_and_flip_is_a_choice(tmp_path: Path) -> None:
    task = load_images(image_folder(tmp_path / "g", mode="L"), crop=False, flip=True)
    assert task.image_shape == (1, 10, 12) and task.crop_padding == 0 and task.flip
    sampler = EnvBatchSampler(task, n_envs=2, batch_size=4)
    x, _ = next(iter(sampler.epoch(torch.tensor([1, 2]), 0)))
    assert x.shape == (2, 4, 1, 10, 12)
    raw = task.prepare(task.train_x)
    flat = x.reshape(-1, 1, 10, 12)  # no crop: each is a training image, mirrored or not
    mirrored = [any(torch.equal(img, r.flip(-1)) and not torch.equal(img, r) for r in raw) for img in flat]
    assert any(mirrored)
    no_flip = load_images(tmp_path / "g", crop=False, flip=False)
    assert not no_flip.augment


def test_own_splits_are_kept_and_a_seed_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "split"
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        image_folder(root / split, per_class=n)
    task = load_images(root)
    assert (task.train_size, task.val_size, task.test_size) == (18, 6, 9)
    with pytest.raises(ValueError, match=r"task\.seed .* has no effect"):
        load_images(root, seed=3)


def test_arrays_npz_and_pt(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 255, size=(40, 9, 9), dtype=np.uint8)  # [n, H, W]: one channel
    y = np.repeat(np.arange(4), 10)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    task = load_images(tmp_path / "a.npz", test_fraction=0.25)
    assert task.image_shape == (1, 9, 9) and task.num_classes == 4
    assert task.test_size == 12 and task.val_size == 4
    hwc = rng.random((30, 7, 8, 3), dtype=np.float32)  # channels last, floats
    torch.save({"x_train": torch.from_numpy(hwc[:24]), "y_train": torch.arange(24) % 3,
                "x_test": torch.from_numpy(hwc[24:]), "y_test": torch.arange(6) % 3}, tmp_path / "b.pt")
    task = load_images(tmp_path / "b.pt", train_size=10)
    assert task.image_shape == (3, 7, 8) and task.train_x.dtype == torch.float32
    torch.testing.assert_close(task.test_x, torch.from_numpy(hwc[24:]).permute(0, 3, 1, 2))  # kept as given
    assert task.train_size == 10 and task.val_size == 3  # val carved from the user's train split: 1 per class


def test_text_folder_windows_and_own_splits(tmp_path: Path) -> None:
    root = tmp_path / "txt"
    root.mkdir()
    (root / "a.txt").write_text("the cat sat on the mat. " * 40)
    (root / "b.md").write_text("ignored unless the pattern says so")
    task = load_text(root, seq_len=15)
    stream = bytes([0]) + (root / "a.txt").read_bytes()
    assert task.num_classes == 256
    assert task.train_size + task.val_size + task.test_size == len(stream) // 16
    x, y = task.train_x[0], task.train_y[0]
    assert torch.equal(x[1:], y[:-1])  # next-byte targets
    both = load_text(root, seq_len=15, pattern="*")
    assert both.train_size + both.val_size + both.test_size > task.train_size + task.val_size + task.test_size
    own = tmp_path / "own"
    for split in ("train", "val", "test"):
        (own / split).mkdir(parents=True)
        (own / split / "t.txt").write_text(f"{split} text " * 30)
    task = load_text(own, seq_len=7)
    assert bytes(task.test_x[0].tolist()).startswith(b"\x00test")
    with pytest.raises(ValueError, match="has no effect"):
        load_text(own, seq_len=7, seed=2)


# ----------------------------------------------------------------------------- errors
def _config(tmp_path: Path, name: str, data: Path, extra: str = "") -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task: {{name: {name}, data_dir: '{data}'{extra}}}\n")
    return cfg


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert match in err[0], err[0]


def _bad_arrays(tmp_path: Path, name: str, **arrays: np.ndarray) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case", ["missing", "no_classes", "empty_class", "mixed_sizes", "out_of_range",
                                  "negative", "too_few", "bad_shape", "unused_field", "text_none", "seed_unused"])
def test_bad_data_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    preset, extra = "images", ""
    if case == "missing":
        data, match = tmp_path / "nowhere", "does not exist"
    elif case == "no_classes":
        (tmp_path / "flat").mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "flat" / "x.png")
        data, match = tmp_path / "flat", "holds no class folders"
    elif case == "empty_class":
        data = image_folder(tmp_path / "e", classes=2, per_class=3)
        (data / "class_9").mkdir()
        match = "class_9 is empty"
    elif case == "mixed_sizes":
        data = image_folder(tmp_path / "m", classes=2, per_class=3)
        Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(data / "class_1" / "odd.png")
        match = "mixed sizes"
    elif case == "out_of_range":
        data = _bad_arrays(tmp_path, "r.npz", x=np.zeros((12, 6, 6), np.uint8), y=np.arange(12) % 4,
                           classes=np.array(["a", "b", "c"]))
        match = "label 3 out of range"
    elif case == "negative":
        data = _bad_arrays(tmp_path, "n.npz", x=np.zeros((12, 6, 6), np.uint8), y=np.arange(12) % 3 - 1)
        match = "label -1 out of range"
    elif case == "too_few":
        data = _bad_arrays(tmp_path, "f.npz", x=np.zeros((3, 6, 6), np.uint8), y=np.array([0, 1, 0]))
        match = "too few samples"
    elif case == "bad_shape":
        data = _bad_arrays(tmp_path, "s.npz", x=np.zeros((12, 2, 6, 6), np.uint8), y=np.arange(12) % 2)
        match = "allowed: [n, H, W]"
    elif case == "unused_field":
        data = _bad_arrays(tmp_path, "u.npz", x=np.zeros((12, 6, 6), np.uint8), y=np.arange(12) % 2)
        extra, match = ", seq_len: 32", "task.seq_len has no effect for task 'images'"
    elif case == "text_none":
        (tmp_path / "t").mkdir()
        (tmp_path / "t" / "a.md").write_text("words")
        preset, data, match = "text", tmp_path / "t", "holds no files matching '*.txt'"
    else:  # seed_unused: the data brings all three splits, --task-seed would do nothing
        root = tmp_path / "own"
        for split in ("train", "val", "test"):
            image_folder(root / split, classes=2, per_class=2)
        data, match = root, "has no effect"
    argv = ["--preset", preset, "--config", str(_config(tmp_path, preset, data, extra)), "--policies", "static",
            "--envs", "1", "--backends", "none"]
    if case == "seed_unused":
        argv += ["--task-seed", "3"]
    _refused(capsys, argv, match)


def test_task_seed_refused_where_it_does_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    _refused(capsys, ["--preset", "cifar10", "--task-seed", "2", "--policies", "static", "--backends", "none"],
             "task.seed has no effect for task 'cifar10'")


# ----------------------------------------------------------------------------- end to end
SMALL = ["--envs", "2", "--episode-length", "3", "--backends", "none"]


def _tiny(tmp_path: Path, data: Path) -> Path:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"task: {{data_dir: '{data}'}}\nkasmina: {{batch_size: 8, val_batch_size: 16}}\n")
    return cfg


@pytest.mark.parametrize("kind", ["folder", "npz"])
def test_evaluate_images_preset_on_user_data(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    if kind == "folder":
        data = image_folder(tmp_path / "imgs", classes=3, per_class=8)
    else:
        rng = np.random.default_rng(2)
        data = _bad_arrays(tmp_path, "d.npz", x=rng.integers(0, 255, (30, 8, 8), dtype=np.uint8),
                           y=np.arange(30) % 3)
    out = tmp_path / "r.json"
    code = evaluate_main(["--preset", "images", "--config", str(_tiny(tmp_path, data)),
                          "--policies", "static,heuristic,ppo", "--json", str(out), *SMALL])
    text = capsys.readouterr()
    assert code == 0, text.err
    import json

    results = json.loads(out.read_text())["results"]
    assert set(results) == {"static", "heuristic", "ppo"}
    assert all(len(r["per_env"]["test_acc"]) == 2 for r in results.values())
