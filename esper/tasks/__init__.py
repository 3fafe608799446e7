"""Data: the embedded synthetic task, CIFAR-10, and on-device per-env sampling/augmentation."""

from esper.tasks.base import TaskData, crop_flip
from esper.tasks.cifar import CIFAR_MEAN, CIFAR_STD, load_cifar10, read_cifar_batch
from esper.tasks.registry import DEFAULT_TASK, TASKS, load_task
from esper.tasks.sampler import EnvBatchSampler
from esper.tasks.synthetic import make_synthetic_task

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DEFAULT_TASK",
    "TASKS",
    "EnvBatchSampler",
    "TaskData",
    "crop_flip",
    "load_cifar10",
    "load_task",
    "make_synthetic_task",
    "read_cifar_batch",
]
