"""Where compiled code is cached between runs, and what compiling cost a run.

torch's on-disk caches (inductor's FX graph cache, the AOTAutograd cache, compiled kernels)
make a second run of the same command skip most of the first one's compile; ``esper.train``
keeps them in a stable directory so they survive a reboot, and prints compile time apart from
training throughput.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "esper" / "inductor"


def use_stable_cache() -> Path:
    """Point torch's compile caches at :func:`default_cache_dir` unless ``TORCHINDUCTOR_CACHE_DIR``
    names another place. torch's own default lives under /tmp, and importing the kernels
    already writes it into the environment, so that value counts as unset. Call before the
    first compile."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    current = os.environ.get(CACHE_ENV)
    if current is None or Path(current) == Path(torch_default()):
        os.environ[CACHE_ENV] = str(default_cache_dir())
    return Path(os.environ[CACHE_ENV])


def compile_line(graphs: int, seconds: float, frames: int, env_epochs_per_s: float) -> str:
    """``compiled N graphs in X s``, and the throughput of ``frames`` env-epochs that took
    ``frames / env_epochs_per_s`` seconds with that compile taken out."""
    rest = frames / max(env_epochs_per_s, 1e-9) - seconds
    plural = "" if graphs == 1 else "s"
    return (f"compiled {graphs} graph{plural} in {seconds:.1f}s; "
            f"{frames / max(rest, 1e-9):.1f} env-epochs/s without it")
