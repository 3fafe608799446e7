"""Per-(env, layer) gradient statistics in one read of each gradient.

Gate G2 and the telemetry need, for every env and layer, the gradient's norm, mean, std, max
magnitude and the fractions that vanish, explode or are not finite. Computed with torch ops
that is about eight reductions per layer, each re-reading the gradient. The Triton kernel
reads each gradient once: every program folds its chunk of one env's slice into partial
sums (count, mean and M2 merged with Chan's formula, so the std does not suffer
``E[x^2] - E[x]^2`` cancellation, sum of squares, max |g|, threshold and non-finite counts),
and a few tiny torch reductions over the partials finish the ``[N, L]`` tables.

NaN semantics follow torch: a NaN anywhere in an (env, layer) slice makes its norm, mean, std
and max_abs NaN; ``nonfinite`` counts NaN and +-Inf elements so callers can mask such envs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._blend import _env_layout
from ._triton import HAS_TRITON, esper_op, next_pow2, use_triton

__all__ = [
    "GradStats",
    "clip_coefficients",
    "grad_histogram",
    "grad_percentiles",
    "grad_stats",
    "grad_stats_reference",
]

_BLOCK = 1024
_PROGRAMS = 2048  # target programs per layer launch, summed over envs
_N_PARTIALS = 9  # count, mean, m2, sumsq, max_abs, vanishing, exploding, nonfinite, nan


class GradStats(NamedTuple):
    """``[N, L]`` float32 tables (env x layer) plus ``total_norm`` ``[N]``."""

    norm: Tensor
    mean: Tensor
    std: Tensor
    max_abs: Tensor
    frac_vanishing: Tensor
    frac_exploding: Tensor
    nonfinite: Tensor
    total_norm: Tensor


def _check(grads: list[Tensor]) -> int:
    if not grads:
        raise ValueError("grad_stats: need at least one gradient")
    n = grads[0].shape[0] if grads[0].ndim > 0 else 0
    for g in grads:
        if g.ndim == 0 or g.shape[0] != n or g.numel() == 0:
            raise ValueError("grad_stats: every gradient must be non-empty with leading dim N")
    return n


def _reference_table(
    grads: list[Tensor], vanishing_threshold: float, exploding_threshold: float
) -> Tensor:
    """``[7, N, L]`` rows: norm, mean, std, max_abs, frac_vanishing, frac_exploding, nonfinite."""
    columns = []
    for g in grads:
        x = g.reshape(g.shape[0], -1).float()
        a = x.abs()
        columns.append(
            torch.stack(
                [
                    torch.linalg.vector_norm(x, dim=1),
                    x.mean(dim=1),
                    x.std(dim=1, correction=0),
                    a.amax(dim=1),
                    (a < vanishing_threshold).float().mean(dim=1),
                    (a > exploding_threshold).float().mean(dim=1),
                    (~torch.isfinite(x)).float().sum(dim=1),
                ]
            )
        )
    return torch.stack(columns, dim=-1)


def _total_norm(norm: Tensor) -> Tensor:
    return norm.square().sum(dim=1).sqrt()


def grad_stats_reference(
    grads: list[Tensor], vanishing_threshold: float, exploding_threshold: float
) -> GradStats:
    """Plain-torch :func:`grad_stats` (several reductions per layer)."""
    _check(grads)
    table = _reference_table(grads, vanishing_threshold, exploding_threshold)
    return GradStats(*table.unbind(0), _total_norm(table[0]))


if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    @triton.jit
    def _grad_stats_kernel(
        g_ptr, part_ptr, m, chunk, layer, stride_stat, stride_env, stride_layer,
        vanishing, exploding, BLOCK: tl.constexpr,
    ):  # fmt: skip
        env = tl.program_id(0)
        pid = tl.program_id(1)
        base = g_ptr + env.to(tl.int64) * m
        start = pid.to(tl.int64) * chunk
        count = 0.0
        mean = 0.0
        m2 = 0.0
        sumsq = 0.0
        max_abs = 0.0
        n_van = 0.0
        n_exp = 0.0
        n_nonfinite = 0.0
        n_nan = 0.0
        for off in range(0, chunk, BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < m
            x = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
            a = tl.abs(x)
            is_nan = x != x
            # Chan et al.: merge this block's (count, mean, M2) into the running triple.
            n_b = tl.sum(mask.to(tl.float32))
            mean_b = tl.sum(x) / tl.maximum(n_b, 1.0)
            dev = tl.where(mask, x - mean_b, 0.0)
            total = count + n_b
            delta = mean_b - mean
            mean += delta * (n_b / tl.maximum(total, 1.0))
            m2 += tl.sum(dev * dev) + delta * delta * (count * n_b / tl.maximum(total, 1.0))
            count = total
            sumsq += tl.sum(x * x)
            max_abs = tl.maximum(max_abs, tl.max(tl.where(is_nan, 0.0, a)))
            n_van += tl.sum((mask & (a < vanishing)).to(tl.float32))
            n_exp += tl.sum((mask & (a > exploding)).to(tl.float32))
            n_nonfinite += tl.sum((mask & (is_nan | (a == float("inf")))).to(tl.float32))
            n_nan += tl.sum(is_nan.to(tl.float32))
        out = part_ptr + env * stride_env + layer * stride_layer + pid
        tl.store(out, count)
        tl.store(out + stride_stat, mean)
        tl.store(out + 2 * stride_stat, m2)
        tl.store(out + 3 * stride_stat, sumsq)
        tl.store(out + 4 * stride_stat, max_abs)
        tl.store(out + 5 * stride_stat, n_van)
        tl.store(out + 6 * stride_stat, n_exp)
        tl.store(out + 7 * stride_stat, n_nonfinite)
        tl.store(out + 8 * stride_stat, n_nan)


def _chunking(m: int, n_env: int) -> tuple[int, int]:
    """(chunk, programs per env): a multiple of the block per program, ~_PROGRAMS in all."""
    block = min(_BLOCK, next_pow2(m))
    blocks = triton.cdiv(m, block)
    per_env = max(1, min(blocks, triton.cdiv(_PROGRAMS, n_env)))
    chunk = triton.cdiv(blocks, per_env) * block
    return chunk, triton.cdiv(m, chunk)


def _grad_stats_triton(
    grads: list[Tensor], vanishing_threshold: float, exploding_threshold: float
) -> Tensor:
    n = grads[0].shape[0]
    # Statistics ignore element order, so any dense env-major layout (contiguous or
    # channels_last) is walked in place; only other layouts are copied.
    flat = [g if _env_layout(g, 0) == (1, n, g.numel() // n) else g.contiguous() for g in grads]
    plans = [_chunking(g.numel() // n, n) for g in flat]
    width = max(p for _, p in plans)
    part = torch.zeros(
        (_N_PARTIALS, n, len(flat), width), device=flat[0].device, dtype=torch.float32
    )
    for layer, (g, (chunk, programs)) in enumerate(zip(flat, plans, strict=True)):
        wrap_triton(_grad_stats_kernel)[(n, programs)](
            g, part, g.numel() // n, chunk, layer, part.stride(0), part.stride(1), part.stride(2),
            vanishing_threshold, exploding_threshold, BLOCK=min(_BLOCK, next_pow2(g.numel() // n)),
        )  # fmt: skip
    count, mean_p, m2_p, sumsq, max_abs, n_van, n_exp, n_nonfinite, n_nan = part.unbind(0)
    m = count.sum(dim=-1)
    mean = (count * mean_p).sum(dim=-1) / m
    m2 = (m2_p + count * (mean_p - mean.unsqueeze(-1)).square()).sum(dim=-1)
    has_nan = n_nan.sum(dim=-1) > 0
    max_abs = torch.where(has_nan, torch.nan, max_abs.amax(dim=-1))
    return torch.stack(
        [
            sumsq.sum(dim=-1).sqrt(),
            mean,
            (m2 / m).sqrt(),
            max_abs,
            n_van.sum(dim=-1) / m,
            n_exp.sum(dim=-1) / m,
            n_nonfinite.sum(dim=-1),
        ]
    )


@esper_op("esper::grad_stats")
def _grad_stats_op(
    grads: list[Tensor], vanishing_threshold: float, exploding_threshold: float
) -> tuple[Tensor, Tensor]:
    if all(use_triton(g) for g in grads):
        table = _grad_stats_triton(grads, vanishing_threshold, exploding_threshold)
    else:
        table = _reference_table(grads, vanishing_threshold, exploding_threshold)
    return table, _total_norm(table[0])


def grad_stats(
    grads: list[Tensor], vanishing_threshold: float, exploding_threshold: float
) -> GradStats:
    """Gradient statistics of L per-env gradients ``[N, ...]`` as ``[N, L]`` float32 tables.

    ``frac_vanishing`` counts ``|g| < vanishing_threshold``, ``frac_exploding`` counts
    ``|g| > exploding_threshold``, ``nonfinite`` counts NaN/Inf elements, ``std`` is the
    population std and ``total_norm`` ``[N]`` is the norm over all layers (for per-env
    clipping, see :func:`clip_coefficients`). One fused Triton pass on CUDA; the torch
    reference elsewhere, which inductor fuses under ``torch.compile``.
    """
    _check(grads)
    table, total_norm = _grad_stats_op(
        list(grads), float(vanishing_threshold), float(exploding_threshold)
    )
    return GradStats(*table.unbind(0), total_norm)


def clip_coefficients(total_norm: Tensor, max_norm: float | Tensor) -> Tensor:
    """Per-env clip factor ``min(1, max_norm / (total_norm + 1e-6))``; NaN norms give NaN."""
    return (max_norm / (total_norm + 1e-6)).clamp(max=1.0)


def _flat_layers(grads: list[Tensor]) -> list[Tensor]:
    _check(grads)
    return [g.reshape(g.shape[0], -1).float() for g in grads]


def grad_percentiles(
    grads: list[Tensor], qs: Tensor | list[float], *, absolute: bool = True
) -> Tensor:
    """``[N, L, Q]`` percentiles (``qs`` in [0, 1], linear interpolation) per env and layer.

    Of ``|g|`` by default, the magnitude profile the research telemetry plots. Sorts each
    layer once for all envs and quantiles (``torch.quantile`` caps inputs at 16M elements).
    NaNs sort last, so they show up in the top percentiles. Pass ``qs`` as a tensor on the
    gradients' device in a per-epoch path: a list is copied to the device (once per call).
    """
    layers = _flat_layers(grads)
    q = torch.as_tensor(qs, dtype=torch.float32, device=layers[0].device)
    out = []
    for x in layers:
        v = (x.abs() if absolute else x).sort(dim=1).values
        pos = q * (v.shape[1] - 1)
        lo = pos.floor().long()
        hi = pos.ceil().long()
        frac = (pos - lo).expand(v.shape[0], -1)
        out.append(torch.lerp(v[:, lo], v[:, hi], frac))
    return torch.stack(out, dim=1)


def grad_histogram(
    grads: list[Tensor], bins: int, range: tuple[float, float], *, absolute: bool = False
) -> Tensor:
    """``[N, L, bins]`` float32 counts per env and layer, like ``torch.histc`` batched over envs.

    Values outside ``range`` and NaNs are dropped; the upper edge falls into the last bin.
    """
    lo, hi = float(range[0]), float(range[1])
    if not hi > lo or bins < 1:
        raise ValueError("grad_histogram: need bins >= 1 and range[1] > range[0]")
    out = []
    for x in _flat_layers(grads):
        v = x.abs() if absolute else x
        inside = (v >= lo) & (v <= hi)
        idx = ((v - lo) * (bins / (hi - lo))).floor().clamp(0, bins - 1)
        idx = torch.where(inside, idx, 0).long()
        counts = torch.zeros(v.shape[0], bins, device=v.device, dtype=torch.float32)
        out.append(counts.scatter_add_(1, idx, inside.float()))
    return torch.stack(out, dim=1)
