"""``esper.train`` and ``esper.evaluate`` under torchrun/srun: one rank per process, rank 0 writes.

Each command joins the process group once its config is checked (:func:`joined`), builds its
env from this rank's block of envs (:func:`esper.simic.sharding.run_env`) and leaves the group
on the way out, whatever happened. Rank 0 keeps the telemetry backends, the console, the trace,
checkpoints, results and the report; the other ranks compute and write nothing. A rank that
dies or stalls makes the next collective of every other rank fail (at once for a closed
connection, after ``--dist-timeout`` seconds for a silent one): each rank then ends with one
``error:`` line and exit 1 (:class:`~esper.simic.distributed.RankLost`, printed by ``run_cli``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from esper.simic.config import TrainingConfig
from esper.simic.distributed import DEFAULT_TIMEOUT_S, Ranks, backend_reason
from esper.simic.errors import RankLost, UsageError
from esper.simic.preflight import StopSignals

# What gloo/NCCL errors say when a peer is gone or silent (a RuntimeError raised by DDP's
# backward, outside the collectives wrapped by Ranks).
_LOST = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "broken pipe")


def add_dist_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help="under torchrun/srun: how long a collective waits for the other ranks before "
                        f"the run ends with an error (default {DEFAULT_TIMEOUT_S:.0f})")


def check_ranks(args: argparse.Namespace, cfg: TrainingConfig) -> float:
    """The collectives' timeout, and a refusal of what cannot be sharded."""
    timeout = getattr(args, "dist_timeout", None)
    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    if not timeout > 0:
        raise UsageError(f"--dist-timeout {timeout}", "--dist-timeout", "a positive number of seconds")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if cfg.episode.envs < world:
            raise UsageError(f"{cfg.episode.envs} envs over {world} ranks", "--envs",
                             "at least one env per rank (torchrun --nproc_per_node x --nnodes <= --envs)")
        if str(cfg.device).startswith("cuda:"):
            raise UsageError(f"--device {cfg.device} under torchrun", "--device",
                             "cuda, auto or cpu: each rank takes cuda:LOCAL_RANK")
    return timeout


def lost(err: BaseException) -> bool:
    """Whether ``err`` says another rank is gone (a collective failed or timed out)."""
    if isinstance(err, RankLost | dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(w in text for w in _LOST)


@contextlib.contextmanager
def joined(args: argparse.Namespace, cfg: TrainingConfig) -> Iterator[Ranks]:
    """This process's rank for the command's run (one rank without torchrun); the process
    group is left on the way out, so a failed run exits with its error, not an abort."""
    timeout = check_ranks(args, cfg)
    try:
        ranks = Ranks.join(str(cfg.device), timeout)
    except (RuntimeError, ValueError) as err:
        raise RankLost(f"cannot join the other ranks ({err})") from err
    try:
        yield ranks
    except RuntimeError as err:
        if ranks.world > 1 and not isinstance(err, RankLost) and lost(err):
            raise RankLost(f"rank {ranks.rank} of {ranks.world} lost the other ranks during a DDP "
                           f"collective ({backend_reason(err)})") from err
        raise
    finally:
        ranks.close()


def for_rank(cfg: TrainingConfig, ranks: Ranks) -> TrainingConfig:
    """The config of this rank's telemetry hub: rank 0's backends, none elsewhere."""
    return cfg if ranks.main else cfg.updated(telemetry={"backends": []})


def agree_stop(ranks: Ranks, stop: StopSignals) -> None:
    """A signal seen by any rank stops every rank (between PPO rounds; per epoch the snapshot
    gather carries it)."""
    if ranks.world == 1:
        return
    mine = torch.tensor([float(stop.signum or 0)], device=ranks.device)
    seen = int(ranks.reduce(mine, "max", "stop signal").item())
    if seen and stop.signum is None:
        stop.signum = seen


def trace_dir(args: Any, ranks: Ranks) -> Any:
    """``--trace`` on rank 0 only."""
    return getattr(args, "trace", None) if ranks.main else None
