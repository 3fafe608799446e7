"""One run over K processes with torch.distributed: who this process is, which envs it holds.

``torchrun`` (or ``srun`` exporting the same variables) starts K processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :meth:`Ranks.join` makes
them one process group (NCCL when the ranks run on CUDA, gloo on the CPU) whose collectives
give up after a timeout, so a rank that dies or stalls ends the run on every rank instead of
hanging it. Rank r holds the contiguous block of envs :func:`shard` gives it; env i keeps its
identity (its RNG keys, its data order) whichever rank holds it, because every random draw of
an env is keyed by its global index (:mod:`esper.rng`).

A single process is the same object with one rank: every collective is then the identity, so
the learner runs one code path at any scale.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from esper.device import resolve_device
from esper.simic.errors import RankLost

DEFAULT_TIMEOUT_S = 300.0
T = TypeVar("T")


def launched() -> bool:
    """Whether this process is one of several started by torchrun/srun (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_reason(err: BaseException) -> str:
    """The gist of a gloo/NCCL error: its first sentence, without the source location."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[.../pair.cc:545] Read error ..."
    return text.split(". ")[0].rstrip(".")


def main_rank() -> bool:
    """Whether this process is rank 0 of its run (or the only process): the one that writes."""
    return int(os.environ.get("RANK", "0")) == 0


def shard(total: int, world: int, rank: int) -> tuple[int, int]:
    """``(offset, count)``: rank's contiguous block of ``total`` envs (sizes differ by at most one)."""
    base, extra = divmod(total, world)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def rank_device(name: str | None, local_rank: int, world: int) -> torch.device:
    """Each rank's device: ``cuda`` (or ``auto`` on a CUDA machine) becomes ``cuda:LOCAL_RANK``."""
    device = resolve_device(name)
    if device.type == "cuda" and world > 1:
        return torch.device("cuda", local_rank)
    return device


class Ranks:
    """This process's place in the run and the few collectives the run needs.

    ``stop`` (a :class:`~esper.simic.preflight.StopSignals`, set by the command) lets a signal
    seen by one rank stop every rank at the same epoch (:class:`~esper.simic.sharding.GlobalSnapshots`).
    """

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0,
                 device: torch.device | str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.stop: Any = None

    @classmethod
    def join(cls, device: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
        """Join the process group torchrun/srun describe in the environment (one rank if none)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = rank_device(device, local_rank, world)
        ranks = cls(rank, world, local_rank, dev, timeout_s)
        if world > 1 and not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        return ranks

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes telemetry, checkpoints and results."""
        return self.rank == 0

    def shard(self, total: int) -> tuple[int, int]:
        return shard(total, self.world, self.rank)

    def counts(self, total: int) -> list[int]:
        return [shard(total, self.world, r)[1] for r in range(self.world)]

    # ------------------------------------------------------------------------- collectives
    def _collective(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RuntimeError as err:  # gloo/NCCL: a peer closed its connection, or the timeout
            raise RankLost(f"rank {self.rank} of {self.world} lost the other ranks during the {what} "
                           f"({backend_reason(err)})") from err

    def gather_rows(self, x: torch.Tensor, total: int, what: str = "gather") -> torch.Tensor:
        """Every rank's rows ``[count_r, ...]`` stacked in rank order: ``[total, ...]`` on every rank."""
        if self.world == 1:
            return x
        counts = self.counts(total)
        pad = max(counts)
        padded = torch.zeros((pad, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self._collective(what, lambda: dist.all_gather(parts, padded))
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])

    def gather_objects(self, obj: T, what: str = "gather") -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        self._collective(what, lambda: dist.all_gather_object(out, obj))
        return out

    def reduce(self, x: torch.Tensor, op: str, what: str = "all_reduce") -> torch.Tensor:
        """``x`` reduced over ranks with ``op`` in ``sum``, ``max``, ``min`` (a new tensor)."""
        if self.world == 1:
            return x
        y = x.detach().clone()
        red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        self._collective(what, lambda: dist.all_reduce(y, op=red))
        return y
