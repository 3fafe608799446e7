"""Straight-through seed output for the TRAINING stage: value of ``host``, gradient to both.

The composed form ``h + (s - s.detach())`` reads the seed twice and, worse, lets a diverging
seed poison the host's forward value (``inf - inf`` is NaN). Here the forward is one copy of
``host`` (which inductor folds into its consumer) and the backward hands the incoming gradient
to both inputs untouched. There is nothing to fuse, so there is no Triton kernel, and it is an
``autograd.Function`` rather than a ``torch.library`` custom op: torch's generated autograd for
custom ops rejects ``torch.func`` transforms (pytorch#168393, #170834), and Kasmina's
training step takes its gradients with ``torch.func.grad``, compiled or not.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["straight_through", "straight_through_reference"]


def straight_through_reference(host: Tensor, seed: Tensor) -> Tensor:
    """Plain-torch composition ``host + (seed - seed.detach())`` (the form this op replaces)."""
    return host + (seed - seed.detach())


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(host: Tensor, seed: Tensor) -> Tensor:
        return host.clone()  # an autograd.Function output may not be a view of its input

    @staticmethod
    def setup_context(
        ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor
    ) -> None:
        pass

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, grad


def straight_through(host: Tensor, seed: Tensor) -> Tensor:
    """Return ``host``'s value; the backward passes the output gradient to ``host`` and ``seed``.

    The seed's own input is ``host.detach()`` upstream, so the host's gradients are identical
    with or without a TRAINING seed while the seed still learns from the task loss.
    """
    if seed.shape != host.shape or seed.dtype != host.dtype:
        raise ValueError("straight_through: host and seed must have the same shape and dtype")
    return _StraightThrough.apply(host, seed)
