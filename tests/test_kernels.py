"""esper_kernels on the CPU (reference branch) and on CUDA: values, autograd, op registration,
torch.compile without graph breaks, and import without triton.

The Triton kernels themselves are checked under the interpreter in test_kernels_interpret.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.library import opcheck

import esper_kernels as ek
from esper_kernels._triton import force_op_on_cpu

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _channels_last_bnchw(b: int, n: int, c: int, h: int, w: int, **kw: object) -> torch.Tensor:
    """[B, N, C, H, W] view of a channels_last [B, N*C, H, W] activation, as Kasmina lays it out."""
    x = torch.randn(b, n * c, h, w, **kw).to(memory_format=torch.channels_last)
    return x.view(b, n, c, h, w)


# --- blend -------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_dim", [0, 1])
def test_blend_reference_is_the_formula(env_dim: int) -> None:
    h, s = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    alpha = torch.rand(h.shape[env_dim])
    a = alpha.view(-1, 1, 1) if env_dim == 0 else alpha.view(1, -1, 1)
    torch.testing.assert_close(ek.blend_reference(h, s, alpha, env_dim), h + a * (s - h))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nbchw", "bnchw", "bnchw_channels_last"])
def test_blend_matches_reference_with_grads(device: str, dtype: torch.dtype, layout: str) -> None:
    torch.manual_seed(0)
    if layout == "nbchw":
        h, s, env_dim = torch.randn(3, 2, 4, 5, 5), torch.randn(3, 2, 4, 5, 5), 0
    elif layout == "bnchw":
        h, s, env_dim = torch.randn(2, 3, 4, 5, 5), torch.randn(2, 3, 4, 5, 5), 1
    else:
        h, s, env_dim = _channels_last_bnchw(2, 3, 4, 5, 5), _channels_last_bnchw(2, 3, 4, 5, 5), 1
    h = h.to(device, dtype).requires_grad_()
    s = s.to(device, dtype).requires_grad_()
    alpha = torch.rand(3, device=device, requires_grad=True)
    grad = torch.randn(h.shape, device=device, dtype=dtype)
    with force_op_on_cpu():  # the esper::blend op (its reference branch on the CPU)
        out = ek.blend(h, s, alpha, env_dim)
        got = torch.autograd.grad(out, (h, s, alpha), grad)
    ref = ek.blend_reference(h, s, alpha, env_dim)
    want = torch.autograd.grad(ref, (h, s, alpha), grad)
    tol = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, ref, **tol)
    assert out.dtype == dtype and out.stride() == h.stride()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)
    assert got[2].shape == (3,) and got[2].dtype == torch.float32


def test_blend_alpha_extremes_select_host_or_seed() -> None:
    h, s = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    out = ek.blend(h, s, torch.tensor([0.0, 1.0, 0.0]), env_dim=1)
    torch.testing.assert_close(out[:, 0], h[:, 0])
    torch.testing.assert_close(out[:, 1], s[:, 1])


def test_blend_rejects_bad_shapes() -> None:
    h = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="alpha"):
        ek.blend(h, h.clone(), torch.rand(2), env_dim=1)
    with pytest.raises(ValueError, match="same shape"):
        ek.blend(h, torch.randn(2, 3, 5), torch.rand(2))


@pytest.mark.parametrize("env_dim", [0, 1])
def test_blend_gradcheck(env_dim: int) -> None:
    kw = {"dtype": torch.float64, "requires_grad": True}
    h, s = torch.randn(2, 3, 4, **kw), torch.randn(2, 3, 4, **kw)
    alpha = torch.rand(h.shape[env_dim], **kw)
    assert torch.autograd.gradcheck(lambda *x: ek.blend_reference(*x, env_dim), (h, s, alpha))
    assert torch.autograd.gradcheck(lambda *x: ek.blend(*x, env_dim), (h, s, alpha))
    with force_op_on_cpu():
        assert torch.autograd.gradcheck(lambda *x: ek.blend(*x, env_dim), (h, s, alpha))
        assert torch.autograd.gradgradcheck(lambda *x: ek.blend(*x, env_dim), (h, s, alpha))


@pytest.mark.parametrize("via_op", [False, True])
def test_blend_and_straight_through_under_torch_func_grad(via_op: bool) -> None:
    """Kasmina takes gradients with torch.func.grad; custom-op autograd alone would refuse."""
    h, s, alpha = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.rand(3)

    def loss(
        blend: object, st: object, h: torch.Tensor, s: torch.Tensor, a: torch.Tensor
    ) -> torch.Tensor:
        return st(blend(h, s, a, 1), s.tanh()).square().sum()

    want = torch.func.grad(loss, argnums=(2, 3, 4))(
        ek.blend_reference, ek.straight_through_reference, h, s, alpha
    )
    with force_op_on_cpu(via_op):
        got = torch.func.grad(loss, argnums=(2, 3, 4))(ek.blend, ek.straight_through, h, s, alpha)
    torch.testing.assert_close(got, want)


def test_blend_opcheck() -> None:
    h = _channels_last_bnchw(2, 3, 2, 3, 3).requires_grad_()
    s = _channels_last_bnchw(2, 3, 2, 3, 3).requires_grad_()
    alpha = torch.rand(3, requires_grad=True)
    opcheck(torch.ops.esper.blend.default, (h, s, alpha, 1))
    opcheck(torch.ops.esper.blend_backward.default, (torch.randn(2, 3, 2, 3, 3), h, s, alpha, 1))


# --- straight_through ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_straight_through_value_and_grads(device: str) -> None:
    h = torch.randn(3, 4, device=device, requires_grad=True)
    s = torch.randn(3, 4, device=device, requires_grad=True)
    out = ek.straight_through(h, s)
    assert torch.equal(out, h)
    grad = torch.randn(3, 4, device=device)
    gh, gs = torch.autograd.grad(out, (h, s), grad)
    rh, rs = torch.autograd.grad(ek.straight_through_reference(h, s), (h, s), grad)
    assert torch.equal(gh, grad) and torch.equal(gs, grad)
    torch.testing.assert_close((gh, gs), (rh, rs))


def test_straight_through_keeps_host_gradients_and_forward_finite() -> None:
    """Host grads are identical with and without a TRAINING seed (whose input is host.detach())."""
    torch.manual_seed(0)
    w = torch.randn(4, 4, requires_grad=True)
    seed_w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(5, 4)

    def loss(with_seed: bool) -> torch.Tensor:
        h = x @ w
        if with_seed:
            h = ek.straight_through(h, h.detach() @ seed_w)
        return h.tanh().sum()

    (g_plain,) = torch.autograd.grad(loss(False), (w,))
    g_host, g_seed = torch.autograd.grad(loss(True), (w, seed_w))
    assert torch.equal(g_plain, g_host)
    assert g_seed.abs().sum() > 0
    # A diverged seed cannot poison the host's value (the composed form would give NaN).
    h = torch.ones(3)
    assert torch.equal(ek.straight_through(h, torch.full((3,), float("inf"))), h)


def test_straight_through_gradcheck() -> None:
    kw = {"dtype": torch.float64, "requires_grad": True}
    h, s = torch.randn(3, 4, **kw), torch.randn(3, 4, **kw)
    # Only the host path is a true derivative; the seed's is straight-through by design.
    assert torch.autograd.gradcheck(ek.straight_through, (h, s.detach()))


# --- grad_stats and friends ----------------------------------------------------------------------


def _grads(n: int, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    grads = [
        torch.randn(n, 8, 3, 3, 3, generator=g),
        2.0 * torch.randn(n, 37, generator=g) + 0.3,
        1e-4 * torch.randn(n, 5, generator=g),
    ]
    return [x.to(device) for x in grads]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 4])
def test_grad_stats_per_env_per_layer(device: str, n: int) -> None:
    grads = _grads(n, device)
    grads[1][n - 1, 2] = float("nan")
    grads[0][0, 1, 0, 0, 0] = float("inf")
    st = ek.grad_stats(grads, vanishing_threshold=1e-3, exploding_threshold=2.0)
    assert all(t.dtype == torch.float32 for t in st)
    assert st.norm.shape == (n, 3) and st.total_norm.shape == (n,)
    for e in range(n):  # an independent per-env computation
        for layer, g in enumerate(grads):
            x = g[e].flatten().double().cpu()
            want = [
                x.square().sum().sqrt(),
                x.mean(),
                x.std(correction=0),
                x.abs().max(),
                (x.abs() < 1e-3).double().mean(),
                (x.abs() > 2.0).double().mean(),
                (~x.isfinite()).sum().double(),
            ]
            got = [t[e, layer].double().cpu() for t in st[:7]]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(st.total_norm, st.norm.square().sum(1).sqrt(), equal_nan=True)
    ref = ek.grad_stats_reference(grads, 1e-3, 2.0)
    for a, b in zip(st, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_grad_stats_opcheck_and_validation() -> None:
    opcheck(torch.ops.esper.grad_stats.default, (_grads(2), 1e-3, 2.0))
    with pytest.raises(ValueError):
        ek.grad_stats([], 1e-3, 2.0)
    with pytest.raises(ValueError):
        ek.grad_stats([torch.randn(2, 3), torch.randn(3, 3)], 1e-3, 2.0)


def test_clip_coefficients() -> None:
    norms = torch.tensor([0.5, 2.0, 10.0])
    torch.testing.assert_close(
        ek.clip_coefficients(norms, 2.0), torch.tensor([1.0, 2.0 / (2.0 + 1e-6), 0.2 / (1 + 1e-7)])
    )


def test_grad_percentiles_match_quantile() -> None:
    grads = _grads(3)
    qs = [0.0, 0.25, 0.5, 0.9, 1.0]
    got = ek.grad_percentiles(grads, qs)
    assert got.shape == (3, 3, 5)
    for e in range(3):
        for layer, g in enumerate(grads):
            want = torch.quantile(g[e].abs().flatten(), torch.tensor(qs))
            torch.testing.assert_close(got[e, layer], want)
    signed = ek.grad_percentiles(grads, qs, absolute=False)
    torch.testing.assert_close(signed[1, 1], torch.quantile(grads[1][1], torch.tensor(qs)))


def test_grad_histogram_matches_histc() -> None:
    grads = _grads(3)
    grads[1][0, 0] = float("nan")
    got = ek.grad_histogram(grads, bins=7, range=(-2.0, 3.0))
    assert got.shape == (3, 3, 7)
    for e in range(3):
        for layer, g in enumerate(grads):
            x = g[e].flatten()
            want = torch.histc(x[~x.isnan()], bins=7, min=-2.0, max=3.0)
            torch.testing.assert_close(got[e, layer], want)


# --- compile, dispatch, import -------------------------------------------------------------------


def _step(
    h: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    blended = ek.blend(h, s, alpha, env_dim=1)
    trained = ek.straight_through(h * 2.0, s.tanh())
    st = ek.grad_stats([g1, g2], 1e-3, 1.0)
    return (
        blended,
        trained,
        st.norm,
        st.std,
        st.total_norm,
        ek.clip_coefficients(st.total_norm, 1.0),
    )


def _compile_check(device: str) -> None:
    torch._dynamo.reset()
    h = _channels_last_bnchw(2, 3, 4, 5, 5, device=device).requires_grad_()
    s = _channels_last_bnchw(2, 3, 4, 5, 5, device=device).requires_grad_()
    alpha = torch.rand(3, device=device, requires_grad=True)
    g1, g2 = torch.randn(3, 4, 9, device=device), torch.randn(3, 7, device=device)
    compiled = torch.compile(_step, fullgraph=True)  # fullgraph: a graph break raises

    def run(fn: object) -> tuple[torch.Tensor, ...]:
        res = fn(h, s, alpha, g1, g2)
        loss = res[0].square().sum() + (res[1] * res[1].detach()).sum()
        return (*res, *torch.autograd.grad(loss, (h, s, alpha)))

    eager = run(_step)
    with force_op_on_cpu():  # on CUDA the op path is the default; on the CPU force it
        got, codes = run_and_get_code(run, compiled)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    # The ops were traced into (reference or Triton launch), never called as opaque kernels.
    assert codes and not any("torch.ops.esper" in code for code in codes)


@pytest.mark.compile
def test_compiled_matches_eager_cpu() -> None:
    _compile_check("cpu")


@pytest.mark.compile
@pytest.mark.cuda
def test_compiled_matches_eager_cuda() -> None:
    _compile_check("cuda")


@pytest.mark.compile
def test_compiled_torch_func_grad_cpu() -> None:
    """Kasmina's pattern: torch.func.grad inside torch.compile(fullgraph=True), default path."""
    torch._dynamo.reset()
    h = _channels_last_bnchw(2, 3, 4, 5, 5)
    s = _channels_last_bnchw(2, 3, 4, 5, 5)
    alpha = torch.rand(3)

    def grads(blend: object, st: object) -> object:
        def loss(h: torch.Tensor, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
            return st(blend(h, s, a, 1), s.tanh()).square().sum()

        return torch.func.grad(loss, argnums=(0, 1, 2))

    want = grads(ek.blend_reference, ek.straight_through_reference)(h, s, alpha)
    got = torch.compile(grads(ek.blend, ek.straight_through), fullgraph=True)(h, s, alpha)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ops_are_registered_custom_ops() -> None:
    for name in ("blend", "blend_backward", "grad_stats"):
        assert hasattr(torch.ops.esper, name)


def test_imports_and_traces_without_triton() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # make `import triton` fail
        import torch
        import esper_kernels as ek
        assert not ek.HAS_TRITON
        h, s = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4)
        a = torch.rand(3)
        f = torch.compile(lambda h, s, a: ek.blend(h, s, a, 1) + ek.straight_through(h, s),
                          backend="eager", fullgraph=True)
        out = f(h, s, a)
        torch.testing.assert_close(out, ek.blend_reference(h, s, a, 1) + h)
        out.sum().backward()
        st = ek.grad_stats([torch.randn(3, 5)], 1e-3, 1.0)
        assert st.norm.shape == (3, 1)
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert "Triton not available" not in proc.stderr


