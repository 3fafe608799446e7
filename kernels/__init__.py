"""Esper's fused ops: Triton kernels on CUDA, each with a plain-torch reference.

``blend`` and ``grad_stats`` are ``torch.library.triton_op`` ops (``esper::blend``,
``esper::blend_backward``, ``esper::grad_stats``) with registered autograd, so
``torch.compile(fullgraph=True)`` traces into them: on CUDA inductor sees the Triton launch,
on the CPU the reference's aten ops, which it fuses. The public ``blend`` calls the op only
where a kernel runs (through an ``autograd.Function`` so ``torch.func.grad`` works) and the
reference directly otherwise; ``straight_through`` needs no kernel. Without triton installed
the ops still exist and always take the reference branch. Triton detection and the dispatch
decision live in ``_triton``.
"""

from ._blend import blend, blend_backward_reference, blend_reference
from ._grad_stats import (
    GradStats,
    clip_coefficients,
    grad_histogram,
    grad_percentiles,
    grad_stats,
    grad_stats_reference,
)
from ._straight_through import straight_through, straight_through_reference
from ._triton import HAS_TRITON

__all__ = [
    "HAS_TRITON",
    "GradStats",
    "blend",
    "blend_backward_reference",
    "blend_reference",
    "clip_coefficients",
    "grad_histogram",
    "grad_percentiles",
    "grad_stats",
    "grad_stats_reference",
    "straight_through",
    "straight_through_reference",
]
