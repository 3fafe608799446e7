"""Throughput of the esper_kernels ops against the eager torch compositions they replace.

``pytest bench/ --benchmark-only``. Each benchmark records the bytes an ideal implementation
must move and the achieved rate in ``extra_info`` (``bytes``, ``bytes_per_s``), so a regression
shows up as a rate, comparable across devices. On the CPU the ops run their torch reference
(the win there comes from inductor fusing them); on CUDA they run the Triton kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import esper_kernels as ek

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]
IMPLS = ["esper", "eager"]
BLEND_IMPLS = [*IMPLS, "inductor"]  # + the reference compiled by inductor (what a compiled step runs)

# Kasmina's layout: [B, N, C, H, W] view of a channels_last [B, N*C, H, W] grouped-conv output.
SHAPES = {"cpu": (32, 16, 16, 16, 16), "cuda": (64, 64, 16, 32, 32)}
GRAD_LAYERS = {"cpu": [(16, 432), (16, 4608), (16, 18432), (16, 330)],
               "cuda": [(64, 864), (64, 9216), (64, 36864), (64, 73728), (64, 650)]}  # fmt: skip


def _activation(device: str, requires_grad: bool = False) -> torch.Tensor:
    b, n, c, h, w = SHAPES[device]
    x = torch.randn(b, n * c, h, w, device=device).to(memory_format=torch.channels_last)
    return x.view(b, n, c, h, w).requires_grad_(requires_grad)


def _run(benchmark: object, fn: Callable[[], object], device: str, nbytes: int) -> None:
    def timed() -> object:
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    timed()  # warm-up (Triton JIT, allocator)
    benchmark(timed)
    benchmark.extra_info["bytes"] = nbytes
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.mean > 0:
        benchmark.extra_info["bytes_per_s"] = nbytes / stats.stats.mean


def _eager_blend(h: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return h + alpha.view(1, -1, 1, 1, 1) * (s - h)


def _blend_impl(impl: str):
    """``esper``: the public blend (Triton on CUDA); ``eager``: the torch reference;
    ``inductor``: the reference under ``torch.compile``, which is what a compiled training step
    runs (issue 14: is inductor's fused kernel as fast as the Triton one?)."""
    if impl == "esper":
        return lambda h, s, a: ek.blend(h, s, a, env_dim=1)
    if impl == "inductor":
        return torch.compile(_eager_blend, dynamic=False)
    return _eager_blend


@pytest.mark.parametrize("impl", BLEND_IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_blend_forward(benchmark: object, device: str, impl: str) -> None:
    benchmark.group = f"blend-forward-{device}"
    h, s = _activation(device), _activation(device)
    alpha = torch.rand(h.shape[1], device=device)
    impl_fn = _blend_impl(impl)  # made once: a fresh torch.compile wrapper per call costs ms
    fn = lambda: impl_fn(h, s, alpha)  # noqa: E731
    _run(benchmark, fn, device, 3 * h.numel() * h.element_size())


@pytest.mark.parametrize("impl", BLEND_IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_blend_forward_backward(benchmark: object, device: str, impl: str) -> None:
    benchmark.group = f"blend-fwd-bwd-{device}"
    h, s = _activation(device, True), _activation(device, True)
    alpha = torch.rand(h.shape[1], device=device, requires_grad=True)
    grad = torch.randn_like(h)
    impl_fn = _blend_impl(impl)

    def blend() -> torch.Tensor:
        return impl_fn(h, s, alpha)

    def fn() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(blend(), (h, s, alpha), grad)

    # forward: read h, s, write out; backward: read g, h, s, write grad_h, grad_s
    _run(benchmark, fn, device, 8 * h.numel() * h.element_size())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_straight_through_forward_backward(benchmark: object, device: str, impl: str) -> None:
    benchmark.group = f"straight-through-{device}"
    h, s = _activation(device, True), _activation(device, True)
    grad = torch.randn_like(h)
    op = ek.straight_through if impl == "esper" else ek.straight_through_reference

    def fn() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(op(h, s), (h, s), grad)

    # forward: copy h; backward: read g once (handed to both inputs)
    _run(benchmark, fn, device, 3 * h.numel() * h.element_size())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_grad_stats(benchmark: object, device: str, impl: str) -> None:
    benchmark.group = f"grad-stats-{device}"
    grads = [torch.randn(shape, device=device) for shape in GRAD_LAYERS[device]]
    op = ek.grad_stats if impl == "esper" else ek.grad_stats_reference
    _run(
        benchmark,
        lambda: op(grads, 1e-6, 10.0),
        device,
        sum(g.numel() * g.element_size() for g in grads),
    )
