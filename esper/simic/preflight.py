"""Checks every CLI runs before any work (principle 11), and the one error format.

Every refusal is a :class:`UsageError` printed as ``error: what (where); what is allowed`` on
stderr with exit status 2 and no traceback (``--debug`` shows one). SIGINT and SIGTERM stop a
run at the end of the current epoch (:class:`StopSignals`): the hub is flushed, the last
complete checkpoint is kept, and the command exits 130 or 143 with one line; a second signal
(or a first one during a compile) exits at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any

from esper.simic.errors import (
    EXIT_SIGNAL,
    EXIT_USAGE,
    CheckpointError,
    ConfigError,
    Interrupted,
    RankLost,
    UsageError,
)

# Policies whose spec takes ``name=ARG`` (a checkpoint path or a seed / blueprint name).
ARG_POLICIES: dict[str, str] = {
    "ppo": "ppo=CHECKPOINT", "ppo_sample": "ppo_sample=CHECKPOINT", "random": "random=SEED", "fixed": "fixed=BLUEPRINT",
}
CHECKPOINT_POLICIES = ("ppo", "ppo_sample")


def _nearest_existing(p: Path) -> Path:
    parent = p.absolute()
    while not parent.exists():
        parent = parent.parent
    return parent


def _probe_dir(d: Path) -> str | None:
    """Why files cannot be created in the existing directory ``d`` (None when they can)."""
    if not d.is_dir():
        return f"{d} is not a directory"
    try:  # permission bits do not tell everything (root, read-only mounts)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".esper-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        return f"{d} is not writable ({err.strerror})"
    return None


def check_file_target(path: str | Path | None, where: str) -> None:
    """``path`` can be written as a file: not a directory, under a writable directory."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{p} is a directory", where, "a file path under a writable directory")
    parent = p.absolute().parent
    if parent.exists():
        why = _probe_dir(parent)
    else:
        base = _nearest_existing(parent)
        why = f"{base} is not a directory" if not base.is_dir() else _probe_dir(base)
    if why is not None:
        raise UsageError(f"cannot write {p}: {why}", where, "a file path under a writable directory")


def check_dir_target(path: str | Path | None, where: str) -> None:
    """``path`` is (or can be created as) a writable directory; probed with a temp file."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{p} exists and is not a directory", where, "a writable directory")
    base = _nearest_existing(p)
    why = f"{base} is not a directory" if not base.is_dir() else _probe_dir(base)
    if why is None and p.exists():
        why = _probe_dir(p)
    if why is not None:
        raise UsageError(f"cannot write into {p}: {why}", where, "a writable directory")


# ----------------------------------------------------------------------------- inputs
def check_device(device: str) -> None:
    """A device this machine has; ``auto`` always is (CUDA when available, else the CPU)."""
    import torch

    from esper.device import AUTO

    if device == AUTO:
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}", "--device", "auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("CUDA is not available on this machine", "--device", "cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"no CUDA device {dev.index}", "--device",
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1} or cpu")
    elif dev.type != "cpu":
        raise UsageError(f"unsupported device {device!r}", "--device", "auto, cpu, cuda, cuda:N")


def check_backends(names: Iterable[str], flag: bool = True) -> None:
    """Known backend names; on the command line (``flag``) at least one, or ``none`` alone."""
    from esper.nissa.backends import BACKEND_NAMES

    names = [n.strip().lower() for n in names]
    allowed = f"comma-separated from {list(BACKEND_NAMES)}, or none"
    if flag and (not names or "" in names):
        raise UsageError("empty telemetry backend name" if names else "no telemetry backend given",
                         "--backends", allowed)
    if flag and "none" in names:
        if names != ["none"]:
            raise UsageError("none combined with other backends", "--backends", allowed)
        return
    unknown = [n for n in names if n not in BACKEND_NAMES]
    if unknown:
        raise UsageError(f"unknown telemetry backend(s) {unknown}", "--backends", allowed)
    if "wandb" in names:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UsageError("the wandb backend needs the 'wandb' package, which is not installed", "--backends",
                             "pip install 'esper-morphogenetic[wandb]', or another backend")


def check_port_free(port: int) -> None:
    """The prometheus backend's port can be bound on 127.0.0.1 (0: any free one)."""
    import socket

    if port == 0:
        return
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as err:
            raise UsageError(f"port {port} cannot be served ({err.strerror})", "telemetry.prometheus_port",
                             "a free local port, or 0 for any") from None


