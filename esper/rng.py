"""Counter-based random numbers keyed per environment.

Env ``i`` must draw the same numbers whether it runs alone or inside a batch of N, and a
batch must draw without a Python loop over envs. A stateful ``torch.Generator`` gives
neither, so draws here are a pure function of ``(env key, stream, element index)`` through
the splitmix64 finalizer, computed with int64 tensor ops on any device.
"""

from __future__ import annotations

import math

import torch

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB


def _lsr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer: a bijective scramble of int64 values (wrapping arithmetic)."""
    z = (z ^ _lsr(z, 30)) * _M1
    z = (z ^ _lsr(z, 27)) * _M2
    return z ^ _lsr(z, 31)


def _wrap64(x: int) -> int:
    """A Python int reduced to int64's two's-complement range (what the tensor ops wrap to)."""
    return (x + (1 << 63)) % (1 << 64) - (1 << 63)


def stream_key(keys: torch.Tensor, *streams: int | torch.Tensor) -> torch.Tensor:
    """Derive per-env sub-keys ``[N]`` for a named stream (e.g. slot, blueprint, epoch).

    A Python-int stream id is folded into the additive constant on the host, so it reaches
    the kernel as a scalar argument: making a tensor of it would be a host-to-device copy
    (a sync on CUDA) per call. The result is the same as adding it as an int64 tensor.
    """
    k = keys.to(torch.int64)
    for s in streams:
        if isinstance(s, torch.Tensor):
            k = mix64(k * _GOLDEN + s.to(torch.int64) + 0x632BE5AB)
        else:
            k = mix64(k * _GOLDEN + _wrap64(int(s) + 0x632BE5AB))
    return k


def uniform(keys: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``[N, *shape]`` float32 uniform in [0, 1) with 24-bit resolution, one row per key."""
    numel = math.prod(shape)
    idx = torch.arange(numel, device=keys.device, dtype=torch.int64)
    z = mix64(keys.to(torch.int64).view(-1, 1) * _GOLDEN + idx.view(1, -1))
    u = _lsr(z, 40).to(torch.float32) * (1.0 / (1 << 24))
    return u.view(keys.shape[0], *shape)


def exact_normal(keys: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``[N, *shape]`` standard normal draws (Box-Muller), one independent row per key."""
    u = uniform(stream_key(keys, 1), (2, *shape))
    u1 = u[:, 0].clamp_min(1e-7)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u[:, 1])


POOL_SIZE = 1 << 22
_POOLS: dict[torch.device, torch.Tensor] = {}


def _normal_pool(device: torch.device) -> torch.Tensor:
    """A fixed table of normal draws (same values for every run and batch size)."""
    if device not in _POOLS:
        _POOLS[device] = exact_normal(torch.tensor([0x5EED], device=device), (POOL_SIZE,))[0]
    return _POOLS[device]


def normal(keys: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``[N, *shape]`` normal draws for weight initialization, one row per key.

    Each row is a window of a fixed 4M-entry normal table at a key-derived offset: one gather
    instead of a hash per element, which makes re-initializing every blueprint of every slot
    at every germination cheap. Rows of different keys are effectively independent (windows
    start at random offsets); use :func:`exact_normal` where that is not enough.
    """
    numel = math.prod(shape)
    if numel > POOL_SIZE // 4:
        return exact_normal(keys, shape)
    pool = _normal_pool(keys.device)
    offset = _lsr(mix64(keys.to(torch.int64) * _GOLDEN + 0x2545F491), 40) % POOL_SIZE
    idx = (offset.view(-1, 1) + torch.arange(numel, device=keys.device).view(1, -1)) % POOL_SIZE
    return pool[idx].view(keys.shape[0], *shape)


def permutations(keys: torch.Tensor, n: int) -> torch.Tensor:
    """``[N, n]`` int64: an independent random permutation of ``range(n)`` per key."""
    return torch.argsort(uniform(keys, (n,)), dim=1, stable=True)
