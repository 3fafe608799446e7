"""Task registry: the one place that maps a task name to its loader."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from esper.tasks.base import TaskData
from esper.tasks.cifar import load_cifar10
from esper.tasks.grammar import make_grammar_task
from esper.tasks.images import load_images
from esper.tasks.sequence import SequenceTask
from esper.tasks.synthetic import make_synthetic_task
from esper.tasks.text import load_text
from esper.tasks.tinystories import load_tinystories

DEFAULT_TASK = "synthetic"
TASKS: dict[str, Callable[..., TaskData | SequenceTask]] = {
    "synthetic": make_synthetic_task,
    "cifar10": load_cifar10,
    "grammar": make_grammar_task,
    "tinystories": load_tinystories,
    "images": load_images,
    "text": load_text,
}


def load_task(name: str = DEFAULT_TASK, **kwargs: Any) -> TaskData | SequenceTask:
    """Build task `name` with the loader's keyword arguments (e.g. device, seed, root)."""
    try:
        loader = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)}") from None
    return loader(**kwargs)
