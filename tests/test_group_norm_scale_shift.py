"""ops.group_norm_scale_shift (ADM's AdaGN) on every backend against ddpm_fast.reference.

CPU C++ kernel: a grid of shapes (N, C, spatial, groups), every combination of the optional
weight/bias/scale/shift/SiLU, fp32/fp16/bf16, NCHW / channels-last / non-contiguous inputs and the
output's memory format, robustness to a large mean, opcheck. Triton: the same checks on small
shapes under TRITON_INTERPRET=1 (both the one-launch and the split path). CUDA and Triton on a
GPU: tests marked `cuda`. Argument errors: the public wrapper's ValueErrors and the C++ op's own
checks.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ddpm_fast
from conftest import expected_cpu_isa, run_under_cpu_isa
from ddpm_fast import ops, reference

HAS_CPU_KERNEL = bool(ddpm_fast.backends()["cpu"])
needs_cpu_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="ddpm_fast._C CPU kernels not built")

# fp32: the fused kernels and the reference round differently (the kernels fold everything into
# one a * x + b per channel). Half types: both compute in fp32 the same way (1e-5 apart) and round
# to the storage dtype, each by at most u |v| (u its unit roundoff): they may land on neighbouring
# values, so 2u |v| (one to two ulps) more.
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
TOL = {dtype: dict(atol=1e-5, rtol=1e-5 + 2 * u) for dtype, u in UNIT_ROUNDOFF.items()}


def make_inputs(shape, dtype=torch.float32, *, weight=True, bias=True, scale=True, shift=True,
                seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = torch.randn(shape, generator=g).to(dtype)
    w = torch.randn(c, generator=g) if weight else None
    b = torch.randn(c, generator=g) if bias else None
    s = 0.5 * torch.randn(n, c, generator=g) if scale else None
    t = torch.randn(n, c, generator=g) if shift else None
    move = (lambda v: v if v is None else v.to(device))
    return move(x), move(w), move(b), move(s), move(t)


def tolerance(x, num_groups, w, s, eps):
    """TOL[dtype], widened for ill-conditioned groups: an fp32 implementation rounds the group
    mean (and the values) to ~2^-24 relative, and the normalisation multiplies that by
    rstd * |weight| * |1 + scale|. For ordinary data the extra term is ~1e-6; for a group of one
    value, or of two nearly equal values, rstd approaches 1/sqrt(eps) and the reference itself is
    off by 1e-4 (the bound is an error model, not the oracle: values come from the reference)."""
    tol = dict(TOL[x.dtype])
    if x.numel():
        xd = x.double().reshape(x.shape[0], num_groups, -1)
        rstd = (xd.var(dim=-1, unbiased=False) + eps).rsqrt()
        spread = rstd * xd.abs().amax(dim=-1)
        gain = 1.0 if w is None else w.double().abs().max().item()
        mod = 1.0 if s is None else (1 + s.double()).abs().max().item()
        tol["atol"] += 4 * 2.0 ** -24 * spread.max().item() * gain * mod
    return tol


def check(y, x, num_groups, w, b, s, t, silu, eps=1e-5):
    ref = reference.group_norm_scale_shift(x, num_groups, w, b, s, t, eps, silu)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert y.stride() == torch.empty_like(x).stride(), "output must be laid out like x"
    torch.testing.assert_close(y.float(), ref.float(), **tolerance(x, num_groups, w, s, eps))


# ---- issue 17: statistics on adversarial data (the CUDA kernel here and in tests/test_simt.py) ----

def variance_error(x, y, groups, eps=1e-5):
    """Largest relative error of the group variances the kernel used, against float64 on the same
    fp32 values: with no weight/bias/scale/shift y = rstd (x - mean), so a least-squares fit of y on
    x in float64 recovers rstd (the fp32 rounding of y averages out to ~1e-9), and var = rstd^-2 - eps."""
    n = x.shape[0]
    xd, yd = x.double().reshape(n, groups, -1), y.double().reshape(n, groups, -1)
    xc, yc = xd - xd.mean(-1, keepdim=True), yd - yd.mean(-1, keepdim=True)
    rstd = (xc * yc).sum(-1) / (xc * xc).sum(-1)
    var = rstd ** -2 - eps
    ref = xd.var(-1, unbiased=False)
    return ((var - ref).abs() / ref).max().item()


def adversarial_input(case):
    """(x, num_groups): fp32 data whose statistics fp32 shifted sums get wrong (the CUDA kernel
    before issue 17, with one shift per block slice / channel and sums of squares: up to 8.5e-5
    relative variance error; see tests/test_simt.py). Cases: "outlier", "outlier_first",
    "mean_1e4", "1e6_group"."""
    g = torch.Generator().manual_seed(17)
    if case.startswith("1e6"):  # one group of 10^6 values, one outlier of 100 per channel, the
        x = torch.randn(1, 16, 250, 250, generator=g)  # first element among them
        flat = x.view(1, 16, -1)
        flat.scatter_(2, torch.randint(0, 62500, (1, 16, 1), generator=g), 100.0)
        flat[:, :, 0] = 100.0
        return x, 1
    x = torch.randn(2, 32, 32, 32, generator=g)
    flat = x.view(2, 32, -1)
    if case == "outlier":  # one value of 100 per channel in N(0, 1), at a random pixel
        flat.scatter_(2, torch.randint(0, 1024, (2, 32, 1), generator=g), 100.0)
    elif case == "outlier_first":  # ... at the first pixel: the group's (and a block's) first value
        flat[:, :, 0] = 100.0
    else:  # "mean_1e4": 1e4 + N(0, 1), ulp(1e4) = 1e-3
        x += 1e4
    return x, 8


def folded_in_half(x, num_groups, w, b, s, t, eps, silu):
    """A planted wrong kernel: the per-channel fold y = a x + c of GroupNorm, weight, bias and
    AdaGN (a = rstd w (1 + s), c = (b - mean rstd w) (1 + s) + t) with a and c rounded to x's
    half dtype before use (everything else fp32). Needs all of w, b, s, t."""
    n, c = x.shape[:2]
    xf = x.float()
    groups = xf.reshape(n, num_groups, -1)
    mean, rstd = groups.mean(-1), (groups.var(-1, unbiased=False) + eps).rsqrt()
    mean, rstd = (v.repeat_interleave(c // num_groups, dim=1) for v in (mean, rstd))
    gain = rstd * w.float() * (1 + s.float())
    offset = (b.float() - mean * rstd * w.float()) * (1 + s.float()) + t.float()
    per_channel = (n, c, *[1] * (x.dim() - 2))
    y = gain.to(x.dtype).float().reshape(per_channel) * xf + offset.to(x.dtype).float().reshape(per_channel)
    return (F.silu(y) if silu else y).to(x.dtype)


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x in memory layout `kind`: nchw, channels_last (4-D/5-D, or (N, L, C) memory for 1-D),
    permuted (dense, spatial dims transposed), strided (non-contiguous slice)."""
    if kind == "nchw":
        return x.contiguous()
    if kind == "channels_last":
        if x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if x.dim() == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if kind == "permuted":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "strided":
        return torch.cat([x, torch.zeros_like(x)], dim=-1)[..., ::2]
    raise ValueError(kind)


