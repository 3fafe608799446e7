"""The Triton kernels against their torch references, on the CPU through the Triton interpreter.

``TRITON_INTERPRET=1`` only takes effect if set before triton is imported, so the cases run in
one subprocess (this file executed as a script) and report one JSON line each; the pytest side
turns every line into its own test. Shapes are tiny and odd so tile edges are exercised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from functools import partial

import pytest
import torch

CASES: dict[str, Callable[[], None]] = {}

_TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2}}


def _blend_inputs(kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """host/seed leaves of a given layout, and the env dim."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    if kind == "n1_dim0":
        h, s, d = rnd(1, 3, 5), rnd(1, 3, 5), 0
    elif kind == "dim0":
        h, s, d = rnd(3, 5, 7), rnd(3, 5, 7), 0
    elif kind == "dim1":  # [B, N, C, H, W] contiguous
        h, s, d = rnd(3, 2, 5, 3, 7), rnd(3, 2, 5, 3, 7), 1
    elif kind == "dim1_channels_last":  # free view of a channels_last grouped-conv output
        base = [rnd(3, 2 * 5, 3, 7).to(memory_format=torch.channels_last) for _ in range(2)]
        h, s, d = base[0].view(3, 2, 5, 3, 7), base[1].view(3, 2, 5, 3, 7), 1
    elif kind == "dim1_n1_channels_last":
        base = [rnd(3, 5, 3, 7).to(memory_format=torch.channels_last) for _ in range(2)]
        h, s, d = base[0].view(3, 1, 5, 3, 7), base[1].view(3, 1, 5, 3, 7), 1
    elif kind == "dim1_channels_last_3d":
        base = [rnd(2, 3 * 2, 3, 2, 5).to(memory_format=torch.channels_last_3d) for _ in range(2)]
        h, s, d = base[0].view(2, 3, 2, 3, 2, 5), base[1].view(2, 3, 2, 3, 2, 5), 1
    elif kind == "dim0_channels_last":  # [N, C, H, W]
        h = rnd(3, 5, 3, 7).to(memory_format=torch.channels_last)
        s = rnd(3, 5, 3, 7).to(memory_format=torch.channels_last)
        d = 0
    elif kind == "env_last":  # inner == 1
        h, s, d = rnd(4, 5, 3), rnd(4, 5, 3), -1
    elif kind == "mixed_strides":  # seed contiguous, host channels_last: seed is copied
        h = rnd(3, 5, 3, 7).to(memory_format=torch.channels_last)
        s, d = rnd(3, 5, 3, 7), 0
    elif kind == "non_dense":  # strided slices: contiguous fallback
        h, s, d = rnd(3, 10, 7)[:, ::2], rnd(3, 10, 7)[:, ::2], 1
    else:
        raise KeyError(kind)
    return h.detach().requires_grad_(), s.detach().requires_grad_(), d


def _launch_counter(module: object, name: str) -> list[int]:
    """Count calls of a Triton launcher, to prove the kernel path (not the reference) ran."""
    calls = [0]
    inner = getattr(module, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return inner(*args, **kwargs)

    setattr(module, name, counted)
    return calls


def _check_blend(kind: str, dtype: torch.dtype) -> None:
    import esper_kernels as ek
    from esper_kernels import _blend
    from esper_kernels._triton import force_triton_on_cpu

    fwd = _launch_counter(_blend, "_blend_fwd_triton")
    bwd = _launch_counter(_blend, "_blend_bwd_triton")
    h, s, d = _blend_inputs(kind, dtype)
    n = h.shape[d]
    alpha = torch.linspace(0.1, 0.9, n).requires_grad_()
    grad = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    with force_triton_on_cpu():
        out = ek.blend(h, s, alpha, env_dim=d)
        got = torch.autograd.grad(out, (h, s, alpha), grad)
    assert fwd[0] == 1 and bwd[0] == 1, "the Triton path did not run"
    ref = ek.blend_reference(h, s, alpha, env_dim=d)
    want = torch.autograd.grad(ref, (h, s, alpha), grad)
    tol = _TOL[dtype]
    assert out.dtype == dtype and out.shape == h.shape
    if kind != "non_dense":
        assert out.stride() == h.stride(), (out.stride(), h.stride())
    torch.testing.assert_close(out, ref, **tol)
    for name, a, b in zip(("host", "seed"), got[:2], want[:2], strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"grad {name}: {m}")
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-4)


