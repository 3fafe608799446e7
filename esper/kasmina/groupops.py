"""Seed ops whose env count stays a symbolic size under ``torch.compile``.

The compiled group-by-blueprint step runs each blueprint on a gathered group of envs whose
size changes from epoch to epoch; the sizes are marked dynamic so one graph serves them all.
Two things would pin a size to a constant (a recompile per size): inductor's convolution
lowering guards ``groups`` to an int, and ``F.group_norm`` takes ``num_groups`` as an int.
So under compile a grouped convolution runs as an opaque op (``esper::env_conv2d``: the same
ATen kernel, behind an ``autograd.Function`` because compiled ``torch.func.grad`` rejects a
custom op's own autograd, pytorch#170834) and group norm is written out. Eager calls take the
plain functions, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _groups(x: Tensor, weight: Tensor) -> int:
    return x.shape[1] // weight.shape[1]


def _conv_backward(grad: Tensor, x: Tensor, weight: Tensor, padding: int) -> tuple[Tensor, Tensor]:
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], _groups(x, weight),
        [True, True, False],
    )
    return gx.contiguous(), gw.contiguous()


# Outputs are made contiguous in the real and fake kernels alike, so their strides agree.
@torch.library.custom_op("esper::env_conv2d", mutates_args=())
def _conv_op(x: Tensor, weight: Tensor, padding: int) -> Tensor:
    return F.conv2d(x.contiguous(), weight, padding=padding, groups=_groups(x, weight)).contiguous()


@_conv_op.register_fake
def _(x: Tensor, weight: Tensor, padding: int) -> Tensor:
    return F.conv2d(x, weight, padding=padding, groups=_groups(x, weight)).contiguous()


@torch.library.custom_op("esper::env_conv2d_backward", mutates_args=())
def _conv_backward_op(grad: Tensor, x: Tensor, weight: Tensor, padding: int) -> tuple[Tensor, Tensor]:
    return _conv_backward(grad.contiguous(), x.contiguous(), weight, padding)


@_conv_backward_op.register_fake
def _(grad: Tensor, x: Tensor, weight: Tensor, padding: int) -> tuple[Tensor, Tensor]:
    return _conv_backward(grad, x, weight, padding)


class _EnvConv(torch.autograd.Function):
    """Stride-1 grouped conv (groups from the shapes) with its backward as a second opaque op."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, padding: int) -> Tensor:
        return _conv_op(x, weight, padding)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
        x, weight, padding = inputs
        ctx.save_for_backward(x, weight)
        ctx.padding = padding

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        gx, gw = _conv_backward_op(grad, x, weight, ctx.padding)
        return gx, gw, None


def conv2d(x: Tensor, weight: Tensor, padding: int) -> Tensor:
    """Stride-1 grouped conv, ``groups = x.shape[1] // weight.shape[1]`` (env count times any
    per-env grouping): opaque under compile so a symbolic group count stays symbolic."""
    if torch.compiler.is_compiling():
        return _EnvConv.apply(x, weight, padding)
    return F.conv2d(x, weight, padding=padding, groups=_groups(x, weight))


def group_norm(x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """``F.group_norm`` with flat ``weight``/``bias``; written out under compile, where
    ``num_groups`` may be symbolic."""
    if not torch.compiler.is_compiling():
        return F.group_norm(x, num_groups, weight, bias, eps=eps)
    b, c, h, w = x.shape
    g = x.reshape(b, num_groups, -1)
    mean = g.mean(dim=-1, keepdim=True)
    var = (g - mean).square().mean(dim=-1, keepdim=True)
    y = ((g - mean) * torch.rsqrt(var + eps)).view(b, c, h, w)
    return y * weight.view(1, c, 1, 1) + bias.view(1, c, 1, 1)