def check_task_data(cfg: Any) -> None:
    """A CIFAR-10 directory is read and validated now (every file), not after a model is built;
    TinyStories' story files are found now."""
    if cfg.task.name == "tinystories":
        from esper.tasks.tinystories import find_tinystories_files

        try:
            find_tinystories_files(cfg.task.data_dir)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise UsageError(str(err), "task.data_dir", "a TinyStories file, or a folder holding them") from None
        return
    if cfg.task.name != "cifar10":
        return
    from esper.tasks.cifar import TEST_FILE, TRAIN_FILES, find_cifar_dir, read_cifar_batch

    where = "task.data_dir"
    allowed = f"a directory holding the python-pickle CIFAR-10 batches {[*TRAIN_FILES, TEST_FILE]}"
    if cfg.task.download:
        return  # fetched (and then read) by the loader
    try:
        folder = find_cifar_dir(cfg.task.data_dir)
        for name in (*TRAIN_FILES, TEST_FILE):
            read_cifar_batch(folder / name)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise UsageError(str(err), where, allowed) from None


def parse_policies(text: str | None, where: str = "--policies") -> list[tuple[str, str | None]]:
    """``name`` or ``name=ARG`` specs, each known, listed once, with an argument only where the
    policy takes one; ``ppo=PATH`` checkpoints are loaded (validated) now."""
    from esper.simic.checkpoint import load_checkpoint, shipped_controller
    from esper.tamiyo.policies import POLICIES

    raw = [s.strip() for s in (text or "").split(",")]
    specs = [s for s in raw if s]
    if not specs or len(specs) != len(raw):
        raise UsageError("empty policy in the list" if specs else "no policy given", where,
                         f"comma-separated names from {sorted(POLICIES)} (name or name=ARG)")
    if len(set(specs)) != len(specs):
        dup = sorted({s for s in specs if specs.count(s) > 1})
        raise UsageError(f"policy listed twice: {dup}", where, "list each spec once")
    out = []
    for spec in specs:
        name, sep, arg = (part.strip() for part in spec.partition("="))
        if name not in POLICIES:
            raise UsageError(f"unknown policy {name!r}", where, f"one of {sorted(POLICIES)}")
        if sep and name not in ARG_POLICIES:
            raise UsageError(f"policy {name!r} takes no argument (got {spec!r})", where, f"write {name}")
        if name == "random" and arg and not (arg.isascii() and arg.isdigit()):
            raise UsageError(f"random policy seed {arg!r} is not a non-negative integer", where,
                             "random or random=SEED (e.g. random=3)")
        if name in CHECKPOINT_POLICIES:
            if not arg and shipped_controller() is None:
                raise UsageError(f"policy {name!r} needs a checkpoint: this install ships none", where,
                                 f"write {name}=PATH")
            try:
                load_checkpoint(arg or str(shipped_controller()))
            except CheckpointError as err:
                raise UsageError(f"unusable checkpoint: {err}", where, "a checkpoint written by esper.train") from None
        out.append((name, arg or None))
    return out


def check_config(args: argparse.Namespace, policies: Iterable[str] = (), trains_ppo: bool = False) -> tuple[Any, Any]:
    """The validated config and telemetry profile (device, backends, data, run dir, fault
    drills included; ``trains_ppo``: the run trains PPO, whose drills then apply)."""
    from esper.simic import faults
    from esper.simic.cli import build_config, telemetry_profile

    if getattr(args, "backends", None) is not None:
        check_backends([b for b in args.backends.split(",")])
    try:
        cfg = build_config(args)
        profile = telemetry_profile(cfg)
    except (ConfigError, ValueError, OSError) as err:
        raise UsageError(str(err), "configuration", "see --preset/--config and the flags") from None
    for name in policies:
        try:
            cfg.check_for(name)
        except ConfigError as err:
            raise UsageError(str(err), "configuration", "fix the policy's config section") from None
    check_backends(cfg.telemetry.backends, flag=False)
    bad = faults.problems(cfg, trains_ppo)
    if bad:
        raise UsageError("; ".join(bad), "faults", "drills that apply to this run (see FaultsConfig)")
    check_device(cfg.device)
    check_task_data(cfg)
    if any(b.strip().lower() in ("jsonl", "tensorboard") for b in cfg.telemetry.backends):
        check_dir_target(cfg.run_dir, "--run-dir")
    if any(b.strip().lower() == "prometheus" for b in cfg.telemetry.backends):
        check_port_free(cfg.telemetry.prometheus_port)
    check_dir_target(getattr(args, "trace", None), "--trace")
    return cfg, profile


def refuse_flags(args: argparse.Namespace, flags: Iterable[str], policy: str) -> None:
    """Flags that have no effect with ``policy`` are refused, not ignored."""
    for flag in flags:
        if getattr(args, flag.lstrip("-").replace("-", "_"), None) not in (None, False, []):  # []: append unused
            raise UsageError(f"{flag} has no effect with --policy {policy}", flag,
                             "drop it, or use a policy it applies to")