def test_triton_kernels_compile_for_a_real_gpu() -> None:
    """The interpreter is lenient; compile every kernel to an sm_90 cubin (no GPU needed)."""
    if not ek.HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs triton outside interpreter mode")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no nvidia backend")
    from esper_kernels import _blend, _grad_stats

    tile = {"outer": "i32", "n_env": "i32", "inner": "i32"}
    tile |= {"BLOCK_O": "constexpr", "BLOCK_I": "constexpr"}
    fwd = {"h_ptr": "*fp32", "s_ptr": "*fp32", "a_ptr": "*fp32", "out_ptr": "*fp32", **tile}
    bwd = {name: "*bf16" for name in ("g_ptr", "h_ptr", "s_ptr", "gh_ptr", "gs_ptr")}
    bwd |= {"a_ptr": "*fp32", "part_ptr": "*fp32", **tile}
    stats = {"g_ptr": "*bf16", "part_ptr": "*fp32"}
    stats |= {
        k: "i32" for k in ("m", "chunk", "layer", "stride_stat", "stride_env", "stride_layer")
    }
    stats |= {"vanishing": "fp32", "exploding": "fp32", "BLOCK": "constexpr"}
    for fn, signature, constexprs in (
        (_blend._blend_fwd_kernel, fwd, {"BLOCK_O": 1, "BLOCK_I": 1024}),
        (_blend._blend_bwd_kernel, bwd, {"BLOCK_O": 512, "BLOCK_I": 8}),
        (_grad_stats._grad_stats_kernel, stats, {"BLOCK": 1024}),
    ):
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], fn.__name__