# ---- CPU C++ kernel -------------------------------------------------------------------------------

SPATIAL = [(1, 1), (4, 4), (9, 7), (32, 32), (64, 64), (17,)]


@needs_cpu_kernel
@pytest.mark.parametrize("spatial", SPATIAL, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("c", [32, 64, 128, 320])
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("num_groups", [1, 8, 32])
def test_cpu_shape_grid(n, c, spatial, num_groups):
    shape = (n, c, *spatial)
    if n * c * torch.Size(spatial).numel() // num_groups == 1:
        pytest.skip("F.group_norm (the reference) rejects a single value per group and batch")
    x, w, b, s, t = make_inputs(shape, seed=n * 1000 + c)
    y = ops.group_norm_scale_shift(x, num_groups, w, b, s, t, 1e-5, True, backend="cpu")
    check(y, x, num_groups, w, b, s, t, True)


OPTIONS = [dict(weight=wt, bias=bs, scale=sc, shift=sh) for wt in (False, True) for bs in (False, True)
           for sc in (False, True) for sh in (False, True)]


@needs_cpu_kernel
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "".join(k[0] if v else "-" for k, v in o.items()))
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_cpu_optional_arguments(opts, silu, kind):
    for shape, groups in (((3, 64, 8, 8), 32), ((2, 48, 5, 3), 8)):
        x, w, b, s, t = make_inputs(shape, **opts, seed=len(shape))
        x = layout(x, kind)
        y = ops.group_norm_scale_shift(x, groups, w, b, s, t, 1e-5, silu, backend="cpu")
        check(y, x, groups, w, b, s, t, silu)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["nchw", "channels_last", "permuted", "strided"])
