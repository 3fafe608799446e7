"""The task section of the training config (which dataset, how much of it, what a loader gets),
and the strict base every config section shares."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from esper.simic.errors import ConfigError


class Strict(BaseModel):
    """A config section: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


# Which task fields mean something for which task: a field set for a task it does nothing for
# is refused by name (a flag that does nothing is a trap, not a default).
_TASK_FIELDS: dict[str, frozenset[str]] = {
    "image_size": frozenset({"synthetic"}),
    "num_classes": frozenset({"synthetic"}),
    "seq_len": frozenset({"grammar", "tinystories", "text"}),
    "seed": frozenset({"synthetic", "grammar", "images", "text"}),
    "data_dir": frozenset({"cifar10", "tinystories", "images", "text"}),
    "download": frozenset({"cifar10"}),
    "val_fraction": frozenset({"images", "text"}),
    "test_fraction": frozenset({"images", "text"}),
    "crop": frozenset({"images", "cifar10"}),
    "flip": frozenset({"images", "cifar10"}),
    "pattern": frozenset({"text"}),
}
USER_DATA_TASKS: frozenset[str] = frozenset({"images", "text"})


class TaskConfig(Strict):
    """Which dataset, and how much of it.

    ``images`` and ``text`` read a user's own data from ``data_dir`` (a folder or a file; see
    :mod:`esper.tasks.images` and :mod:`esper.tasks.text`). Their split sizes default to all of
    each split, and splits the data lacks are carved by ``seed`` at the given fractions.
    """

    name: Literal["synthetic", "cifar10", "grammar", "tinystories", "images", "text"] = "synthetic"
    train_size: int | None = Field(2048, ge=1, description="samples: images, or token windows")
    val_size: int | None = Field(512, ge=1)
    test_size: int | None = Field(1024, ge=1, description="held-out samples results are reported on")
    image_size: int = Field(16, ge=5, description="synthetic only")
    num_classes: int = Field(10, ge=2, description="synthetic only")
    seq_len: int = Field(64, ge=2, description="grammar/tinystories/text: tokens per sample (window)")
    seed: int = Field(0, ge=0, description="synthetic/grammar data seed (a grammar seed is a different task); "
                                           "images/text: the seed of the split carving")
    data_dir: str = Field("data", description="cifar10/tinystories: their folder; images: an ImageFolder tree "
                                              "or an .npz/.pt file; text: a folder of text files or one file")
    download: bool = False
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="images/text without their own val split")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="images/text without their own test split")
    crop: bool = Field(True, description="images/cifar10: random crop of training images (zero padding H/8)")
    flip: bool = Field(False, description="images/cifar10: random horizontal flip (off: it changes digits and text)")
    pattern: str = Field("*.txt", min_length=1, description="text: which files of the folder to read")

    def check_fields(self) -> TaskConfig:
        """Refuse a field changed for a task it does nothing for. Run on the merged config
        (``TrainingConfig.check_host``): a config file may set fields for the preset's task.
        """
        # A value somebody changed from its default, for a task it does nothing for (a full
        # config dump, as checkpoints store, sets every field at its default: not refused).
        fields = type(self).model_fields
        wrong = sorted(k for k in self.model_fields_set if k in _TASK_FIELDS and self.name not in _TASK_FIELDS[k]
                       and getattr(self, k) != fields[k].default)
        if wrong:
            uses = "; ".join(f"{k}: {sorted(_TASK_FIELDS[k])}" for k in wrong)
            raise ConfigError(f"task.{wrong[0]} has no effect for task {self.name!r} (used by {uses}); "
                              "drop it")
        if self.name in USER_DATA_TASKS and self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(f"val_fraction + test_fraction ({self.val_fraction} + {self.test_fraction}) "
                             "must be below 1: the rest trains")
        return self

    @property
    def family(self) -> str:
        """The host family the task needs: ``lm`` for token sequences, ``cnn`` for images."""
        return "lm" if self.name in ("grammar", "tinystories", "text") else "cnn"

    def loader_kwargs(self) -> dict[str, Any]:
        sizes = {k: getattr(self, k) for k in ("train_size", "val_size", "test_size")}
        if self.name in USER_DATA_TASKS:
            # Sizes default to all of each split; the seed is passed only when somebody set it
            # (the loader refuses one that would do nothing).
            kw: dict[str, Any] = {"path": self.data_dir, "val_fraction": self.val_fraction,
                                  "test_fraction": self.test_fraction,
                                  **{k: (v if k in self.model_fields_set else None) for k, v in sizes.items()}}
            if "seed" in self.model_fields_set and self.seed != 0:  # 0: the default carving
                kw["seed"] = self.seed
            if self.name == "text":
                return {**kw, "pattern": self.pattern, "seq_len": self.seq_len}
            return {**kw, "crop": self.crop, "flip": self.flip}
        if self.name == "grammar":
            return {"seed": self.seed, "seq_len": self.seq_len, **{k: v for k, v in sizes.items() if v is not None}}
        if self.name == "tinystories":
            return {"root": self.data_dir, "seq_len": self.seq_len, **sizes}
        if self.name == "synthetic":
            kw = {
                "num_classes": self.num_classes,
                "image_size": self.image_size,
                "seed": self.seed,
            }
            if self.train_size is not None:
                kw["train_size"] = self.train_size
            if self.val_size is not None:
                kw["val_size"] = self.val_size
            if self.test_size is not None:
                kw["test_size"] = self.test_size
            return kw
        return {
            "root": self.data_dir,
            "download": self.download,
            "train_size": self.train_size,
            "val_size": self.val_size,
            "test_size": self.test_size,
            "crop": self.crop,
            "flip": self.flip,
        }