def _grad_inputs(n: int, dtype: torch.dtype, nonfinite: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    grads = [
        torch.randn(n, 7, 5, generator=g),
        3.0 * torch.randn(n, 3001, generator=g) + 0.5,
        1e-3 * torch.randn(n, 1, generator=g),
        torch.randn(n, 4, 3, 3, generator=g).to(memory_format=torch.channels_last),  # in place
        torch.randn(6, n, generator=g).t(),  # not env-major: copied
    ]
    if nonfinite:
        grads[0][0, 3, 1] = float("inf")
        grads[1][n - 1, 17] = float("nan")
        grads[1][n - 1, 18] = -float("inf")
    return [x.to(dtype) for x in grads]


def _check_grad_stats(n: int, dtype: torch.dtype, nonfinite: bool, programs: int) -> None:
    import esper_kernels as ek
    from esper_kernels import _grad_stats
    from esper_kernels._triton import force_triton_on_cpu

    calls = _launch_counter(_grad_stats, "_grad_stats_triton")
    _grad_stats._PROGRAMS = programs  # few programs -> several blocks per program
    grads = _grad_inputs(n, dtype, nonfinite)
    with force_triton_on_cpu():
        got = ek.grad_stats(grads, 0.05, 2.5)
    assert calls[0] == 1, "the Triton path did not run"
    want = ek.grad_stats_reference(grads, 0.05, 2.5)
    for name, a, b in zip(got._fields, got, want, strict=True):
        assert a.dtype == torch.float32
        assert a.shape == ((n, len(grads)) if name != "total_norm" else (n,))
        torch.testing.assert_close(
            a, b, rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m, k=name: f"{k}: {m}"
        )


for _kind in (
    "n1_dim0",
    "dim0",
    "dim1",
    "dim1_channels_last",
    "dim1_n1_channels_last",
    "dim1_channels_last_3d",
    "dim0_channels_last",
    "env_last",
    "mixed_strides",
    "non_dense",
):
    CASES[f"blend-{_kind}-fp32"] = partial(_check_blend, _kind, torch.float32)
for _kind in ("dim0", "dim1_channels_last"):
    CASES[f"blend-{_kind}-bf16"] = partial(_check_blend, _kind, torch.bfloat16)
CASES["grad_stats-n1-fp32"] = partial(_check_grad_stats, 1, torch.float32, False, 2048)
CASES["grad_stats-n3-fp32-nonfinite"] = partial(_check_grad_stats, 3, torch.float32, True, 2048)
CASES["grad_stats-n3-fp32-chunked"] = partial(_check_grad_stats, 3, torch.float32, True, 2)
CASES["grad_stats-n2-bf16"] = partial(_check_grad_stats, 2, torch.bfloat16, False, 2048)


def _main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import warnings

    warnings.simplefilter("ignore")  # the interpreter warns about NaN arithmetic in numpy
    for name, case in CASES.items():
        try:
            case()
            print(json.dumps({"case": name, "ok": True}), flush=True)
        except Exception:
            print(json.dumps({"case": name, "ok": False, "error": traceback.format_exc()}))


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, dict]:
    from esper_kernels import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record["case"]] = record
    if not results:
        pytest.fail(f"interpreter run failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference_interpreted(
    case: str, interpreted_results: dict[str, dict]
) -> None:
    record = interpreted_results.get(case)
    assert record is not None, "case did not report (subprocess crashed?)"
    assert record["ok"], record.get("error")


if __name__ == "__main__":
    _main()