@pytest.mark.parametrize("shape,groups", [((2, 64, 16, 16), 32), ((3, 32, 7, 9), 8), ((2, 320, 5), 32),
                                          ((1, 96, 1, 1), 8), ((2, 32, 3, 4, 5), 4), ((4, 6, 33, 2), 3)],
                         ids=str)
def test_cpu_dtypes_and_layouts(dtype, kind, shape, groups):
    x, w, b, s, t = make_inputs(shape, dtype, seed=7)
    x = layout(x, kind)
    y = ops.group_norm_scale_shift(x, groups, w, b, s, t, 1e-5, True, backend="cpu")
    check(y, x, groups, w, b, s, t, True)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_channels_last_in_channels_last_out(dtype):
    x, w, b, s, t = make_inputs((2, 64, 12, 10), dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    y = ops.group_norm_scale_shift(x, 32, w, b, s, t, 1e-5, True, backend="cpu")
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    x3 = layout(make_inputs((2, 32, 3, 4, 5), dtype)[0], "channels_last")
    y3 = ops.group_norm_scale_shift(x3, 8, backend="cpu")
    assert y3.is_contiguous(memory_format=torch.channels_last_3d) and not y3.is_contiguous()
    check(y3, x3, 8, None, None, None, None, False)


@needs_cpu_kernel
@pytest.mark.parametrize("offset,atol", [(100.0, 1e-5), (1000.0, 1e-4)])
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_cpu_large_mean_is_stable(kind, offset, atol):
    """GroupNorm ignores a constant offset: the kernel on x + offset must match the reference on x
    (computed from the exactly representable difference). Variance by E[x^2] - E[x]^2 would lose
    everything here (PyTorch's own channels-last CPU group_norm is off by 0.2 at offset 1000);
    what remains is the fp32 rounding of the mean (ulp(1000) = 6e-5, over std 4)."""
    x, w, b, s, t = make_inputs((2, 64, 24, 24), seed=3)
    shifted = layout(x * 4 + offset, kind)
    centred = shifted - offset  # exact in fp32 for these magnitudes
    y = ops.group_norm_scale_shift(shifted, 32, w, b, s, t, 1e-5, True, backend="cpu")
    ref = reference.group_norm_scale_shift(centred, 32, w, b, s, t, 1e-5, True)
    torch.testing.assert_close(y, ref, atol=atol, rtol=1e-5)


@needs_cpu_kernel
def test_cpu_extreme_values_and_eps():
    x, w, b, s, t = make_inputs((2, 32, 8, 8), seed=5)
    y = ops.group_norm_scale_shift(x, 8, 40 * w, b, s, t, 1e-5, True, backend="cpu")
    check(y, x, 8, 40 * w, b, s, t, True)  # SiLU inputs far into both tails (|y| up to ~500)
    const = torch.full((2, 32, 4, 4), 3.0)  # zero variance: the result is bias/shift only
    y = ops.group_norm_scale_shift(const, 8, w, b, s, t, 0.1, False, backend="cpu")
    check(y, const, 8, w, b, s, t, False, eps=0.1)


@needs_cpu_kernel
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_cpu_eps_enters_the_normalisation(kind):
    """Groups whose variance (~0.01) is comparable to eps = 0.1, so x / sqrt(var + eps) differs from
    x / sqrt(var) by 2x and more: a kernel ignoring eps (or using the default 1e-5) fails; the data
    are checked to tell them apart (a constant input, where eps cancels, would not)."""
    x, w, b, s, t = make_inputs((2, 32, 4, 4), seed=6)
    x = layout(3.0 + 0.1 * x, kind)
    y = ops.group_norm_scale_shift(x, 8, w, b, s, t, 0.1, True, backend="cpu")
    check(y, x, 8, w, b, s, t, True, eps=0.1)
    want = reference.group_norm_scale_shift(x, 8, w, b, s, t, 0.1, True)
    planted = reference.group_norm_scale_shift(x, 8, w, b, s, t, 1e-5, True)  # eps dropped
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        torch.testing.assert_close(planted, want, **tolerance(x, 8, w, s, 0.1))


@needs_cpu_kernel
def test_cpu_empty_and_auto_backend():
    x = torch.randn(0, 32, 4, 4)
    assert ops.group_norm_scale_shift(x, 8, backend="cpu").shape == x.shape
    x, w, b, s, t = make_inputs((2, 32, 6, 6))
    auto = ops.group_norm_scale_shift(x, 8, w, b, s, t, 1e-5, True)
    cpu = torch.ops.ddpm_fast.group_norm_scale_shift(x, 8, w, b, s, t, 1e-5, True)
    assert torch.equal(auto, cpu)
    torch_backend = ops.group_norm_scale_shift(x, 8, w, b, s, t, 1e-5, True, backend="torch")
    assert torch.equal(torch_backend, reference.group_norm_scale_shift(x, 8, w, b, s, t, 1e-5, True))


@needs_cpu_kernel
@pytest.mark.parametrize("case", ["nchw_fp32", "channels_last_fp16", "no_params_bf16"])
def test_cpu_opcheck(case):
    x, w, b, s, t = make_inputs((2, 32, 5, 6), seed=11)
    if case == "channels_last_fp16":
        x = x.half().contiguous(memory_format=torch.channels_last)
    if case == "no_params_bf16":
        x, w, b, s, t = x.bfloat16(), None, None, None, None
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_scale_shift.default,
                          (x, 8, w, b, s, t, 1e-5, True))


