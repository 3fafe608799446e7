"""Functional layers on the grouped layout ``[B, N*C, H, W]``.

Every env's channels sit side by side in one tensor, so one grouped convolution runs all
N envs and BatchNorm's per-channel statistics are per env for free. Parameters carry a
leading env dimension ``[N, ...]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from esper import rng
from esper.kasmina import groupops


def init_weight(keys: torch.Tensor, stream: tuple[int, ...], shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    """Per-env ``[N, *shape]`` weights at the scale of PyTorch's default conv/linear init.

    Std ``1/sqrt(3 fan_in)`` (the variance of ``kaiming_uniform_(a=sqrt(5))``), not Kaiming's
    ``sqrt(2/fan_in)``: ahead of a norm layer the weight scale only sets the effective learning
    rate, and the 2.4x larger Kaiming scale cost small hosts ~10 accuracy points in 20 epochs
    (measured: one-block 16-wide host 51.0 vs 40.6, narrow 4-8-16 host 51.2 vs 42.6).
    """
    return rng.normal(rng.stream_key(keys, *stream), shape) * (1.0 / math.sqrt(3.0 * fan_in))


def to_grouped(x: torch.Tensor) -> torch.Tensor:
    """``[N, B, C, H, W]`` -> ``[B, N*C, H, W]`` in channels_last memory (one copy).

    channels_last speeds up the CPU's grouped convolutions (N=64: 1.1x per epoch in the
    bench suite, up to 1.6x per step back-to-back; bench/RESULTS.md); ``env_view`` stays a
    free view of it.
    """
    n, b, c, h, w = x.shape
    return x.permute(1, 3, 4, 0, 2).reshape(b, h, w, n * c).permute(0, 3, 1, 2)


def env_view(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, N*C, H, W]`` -> ``[B, N, C, H, W]`` (a free view)."""
    b, nc, h, w = x.shape
    return x.view(b, n, nc // n, h, w)


def per_env(v: torch.Tensor, ndim: int = 5, env_dim: int = 1) -> torch.Tensor:
    """Reshape a ``[N]`` vector to broadcast along ``env_dim`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[env_dim] = v.shape[0]
    return v.view(shape)


def conv(x: torch.Tensor, weight: torch.Tensor, padding: int = 1, shared_input: bool = False) -> torch.Tensor:
    """Grouped conv with per-env weights ``[N, Cout, Cin, k, k]``.

    With ``shared_input`` the input is one ``[B, Cin, H, W]`` batch seen by every env
    (validation), so a plain conv over stacked output channels avoids copying it N times.
    """
    n, cout, cin, k, _ = weight.shape
    w = weight.reshape(n * cout, cin, k, k)
    return F.conv2d(x, w, padding=padding, groups=1 if shared_input else n)


def seed_conv(x: torch.Tensor, weight: torch.Tensor, padding: int = 1) -> torch.Tensor:
    """:func:`conv` for seed blueprints, whose env count is symbolic in the compiled plan."""
    n, cout, cin, k, _ = weight.shape
    return groupops.conv2d(x, weight.reshape(n * cout, cin, k, k), padding)


def batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-env BatchNorm; returns the output and the updated running statistics.

    Written out (not ``F.batch_norm``) so the statistics update is a returned value, which
    keeps the training step functional for ``torch.func.grad`` and ``torch.compile``.
    """
    c = x.shape[1]
    if training:
        mean = x.mean(dim=(0, 2, 3))
        # Two passes: ``Tensor.var`` over non-innermost dims is ~30x slower than this on CPU.
        var = (x - mean.view(1, c, 1, 1)).square().mean(dim=(0, 2, 3))
        count = x.numel() // c
        with torch.no_grad():
            unbiased = var.detach() * (count / max(count - 1, 1))
            new_mean = running_mean.flatten() * (1 - momentum) + mean.detach() * momentum
            new_var = running_var.flatten() * (1 - momentum) + unbiased * momentum
    else:
        mean, var = running_mean.flatten(), running_var.flatten()
        new_mean, new_var = mean, var
    scale = weight.flatten() * torch.rsqrt(var + eps)
    shift = bias.flatten() - mean * scale
    y = x * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)
    return y, new_mean.view_as(running_mean), new_var.view_as(running_var)


def group_norm(x: torch.Tensor, n: int, groups: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-env GroupNorm (per-sample statistics: no running state, same in train and eval)."""
    return groupops.group_norm(x, n * groups, weight.flatten(), bias.flatten(), eps=1e-5)


def linear_head(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Pooled ``[B, N*C]`` features and ``[N, K, C]`` weights -> logits ``[N, B, K]``."""
    n, k, c = weight.shape
    f = features.view(features.shape[0], n, c)
    return torch.einsum("bnc,nkc->nbk", f, weight) + bias.view(n, 1, k)
