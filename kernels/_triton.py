"""Where Triton may run: the single place that probes for triton and decides the dispatch.

Ops ask :func:`use_triton` with their first tensor. Triton runs for CUDA tensors; on the CPU
only when a test forces it under ``TRITON_INTERPRET=1`` (the interpreter is chosen when triton
is imported, so the variable must be set before that).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

try:
    import triton
    import triton.language  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by a subprocess test
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_force_cpu = False
_force_op = False


def use_triton(t: torch.Tensor) -> bool:
    """True when an op given ``t`` should launch its Triton kernel instead of the reference."""
    if not HAS_TRITON or t.dtype not in TRITON_DTYPES:
        return False
    if t.device.type == "cuda":
        return True
    return _force_cpu and INTERPRET and t.device.type == "cpu"


def use_op(t: torch.Tensor) -> bool:
    """True when a public function should call its ``esper::`` op rather than the reference.

    Only where a kernel will run: the plain reference composes with everything (``torch.func``
    transforms under ``torch.compile`` included, which custom ops do not, pytorch#170834) and
    inductor fuses it just the same. Tests force the op path on the CPU.
    """
    return _force_op or use_triton(t)


@contextmanager
def force_op_on_cpu(enabled: bool = True) -> Iterator[None]:
    """Route public functions through their ``esper::`` ops (running the reference) on the CPU."""
    global _force_op
    previous, _force_op = _force_op, enabled
    try:
        yield
    finally:
        _force_op = previous


@contextmanager
def force_triton_on_cpu(enabled: bool = True) -> Iterator[None]:
    """Route CPU tensors through the Triton kernels (only effective under TRITON_INTERPRET=1).

    Lets tests check each kernel against its reference on a machine without a GPU.
    """
    global _force_cpu
    previous, _force_cpu = _force_cpu, enabled
    try:
        with force_op_on_cpu(enabled):
            yield
    finally:
        _force_cpu = previous


def esper_op(name: str) -> Callable[[Callable[..., Any]], Any]:
    """``torch.library.triton_op`` for a functional op, also usable where triton is absent.

    ``triton_op`` lets AOTAutograd trace the op body, so inductor sees either the Triton launch
    (CUDA) or the reference's aten ops (CPU, which it fuses) instead of an opaque call. Without
    triton the body only ever takes the reference branch; torch's kernel probe would log a
    "Triton not available" warning for every op, which is silenced here.
    """

    def decorate(fn: Callable[..., Any]) -> Any:
        probe_log = logging.getLogger("torch._library.triton")
        was_disabled, probe_log.disabled = probe_log.disabled, not HAS_TRITON or probe_log.disabled
        try:
            return torch.library.triton_op(name, fn, mutates_args=())
        finally:
            probe_log.disabled = was_disabled

    return decorate


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block sizes must be powers of two).

    ``int()`` specializes a symbolic size under dynamic-shape tracing: block sizes are static.
    """
    return 1 << max(0, int(n) - 1).bit_length()