@needs_cpu_kernel
def test_cpu_under_torch_compile():
    x, w, b, s, t = make_inputs((2, 32, 6, 6))

    def f(x):
        return torch.ops.ddpm_fast.group_norm_scale_shift(x, 8, w, b, s, t, 1e-5, True) * 2

    expected = 2 * reference.group_norm_scale_shift(x, 8, w, b, s, t, 1e-5, True)
    for backend in ("aot_eager", "inductor"):
        y = torch.compile(f, backend=backend, fullgraph=True)(x)
        torch.testing.assert_close(y, expected, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,groups", [((2, 64, 16, 16), 32), ((3, 32, 7, 9), 8)], ids=str)
def test_half_precision_bound_rejects_a_fold_in_half(dtype, shape, groups):
    """The half-precision bound (2u |v| + 1e-5) on the data of the dtype tests rejects a kernel
    that keeps its folded per-channel coefficients in the half dtype (>1000 ulps off; the former
    bound of 4e-3 (fp16) / 2e-2 + 3e-2 (bf16) admitted it)."""
    x, w, b, s, t = make_inputs(shape, dtype, seed=7)
    want = reference.group_norm_scale_shift(x, groups, w, b, s, t, 1e-5, True)
    with pytest.raises(AssertionError, match="not close"):
        torch.testing.assert_close(folded_in_half(x, groups, w, b, s, t, 1e-5, True).float(), want.float(),
                                   **tolerance(x, groups, w, s, 1e-5))


# ---- argument errors ------------------------------------------------------------------------------

def _call(**overrides):
    x, w, b, s, t = make_inputs((2, 32, 4, 4))
    args = dict(x=x, num_groups=8, weight=w, bias=b, scale=s, shift=t, eps=1e-5, silu=True)
    args.update(overrides)
    return ops.group_norm_scale_shift(**args)


@pytest.mark.parametrize("overrides,exc,match", [
    (dict(num_groups=5), ValueError, r"num_groups=5 must divide .* C=32"),
    (dict(num_groups=0), ValueError, r"num_groups must be a positive int"),
    (dict(weight=torch.ones(16)), ValueError, r"weight must have shape \(32,\)"),
    (dict(bias=torch.ones(2, 32)), ValueError, r"bias must have shape \(32,\)"),
    (dict(scale=torch.ones(32)), ValueError, r"scale must have shape \(2, 32\)"),
    (dict(shift=torch.ones(3, 32)), ValueError, r"shift must have shape \(2, 32\)"),
    (dict(x=torch.ones(2, 32, 4, 4, dtype=torch.int64)), ValueError, r"x must have dtype in"),
    (dict(x=torch.ones(2, 32, 4, 4, dtype=torch.float64)), ValueError, r"x must have dtype in"),
    (dict(weight=torch.ones(32, dtype=torch.int32)), ValueError, r"weight must have dtype in"),
    (dict(x=torch.ones(32)), ValueError, r"x must have shape \(N, C, \*spatial\)"),
    (dict(weight=torch.ones(32, device="meta")), ValueError, r"weight is on meta but x is on cpu"),
    (dict(scale=torch.ones(2, 32, device="meta")), ValueError, r"scale is on meta but x is on cpu"),
    (dict(eps=0.0), ValueError, r"eps must be > 0"),
    (dict(eps=-1e-5), ValueError, r"eps must be > 0"),
    (dict(x=[1.0, 2.0]), TypeError, r"x must be a torch.Tensor"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_wrapper_errors(overrides, exc, match):
    with pytest.raises(exc, match=match):
        _call(**overrides)


@needs_cpu_kernel
@pytest.mark.parametrize("args,match", [
    (lambda x, w, s: (x, 5, w, None, s, None, 1e-5, True), r"num_groups=5 must divide C=32"),
    (lambda x, w, s: (x, 8, w[:16], None, s, None, 1e-5, True), r"weight must have shape \[32\]"),
    (lambda x, w, s: (x, 8, w, None, s[:, :16], None, 1e-5, True), r"scale must have shape \[2, 32\]"),
    (lambda x, w, s: (x, 8, w, None, None, s.T, 1e-5, True), r"shift must have shape \[2, 32\]"),
    (lambda x, w, s: (x.double(), 8, w, None, s, None, 1e-5, True), r"x must be float32, float16 or bfloat16"),
    (lambda x, w, s: (x, 8, w, None, s, None, 0.0, True), r"eps must be > 0"),
])
def test_cpp_op_errors(args, match):
    """Direct calls of torch.ops.ddpm_fast.group_norm_scale_shift get the kernel's own checks."""
    x, w, _, s, _ = make_inputs((2, 32, 4, 4))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.ddpm_fast.group_norm_scale_shift(*args(x, w, s))


def test_backend_errors():
    x, w, b, s, t = make_inputs((2, 32, 4, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.group_norm_scale_shift(x, 8, backend="fast")
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors"):
        ops.group_norm_scale_shift(x, 8, backend="cuda")


# ---- Triton (interpreter on the CPU, or a GPU) ------------------------------------------------------

def _triton_or_skip():
    status = ddpm_fast.backends()["triton"]
    if not status:
        pytest.skip(f"triton backend unavailable: {status.reason}")
    from ddpm_fast.kernels import group_norm_scale_shift as kernel
    return kernel


TRITON_CASES = [
    # (shape, groups): one-launch path (padded group tile <= 4096) and the two-kernel path
    ((2, 32, 4, 4), 4),
    ((2, 32, 1, 1), 8),
    ((1, 48, 5, 3), 4),
    ((1, 32, 17), 4),
    ((2, 32, 40, 40), 1),
    ((1, 64, 33, 20), 2),
]


@pytest.mark.parametrize("split", [False, True], ids=["few_programs", "split_groups"])
@pytest.mark.parametrize("kind", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape,groups", TRITON_CASES, ids=str)
def test_triton_matches_reference(shape, groups, kind, split, monkeypatch, triton_device):
    kernel = _triton_or_skip()
    if split:  # force several programs per group (on the interpreter there is normally one)
        monkeypatch.setattr(kernel, "_target_programs", lambda device: 64)
    x, w, b, s, t = make_inputs(shape, seed=sum(shape), device=triton_device)
    x = layout(x, kind)
    y = ops.group_norm_scale_shift(x, groups, w, b, s, t, 1e-5, True, backend="triton")
    check(y, x, groups, w, b, s, t, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[6], OPTIONS[9], OPTIONS[-1]],
                         ids=lambda o: "".join(k[0] if v else "-" for k, v in o.items()))
def test_triton_dtypes_and_options(dtype, opts, triton_device):
    _triton_or_skip()
    for (shape, groups), silu in ((((1, 32, 6, 6), 4), True), (((1, 16, 40, 40), 2), False)):
        x, w, b, s, t = make_inputs(shape, dtype, **opts, seed=2, device=triton_device)
        y = ops.group_norm_scale_shift(x, groups, w, b, s, t, 1e-5, silu, backend="triton")
        check(y, x, groups, w, b, s, t, silu)


def test_triton_opcheck_and_compile(triton_device):
    kernel = _triton_or_skip()
    x, w, b, s, t = make_inputs((2, 32, 5, 6), device=triton_device)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_scale_shift_triton.default,
                          (x, 8, w, None, s, None, 1e-5, True))

    def f(x):
        return kernel.group_norm_scale_shift(x, 8, w, None, s, None, 1e-5, True) + 1

    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(y, reference.group_norm_scale_shift(x, 8, w, None, s, None, 1e-5, True) + 1,
                               **TOL[torch.float32])


# ---- CUDA GPU (skipped without one) -----------------------------------------------------------------

GPU_CASES = [((1, 32, 1, 1), 8), ((3, 64, 7, 9), 32), ((8, 128, 32, 32), 32), ((2, 320, 64, 64), 32),
             ((4, 256, 16, 16), 1), ((2, 64, 17), 8), ((2, 32, 3, 4, 5), 4), ((2, 6, 31, 33), 3)]


def _gpu_backend_or_skip(backend):
    status = ddpm_fast.backends()[backend]
    if not status:
        pytest.skip(f"{backend} backend unavailable: {status.reason}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape,groups", GPU_CASES, ids=str)
def test_gpu_matches_reference(backend, dtype, kind, shape, groups):
    _gpu_backend_or_skip(backend)
    x, w, b, s, t = make_inputs(shape, dtype, device="cuda", seed=sum(shape))
    x = layout(x, kind)
    y = ops.group_norm_scale_shift(x, groups, w, b, s, t, 1e-5, True, backend=backend)
    check(y, x, groups, w, b, s, t, True)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "".join(k[0] if v else "-" for k, v in o.items()))
def test_gpu_optional_arguments(backend, opts):
    _gpu_backend_or_skip(backend)
    x, w, b, s, t = make_inputs((3, 64, 8, 8), **opts, device="cuda")
    for silu in (False, True):
        y = ops.group_norm_scale_shift(x, 32, w, b, s, t, 1e-5, silu, backend=backend)
        check(y, x, 32, w, b, s, t, silu)


@pytest.mark.cuda
def test_gpu_large_mean_and_unaligned():
    _gpu_backend_or_skip("cuda")
    x, w, b, s, t = make_inputs((2, 64, 24, 24), device="cuda", seed=3)
    shifted = x * 4 + 100
    ref = reference.group_norm_scale_shift(shifted - 100, 32, w, b, s, t, 1e-5, True)
    for backend in ("cuda", "triton"):
        if ddpm_fast.backends()[backend]:
            y = ops.group_norm_scale_shift(shifted, 32, w, b, s, t, 1e-5, True, backend=backend)
            torch.testing.assert_close(y, ref, atol=2e-5, rtol=2e-5)
    # a view starting one element in: not 16-byte aligned, so the scalar (kVec = 1) kernels run
    xh = torch.randn(2 * 32 * 8 * 8 + 1, device="cuda", dtype=torch.float16)[1:].view(2, 32, 8, 8)
    y = ops.group_norm_scale_shift(xh, 8, backend="cuda")
    check(y, xh, 8, None, None, None, None, False)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", ["outlier", "outlier_first", "mean_1e4", "1e6_group"])
def test_gpu_statistics_adversarial_fp32(case, kind):
    """Issue 17: the CUDA kernel's group variance within 1e-6 relative of float64 on adversarial
    fp32 data, and its output within 1e-5 of the float64 normalisation (the SIMT harness runs the
    same check on the CPU: tests/test_simt.py)."""
    _gpu_backend_or_skip("cuda")
    x, groups = adversarial_input(case)
    x = layout(x.cuda(), kind)
    y = ops.group_norm_scale_shift(x, groups, eps=1e-5, backend="cuda")
    assert variance_error(x, y, groups) < 1e-6
    xd = x.double().reshape(x.shape[0], groups, -1)
    exact = (xd - xd.mean(-1, keepdim=True)) / (xd.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    # 1e4 + N(0, 1): an fp32 mean is 5e-4 off (ulp(1e4) / 2), whatever the algorithm: tolerance()'s bound
    tol = tolerance(x, groups, None, None, 1e-5) if case == "mean_1e4" else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.double(), exact.reshape(x.shape), **tol)


@pytest.mark.cuda
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_gpu_adagn_chunk_views_read_in_place(kind, dtype, param_dtype):
    """AdaGN's scale, shift = emb_out.chunk(2, 1) (row stride 2C) and strided weight/bias in any
    float dtype: the CUDA op reads them where they lie, so one call is exactly its three kernels
    (moments, coefficients, apply) with no copy kernels."""
    _gpu_backend_or_skip("cuda")
    x, _, _, _, _ = make_inputs((4, 64, 12, 12), dtype, seed=11, device="cuda")
    x = layout(x, kind)
    g = torch.Generator().manual_seed(12)
    scale, shift = (0.5 * torch.randn(4, 128, generator=g)).to("cuda", param_dtype).chunk(2, 1)
    affine = torch.randn(2, 128, generator=g).to("cuda", param_dtype)
    w, b = affine[0, ::2], affine[1, 1::2]
    y = ops.group_norm_scale_shift(x, 32, w, b, scale, shift, 1e-5, True, backend="cuda")
    check(y, x, 32, w, b, scale, shift, True)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.group_norm_scale_shift(x, 32, w, b, scale, shift, 1e-5, True, backend="cuda")
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "Memcpy" not in e.name and "Memset" not in e.name]
    assert len(kernels) == 3, kernels
    assert all(any(k in name for k in ("moments_", "coefficients_kernel", "apply_kernel")) for name in kernels), kernels


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_gpu_batch_beyond_grid_axis_limit(kind):
    """N = 70000 > 65535 (the y/z grid limit): samples and groups lie on grid axis x."""
    _gpu_backend_or_skip("cuda")
    x, w, b, s, t = make_inputs((70000, 32, 2, 2), torch.float16, seed=13, device="cuda")
    x = layout(x, kind)
    y = ops.group_norm_scale_shift(x, 8, w, b, s, t, 1e-5, True, backend="cuda")
    check(y, x, 8, w, b, s, t, True)


@pytest.mark.cuda
def test_gpu_cuda_graph_capture():
    _gpu_backend_or_skip("cuda")
    x, w, b, s, t = make_inputs((4, 128, 16, 16), torch.float16, device="cuda")
    for backend in ("cuda", "triton"):
        if not ddpm_fast.backends()[backend]:
            continue
        ops.group_norm_scale_shift(x, 32, w, b, s, t, 1e-5, True, backend=backend)  # warm up / compile
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ops.group_norm_scale_shift(x, 32, w, b, s, t, 1e-5, True, backend=backend)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        check(y, x, 32, w, b, s, t, True)


@pytest.mark.cuda
def test_gpu_opcheck_cuda_op():
    _gpu_backend_or_skip("cuda")
    x, w, b, s, t = make_inputs((2, 32, 5, 6), torch.float16, device="cuda")
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_scale_shift.default,
                          (x.contiguous(memory_format=torch.channels_last), 8, w, b, s, t, 1e-5, True))


@needs_cpu_kernel
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", ["outlier", "outlier_first", "mean_1e4", "1e6_group"])
def test_cpu_statistics_adversarial_fp32(case, kind):
    """Issue 17: the CPU kernel's group variance within 1e-6 relative of float64 (its shifted sums
    were shifted by the first value: 3.9e-5 / 3.8e-5 (nchw / channels-last) with an outlier there,
    1.4e-5 for the channels-last 1e6-element group; now summed again about the mean when that value
    lies over two standard deviations from it)."""
    x, groups = adversarial_input(case)
    x = layout(x, kind)
    y = ops.group_norm_scale_shift(x, groups, eps=1e-5, backend="cpu")
    assert variance_error(x, y, groups) < 1e-6


@needs_cpu_kernel
def test_cpu_isa_is_the_widest_this_cpu_has():
    """ddpm_fast._C.cpu_isa(), the variant the kernels run, against /proc/cpuinfo's flags."""
    import os

    from ddpm_fast._registry import extension

    expected = expected_cpu_isa(os.environ.get("DDPM_FAST_CPU_ISA"))
    if expected is None:
        pytest.skip("not an x86-64 Linux machine: no /proc/cpuinfo flags to compare with")
    assert extension()[0].cpu_isa() == expected


@needs_cpu_kernel
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_cpu_capped_instruction_sets(isa):
    """The kernel variants this machine would not pick by itself (the AVX-512 SiLU apply is the
    default where the CPU has it): DDPM_FAST_CPU_ISA=avx2 runs the AVX2 apply, =baseline the
    composite ATen path; both against the reference, with SiLU, lengths that are not a multiple
    of the vector width, both layouts and extreme values."""
    run_under_cpu_isa(isa, """
        import torch
        from test_group_norm_scale_shift import make_inputs, check, layout
        import ddpm_fast._C
        from ddpm_fast import ops
        for shape, groups in (((3, 64, 7, 9), 8), ((2, 40, 5, 3), 8), ((2, 320, 8, 8), 32)):
            for kind in ("nchw", "channels_last"):
                for silu in (False, True):
                    x, w, b, s, t = make_inputs(shape, seed=3)
                    x = layout(x, kind)
                    y = ops.group_norm_scale_shift(x, groups, w, b, s, t, silu=silu, backend="cpu")
                    check(y, x, groups, w, b, s, t, silu)
        x = torch.tensor([[[-1e4, -100.0, -5.0, 0.0, 5.0, 100.0, 1e4, 3.0, 2.0, 1.0, 0.5, -0.5, 7.0, -7.0,
                            20.0, -20.0, 9.0]]]).reshape(1, 1, 17)
        y = ops.group_norm_scale_shift(x, 1, silu=True, backend="cpu")
        check(y, x, 1, None, None, None, None, True)
    """)
