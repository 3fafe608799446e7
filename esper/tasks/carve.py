"""Seeded train/validation/test carving for data that comes without its own splits.

Why stratified: a user's dataset is often small (hundreds of images per class), and a plain
random cut can leave a class thin in validation, which every controller decision reads. Each
class is shuffled with the seed and cut by the fractions, so every split keeps the class mix
of the whole (to within one sample per class). Sequences (no class) are cut as one group.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_fractions(val_fraction: float, test_fraction: float, where: str) -> None:
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(
            f"{where}: val_fraction {val_fraction} and test_fraction {test_fraction} must each lie in "
            "(0, 1) and sum to less than 1 (the rest trains)"
        )


def carve(
    labels: Tensor | int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    where: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Index tensors (train, val, test) into ``labels`` (int64 ``[n]``, stratified by class) or
    into ``range(labels)`` (an int: no classes). A fraction of 0 carves nothing for that split
    (the data brings it); every other split gets at least one sample, or a ``ValueError`` names
    how many samples the fractions would need."""
    check_fractions(val_fraction, test_fraction, where)
    gen = torch.Generator().manual_seed(int(seed))
    if isinstance(labels, int):
        groups = [torch.randperm(labels, generator=gen)]
    else:
        order = torch.randperm(labels.shape[0], generator=gen)
        shuffled = labels[order]
        groups = [order[shuffled == c] for c in torch.unique(labels).tolist()]
    parts: list[list[Tensor]] = [[], [], []]
    for idx in groups:
        n = idx.shape[0]
        n_val = int(n * val_fraction + 0.5)  # half up (round() would give 2 for 2.5)
        n_test = int(n * test_fraction + 0.5)
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
        parts[0].append(idx[n_val + n_test :])
    # Class by class, then shuffled: a size cap (the first n) must not keep only the first classes.
    train, val, test = (t[torch.randperm(t.shape[0], generator=gen)] for t in (torch.cat(p) for p in parts))
    total = sum(int(g.shape[0]) for g in groups)
    asked = [f for f in (val_fraction, test_fraction, 1 - val_fraction - test_fraction) if f > 0]
    for name, split, frac in (("train", train, 1.0), ("val", val, val_fraction), ("test", test, test_fraction)):
        if split.numel() == 0 and frac > 0:
            need = int(1 / min(asked)) + 1
            raise ValueError(
                f"{where}: too few samples for the asked splits: {total} give an empty {name} split at "
                f"val_fraction {val_fraction}, test_fraction {test_fraction} (about {need} or more "
                "are needed)"
            )
    return train, val, test


def take(split: str, idx: Tensor, size: int | None, where: str) -> Tensor:
    """The first ``size`` of ``idx`` (all when None), or a ``ValueError`` when there are fewer."""
    if size is None:
        return idx
    if not 0 < size <= idx.shape[0]:
        raise ValueError(f"{where}: {split}_size {size} is more than the {idx.shape[0]} samples of the "
                         f"{split} split (allowed: 1..{idx.shape[0]}, or leave it unset for all)")
    return idx[:size]


def complete_splits(splits: dict[str, tuple[Tensor, Tensor]], stratify: bool, val_fraction: float,
                    test_fraction: float, seed: int | None, sizes: dict[str, int | None],
                    where: str) -> dict[str, tuple[Tensor, Tensor]]:
    """The three splits: the ones ``splits`` lacks carved from its ``train`` (by class when
    ``stratify``; a split the user gave is never touched), then each capped to ``sizes``."""
    out = dict(splits)
    missing = [s for s in ("val", "test") if s not in out]
    if missing:
        x, y = out["train"]
        tr, va, te = carve(y if stratify else int(x.shape[0]), val_fraction if "val" in missing else 0.0,
                           test_fraction if "test" in missing else 0.0, 0 if seed is None else seed, where)
        for name, sel in (("val", va), ("test", te)):
            if name in missing:
                out[name] = (x[sel], y[sel])
        out["train"] = (x[tr], y[tr])
    for name in ("train", "val", "test"):
        x, y = out[name]
        sel = take(name, torch.arange(x.shape[0]), sizes[name], where)
        out[name] = (x[sel], y[sel])
    return out