def check_fresh_checkpoint(save: Path, resume: Path | None, force: bool, resumable: bool = True) -> None:
    """A fresh run never silently overwrites an existing checkpoint (``resumable``: the run
    could ``--resume`` it instead; offline training cannot)."""
    check_file_target(save, "--save")
    if save.exists() and resume is None and not force:
        raise UsageError(f"checkpoint {save} exists and a fresh run would overwrite it", "--save",
                         "another path, --resume it, or --force to overwrite" if resumable
                         else "another path, or --force to overwrite")


def check_resume(resume: Path, cfg: Any) -> dict[str, Any]:
    """The checkpoint loads, was trained with this run's env count and setting (before any env
    is built or telemetry written), and ``cfg.ppo.rounds`` leaves something to train."""
    from esper.simic.checkpoint import check_resumable, load_checkpoint

    try:
        ckpt = load_checkpoint(resume)
    except CheckpointError as err:
        raise UsageError(str(err), "--resume", "a checkpoint written by esper.train --policy ppo") from None
    try:
        check_resumable(resume, ckpt, cfg, cfg.episode.envs)
    except (CheckpointError, ConfigError) as err:
        raise UsageError(f"cannot resume: {err}", "--resume", "a checkpoint of this run's config") from None
    done, rounds = int(ckpt["round"]), cfg.ppo.rounds
    if rounds <= done:
        raise UsageError(f"{resume} is already at round {done}; --rounds {rounds} trains nothing", "--rounds",
                         f"a total above {done}")
    return ckpt


# ----------------------------------------------------------------------------- signals
class StopSignals:
    """SIGINT/SIGTERM: the first sets a flag that :meth:`check` (called once per epoch) raises
    as :class:`Interrupted` (the next safe point), and says so on stderr; a second one exits at
    once (130 for SIGINT, 143 for SIGTERM) without running library code any further, and so
    does a first one while torch.compile runs (a compile has no safe point and can take
    minutes). Whatever was written stays intact: checkpoints are written atomically and
    telemetry is flushed every epoch. ``kept`` (set by the command) says what is on disk.

    Messages go straight to file descriptor 2: a handler may run while the main thread is in
    the middle of printing.
    """

    def __init__(self, first: str | None = "stopping at the end of this epoch") -> None:
        self.signum: int | None = None
        self.first = first  # what the first signal does, said on stderr (None: nothing to say)
        self.kept = ""
        self._old: dict[int, Any] = {}

    def _say(self, text: str) -> None:
        with contextlib.suppress(OSError):
            os.write(2, f"{text}\n".encode())

    def exit_now(self, signum: int, why: str) -> None:
        """End the process at once with the signal's exit status (no cleanup code runs)."""
        name = signal.Signals(signum).name
        kept = f"; {self.kept}" if self.kept else ""
        with contextlib.suppress(OSError, ValueError):
            if os.isatty(1):
                os.write(1, b"\x1b[?25h\n")  # a live view may have hidden the cursor
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        self._say(f"interrupted by {name} {why}: exiting now{kept}")
        os._exit(EXIT_SIGNAL.get(signal.Signals(signum), 128 + signum))

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        from esper.progress import COMPILES

        name = signal.Signals(signum).name
        if self.signum is not None:
            self.exit_now(signum, "again")
        if COMPILES.active:
            self.exit_now(signum, f"while compiling {COMPILES.what}")
        self.signum = signum
        if self.first:
            self._say(f"{name}: {self.first} (send it again to exit at once)")

    def check(self, *_: object) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def __enter__(self) -> StopSignals:
        for sig in EXIT_SIGNAL:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _again(self, signum: int, frame: FrameType | None) -> None:
        self.exit_now(signum, "again")

    def __exit__(self, *exc: object) -> None:
        # After a stop the process is on its way out (closing telemetry, joining compile
        # workers): a further signal still exits at once, with its own status.
        for sig, old in self._old.items():
            signal.signal(sig, self._again if self.signum is not None else old)
        self._old = {}


def add_debug_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """``main`` with the one error format: usage errors and signals end in one stderr line."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except UsageError as err:
        if debug:
            traceback.print_exc()
        print(err, file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as err:
        print(f"interrupted by {err}", file=sys.stderr)
        return err.exit_code
    except RankLost as err:  # torchrun/srun: another rank died or stalled; this one ends too
        if debug:
            traceback.print_exc()
        print(f"error: {err} (torch.distributed); the run cannot go on without every rank: "
              "relaunch with --resume LAST_CHECKPOINT, on the same or another number of ranks", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted by SIGINT", file=sys.stderr)
        return 130
