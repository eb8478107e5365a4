"""The backward of ops.diffusion_step (issue 20) on every backend against the autograd of
reference.diffusion_step (the definition), computed in float64.

Coverage: torch.autograd.gradcheck of the reference (the oracle) in float64 over every method x
variance x prediction x projection; the C++ CPU backward over the full option cross-product (the
forward tests' grid x clip_denoised x noise mode x clip x guidance x eps_from_x0) with given noise,
and a strength-2 covering set of every option with the noise source (given, drawn from seed/step,
none) and which outputs carry a gradient; Triton (the interpreter without a GPU) over the covering
set and past one program of each kernel; the CUDA C++ backward under the SIMT harness (tests/simt)
over the covering set, several blocks per sample and chunked batches; fp16 / bf16 storage; the
clamps' subgradient at equality; torch.library.opcheck with the autograd registration; the public
wrapper's choice of the fused path; the CUDA and GPU Triton backward in the tests marked `cuda`.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import os
import random
from pathlib import Path

import pytest
import torch
from conftest import device_of, expected_cpu_isa, run_under_cpu_isa
from test_diffusion_step import STEP_GRID, grid_id, kernel_backends, make_case

from ddpm_fast import backends, ops, philox, reference
from ddpm_fast.step_layout import (DDIM_DIR, DDIM_SIGMA, METHODS, NOISE_MODES, NONZERO, NUM_COEFS, PREDICTIONS,
                                   PROJECTIONS, SQRT_AB_PREV, SQRT_RECIPM1_AB, VARIANCES, code)

CPU_KERNEL = backends()["cpu"].available
TRITON = backends()["triton"].available
needs_cpu_kernel = pytest.mark.skipif(not CPU_KERNEL, reason="ddpm_fast._C is not built")
needs_triton = pytest.mark.skipif(not TRITON, reason="triton unavailable (no GPU and no TRITON_INTERPRET=1)")

NOISE_SOURCES = ("given", "drawn", "none")
OUTPUTS = ("both", "x_prev", "x0")   # which outputs carry an incoming gradient
STEP_ID = 5                           # the step id of drawn noise
SEEDS = (11, -3, 1 << 40, 7)


# ---- the oracle and the comparison -----------------------------------------------------------------
class Float64(torch.overrides.TorchFunctionMode):
    """Evaluates the reference's formulas in float64: inside, .float() keeps a float64 tensor
    float64 (reference.diffusion_step computes in float32 whatever its inputs; gradcheck and the
    oracle want the same formulas without float32 rounding)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.float and args[0].dtype == torch.float64:
            return args[0]
        return func(*args, **(kwargs or {}))


def step_inputs(case, opts, device):
    """(args, kwargs) of ops.diffusion_step for the option dict `opts` (the step's keyword options
    plus guided, noise, outputs)."""
    kw = {k: v for k, v in opts.items() if k not in ("guided", "noise", "outputs")}
    kw["guidance_grad"] = case["grad"] if opts.get("guided") else None
    source = opts.get("noise", "given")
    if source == "given":
        kw["noise"] = case["noise"]
    elif source == "drawn":
        kw["seed"] = torch.tensor(SEEDS[:case["x"].shape[0]], device=device)
        kw["step"] = STEP_ID
    return kw


def reference_forward(case, opts, leaves=None):
    """reference.diffusion_step in float64 (Float64) on the case's inputs, or on `leaves` (x,
    model_output[, guidance_grad]) when given; the noise per opts (drawn: ddpm_fast.philox)."""
    kw = step_inputs(case, opts, case["x"].device)
    guide = kw.pop("guidance_grad")
    if leaves is None:
        leaves = [case["x"].double(), case["model_output"].double()] + ([guide.double()] if guide is not None else [])
    if "seed" in kw:
        noise = philox.philox_normal(kw.pop("seed"), kw.pop("step"), case["x"].shape[1:])
    else:
        noise = kw.pop("noise", None)
    with Float64():
        return reference.diffusion_step(leaves[0], leaves[1], case["coef"].double(),
                                        None if noise is None else noise.double(),
                                        guidance_grad=leaves[2] if guide is not None else None, **kw)


# The clamps' masks are discontinuous: where a clamp's input lies within DELTA (relative) of a
# bound, fp32 kernels and the float64 oracle may fall on different sides. The tests keep such
# elements out of the comparison (incoming gradient 0 under the x_t clip; `ambiguous` elements
# of x0 under clip_denoised); test_backward_clamp_subgradient_at_equality checks the bounds exactly.
DELTA = 1e-5


def near(v, bound):
    return (v - bound).abs() <= DELTA * (1 + v.abs())


def incoming(case, opts, exact=False):
    """The incoming gradients (of x_prev, of pred_x0), None for an output without one; the
    gradient of x_prev is 0 where x_t's clip input is near a bound (unless `exact`)."""
    gen = torch.Generator().manual_seed(123)
    x = case["x"]
    gy = torch.randn(x.shape, generator=gen).to(x)
    gx0 = torch.randn(x.shape, generator=gen).to(x)
    outputs = opts.get("outputs", "both")
    clip = opts.get("clip")
    if clip is not None and not exact:
        before_clip = reference_forward(case, {**opts, "clip": None})[0]
        gy = torch.where(near(before_clip, clip[0]) | near(before_clip, clip[1]), 0.0, gy).to(x.dtype)
    return (gy if outputs != "x0" else None), (gx0 if outputs != "x_prev" else None)


def ambiguous(case, opts):
    """Elements whose predicted x0 lies near +-1 under clip_denoised (bool, shaped like x)."""
    if not opts.get("clip_denoised", True):
        return torch.zeros(case["x"].shape, dtype=torch.bool, device=case["x"].device)
    c = case["x"].shape[1]
    with Float64():
        x0_raw = reference.predicted_x0(case["x"].double(), case["model_output"][:, :c].double(),
                                        case["coef"].double(), opts.get("prediction", "epsilon"))
    return near(x0_raw, -1.0) | near(x0_raw, 1.0)


def loss_of(outs, grads):
    return sum((o.float() * g.float()).sum() for o, g in zip(outs, grads) if g is not None)


def reference_grads(case, opts, exact=False):
    """float64 gradients of (x, model_output, guidance_grad or None) of the reference step, from
    the same (storage-dtype) inputs and incoming gradients."""
    guided = opts.get("guided", False)
    names = ["x", "model_output"] + (["grad"] if guided else [])
    leaves = [case[n].double().requires_grad_() for n in names]
    outs = reference_forward(case, opts, leaves)
    grads = torch.autograd.grad(loss_of(outs, incoming(case, opts, exact)), leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return grads + ([] if guided else [None])


def fused_grads(case, opts, backend, exact=False):
    """Gradients of (x, model_output, guidance_grad or None) through ops.diffusion_step on
    `backend` (its fused backward: asserted by the grad_fn)."""
    device = case["x"].device
    kw = step_inputs(case, opts, device)
    x = case["x"].clone().requires_grad_()
    mo = case["model_output"].clone().requires_grad_()
    guide = kw.pop("guidance_grad")
    if guide is not None:
        guide = guide.clone().requires_grad_()
    outs = ops.diffusion_step(x, mo, case["coef"], guidance_grad=guide, backend=backend, **kw)
    assert "GeneratedBackwardFor_ddpm_fast" in type(outs[0].grad_fn).__name__, type(outs[0].grad_fn)
    leaves = [x, mo] + ([guide] if guide is not None else [])
    grads = torch.autograd.grad(loss_of(outs, incoming(case, opts, exact)), leaves)
    return list(grads) + ([None] if guide is None else [])


# Unit roundoff of each storage dtype: a gradient returned in fp16 / bf16 is rounded once more.
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def assert_grads_close(got, want, rtol=1e-4, what="", ignore=None, scale=1.0):
    """|got - want| <= rtol (scale + |want|) + 2u |want| elementwise for each gradient (u: the
    unit roundoff of got's dtype; want is float64), except at the elements `ignore` (bool like x;
    every channel block of model_output); scale: 1 or a tensor like x. Both sides compute from the
    same inputs, the kernels in fp32: 1e-4 covers fp32 rounding relative to the step's
    coefficients (up to ~160 for the noisiest steps of the test schedule)."""
    def like(t, w):  # an x-shaped tensor repeated over model_output's channel blocks
        return t.repeat(1, w.shape[1] // t.shape[1], *([1] * (w.dim() - 2))) if isinstance(t, torch.Tensor) else t

    for name, g, w in zip(("x", "model_output", "guidance_grad"), got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.shape == w.shape, (what, name, g.shape, w.shape)
        err = (g.double() - w).abs()
        if ignore is not None:
            err = err.masked_fill(like(ignore, w), 0.0)
        bound = rtol * (like(scale, w) + w.abs()) + 2 * UNIT_ROUNDOFF[g.dtype] * w.abs()
        worst = (err / bound).max().item() if err.numel() else 0.0
        assert worst <= 1.0, (f"{what} grad {name}: error {err.max().item():.3g} is {worst:.3g} x the bound "
                              f"{rtol:g} (1 + |want|) + 2u |want|")


def error_scale(case, opts):
    """1, or with a projection the group's factor f = R / L where above 1 (shaped like x): the
    projection's gradient f (gout - u (u . gout)) cancels terms of size f |gout|, whose fp32
    rounding any implementation carries."""
    projection = opts.get("project_noise")
    if projection is None:
        return 1.0
    plain_opts = {**opts, "clip": None}
    x_new, x0 = reference_forward(case, {**plain_opts, "project_noise": None})
    projected, _ = reference_forward(case, plain_opts)
    dims = (1,) if projection == "pixel" else tuple(range(1, x0.dim()))
    length = torch.linalg.vector_norm(x_new - x0, dim=dims, keepdim=True)
    factor = torch.linalg.vector_norm(projected - x0, dim=dims, keepdim=True) / length.clamp_min(1e-30)
    return factor.clamp_min(1.0).expand_as(x0)


def check(got, case, opts, what):
    """The fused gradients `got` against the oracle's for (case, opts) (assert_grads_close),
    elements with an ambiguous x0 clamp left out, the error scale of a projection's factor."""
    assert_grads_close(got, reference_grads(case, opts), what=what, ignore=ambiguous(case, opts),
                       scale=error_scale(case, opts))


# ---- option sets ------------------------------------------------------------------------------------
FACTORS = dict(method=METHODS, variance=VARIANCES, prediction=PREDICTIONS, project_noise=PROJECTIONS,
               clip_denoised=(True, False), noise_mode=NOISE_MODES, clip=(None, (-1.1, 1.05)),
               guided=(False, True), eps_from_x0=(True, False), noise=NOISE_SOURCES, outputs=OUTPUTS)


def covering_set(factors=FACTORS, strength=2, seed=0, candidates=40):
    """A covering array of `factors` of the given strength (every combination of values of every
    `strength` factors in some row), built greedily (AETG) with a fixed seed: deterministic."""
    names = list(factors)
    sizes = [len(factors[n]) for n in names]
    tuples = list(itertools.combinations(range(len(names)), strength))
    uncovered = {(t, vals) for t in tuples for vals in itertools.product(*(range(sizes[i]) for i in t))}
    rng = random.Random(seed)
    rows = []
    while uncovered:
        start, start_vals = min(uncovered)  # each row covers an uncovered combination: progress guaranteed
        best, best_gain = None, -1
        for _ in range(candidates):
            row = [rng.randrange(size) for size in sizes]
            for i, v in zip(start, start_vals):
                row[i] = v
            gain = sum((t, tuple(row[i] for i in t)) in uncovered for t in tuples)
            if gain > best_gain:
                best, best_gain = row, gain
        uncovered -= {(t, tuple(best[i] for i in t)) for t in tuples}
        rows.append({n: factors[n][v] for n, v in zip(names, best)})
    return rows


COVERING = covering_set()
COVERING3 = covering_set(strength=3)


@pytest.mark.parametrize("rows,strength", [(COVERING, 2), (COVERING3, 3)], ids=["pairs", "triples"])
def test_covering_sets_cover_every_combination(rows, strength):
    for names in itertools.combinations(FACTORS, strength):
        seen = {tuple(repr(r[n]) for n in names) for r in rows}
        assert len(seen) == math.prod(len(FACTORS[n]) for n in names), names
    assert len(rows) < (40 if strength == 2 else 150), len(rows)


def opts_id(opts):
    return "-".join(str(v) for v in opts.values()).replace(" ", "")


# ---- (a) the oracle: gradcheck of the reference in float64 -----------------------------------------
GRADCHECK_ROTATION = [
    dict(clip_denoised=True, noise_mode="normal", clip=None, guided=True, eps_from_x0=True),
    dict(clip_denoised=False, noise_mode="squared", clip=(-1.5, 1.4), guided=False, eps_from_x0=False),
    dict(clip_denoised=True, noise_mode="zero", clip=(-2.0, 2.0), guided=True, eps_from_x0=False),
]


@pytest.mark.parametrize("method,variance,prediction,project_noise", STEP_GRID, ids=map(grid_id, STEP_GRID))
def test_reference_gradcheck(method, variance, prediction, project_noise):
    """The reference's autograd (every backend's oracle) against finite differences, float64."""
    case = make_case(batch=2, channels=2, spatial=(3,), variance=variance, seed=STEP_GRID.index(
        (method, variance, prediction, project_noise)), dtype=torch.float64)
    coef, noise = case["coef"].double(), case["noise"]
    opts = GRADCHECK_ROTATION[STEP_GRID.index((method, variance, prediction, project_noise)) % 3]
    guided = opts["guided"]

    def f(x, mo, *guide):
        kw = {k: v for k, v in opts.items() if k != "guided"}
        return reference.diffusion_step(x, mo, coef, noise, method=method, variance=variance, prediction=prediction,
                                        project_noise=project_noise, guidance_grad=guide[0] if guide else None,
                                        **kw)

    leaves = [case["x"].requires_grad_(), case["model_output"].requires_grad_()]
    if guided:
        leaves.append(case["grad"].requires_grad_())
    with Float64():
        assert f(*leaves)[0].dtype == torch.float64
        assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_reference_clamp_subgradient_is_zero_at_equality():
    """The convention every kernel matches: torch.clamp's gradient passes strictly inside the
    bounds only (0 where the value equals a bound: x0 = +-1 under clip_denoised, x_new = lo / hi
    under clip; 0 for NaN)."""
    x = torch.tensor([-1.0, 1.0, 1.5, 0.25, -0.999, float("nan")], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(x.clamp(-1.0, 1.0).sum(), x)
    assert g.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]


# ---- (b) the C++ CPU backward --------------------------------------------------------------------------
# the other options of each step grid point, rotated (every value of each option occurs)
ROTATION = [
    dict(clip_denoised=True, noise_mode="normal", clip=None, guided=False, eps_from_x0=True, noise="drawn"),
    dict(clip_denoised=False, noise_mode="squared", clip=(-1.1, 1.05), guided=True, eps_from_x0=False,
         noise="given"),
    dict(clip_denoised=True, noise_mode="zero", clip=(-1.1, 1.05), guided=True, eps_from_x0=True, noise="given",
         outputs="x_prev"),
    dict(clip_denoised=True, noise_mode="normal", clip=(-1.1, 1.05), guided=False, eps_from_x0=False,
         noise="none", outputs="x0"),
]


@needs_cpu_kernel
@pytest.mark.parametrize("method,variance,prediction,project_noise", STEP_GRID, ids=map(grid_id, STEP_GRID))
def test_cpu_backward_step_grid(method, variance, prediction, project_noise):
    """Every method x variance x prediction x projection, the other options rotated."""
    case = make_case(variance=variance, seed=STEP_GRID.index((method, variance, prediction, None)))
    for options in ROTATION:
        opts = dict(method=method, variance=variance, prediction=prediction, project_noise=project_noise, **options)
        check(fused_grads(case, opts, "cpu"), case, opts, opts)


@needs_cpu_kernel
def test_cpu_backward_strength_3_covering_set():
    """Every combination of values of any three options (noise source and the outputs carrying a
    gradient included)."""
    for i, opts in enumerate(COVERING3):
        case = make_case(variance=opts["variance"], seed=100 + i)
        check(fused_grads(case, opts, "cpu"), case, opts, opts)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("opts", COVERING, ids=opts_id)
def test_backward_covering_set(backend, opts):
    """Every backend over the covering set: noise given / drawn in-kernel (the backward redraws
    it) / none, and either output alone carrying a gradient."""
    case = make_case(batch=3, variance=opts["variance"], seed=COVERING.index(opts), device=device_of(backend))
    check(fused_grads(case, opts, backend), case, opts, (backend, opts))


@needs_cpu_kernel
@pytest.mark.parametrize("spatial", [(8, 8), (3, 5), (1, 1), (33,), (70, 70)], ids=str)
@pytest.mark.parametrize("project_noise", PROJECTIONS)
def test_cpu_backward_shapes_and_chunk_boundaries(spatial, project_noise):
    """Vector tails, pixel blocks, 1-D samples and samples past one work chunk / pixel block."""
    case = make_case(batch=2, channels=3, spatial=spatial, variance="learned_range", seed=3)
    for method, noise in (("ddpm", "drawn"), ("ddim", "given")):
        opts = dict(method=method, variance="learned_range", project_noise=project_noise, clip=(-1.0, 1.0),
                    guided=True, noise=noise)
        check(fused_grads(case, opts, "cpu"), case, opts, (spatial, opts))


@needs_cpu_kernel
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_cpu_backward_instruction_set_variants(isa):
    """The AVX2 and baseline builds of the CPU backward (the kernel picks its variant once per
    process: a compact cross-check in a fresh one; the default's variant runs in this process)."""
    if expected_cpu_isa(isa) is not None and expected_cpu_isa(isa) == expected_cpu_isa():
        pytest.skip(f"{isa} is this machine's default: the other tests run it")
    run_under_cpu_isa(isa, """
        import ddpm_fast._C
        import test_diffusion_step_backward as t
        for opts in t.COVERING:
            t.test_backward_covering_set("cpu", opts)
        t.test_cpu_backward_shapes_and_chunk_boundaries((33,), "pixel")
    """)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("project_noise", PROJECTIONS)
def test_backward_low_precision_storage(backend, dtype, project_noise):
    """fp16 / bf16 tensors: fp32 arithmetic, gradients returned in each input's dtype."""
    case = make_case(batch=2, variance="learned_range", dtype=dtype, seed=11, device=device_of(backend))
    for method, noise in (("ddpm", "given"), ("ddim", "drawn")):
        opts = dict(method=method, variance="learned_range", project_noise=project_noise, guided=True,
                    clip_denoised=False, noise=noise)
        got = fused_grads(case, opts, backend)
        assert all(g.dtype == dtype for g in got)
        check(got, case, opts, (backend, dtype, opts))


@pytest.mark.parametrize("backend", kernel_backends())
def test_backward_model_output_dtype_may_differ_from_x(backend):
    case = make_case(batch=2, variance="learned", seed=12, device=device_of(backend))
    case["model_output"] = case["model_output"].to(torch.bfloat16)
    case["grad"] = case["grad"].to(torch.float16)
    opts = dict(method="ddpm", variance="learned", guided=True, project_noise="sample")
    got = fused_grads(case, opts, backend)
    assert [g.dtype for g in got] == [torch.float32, torch.bfloat16, torch.float16]
    check(got, case, opts, backend)


def boundary_case(device="cpu"):
    """DDIM predicting x0 with x_det = x0 = clamp(pred) and no noise: pred entries exactly at the
    clamps' bounds (x0 at +-1 under clip_denoised, x_new at the clip's bounds +-0.5)."""
    pred = torch.tensor([[[-1.0, 1.0, 0.5, -0.5, 1.25, -2.0, 0.75, 0.0]]], device=device)
    coef = torch.zeros(1, NUM_COEFS, device=device)
    coef[:, SQRT_RECIPM1_AB] = 1.0
    coef[:, SQRT_AB_PREV] = 1.0
    coef[:, DDIM_DIR] = 0.0
    coef[:, DDIM_SIGMA] = 0.0
    coef[:, NONZERO] = 1.0
    return dict(x=torch.zeros_like(pred), model_output=pred, coef=coef, noise=torch.zeros_like(pred),
                grad=torch.zeros_like(pred))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("clip", [None, (-0.5, 0.5)])
def test_backward_clamp_subgradient_at_equality(backend, clip):
    case = boundary_case(device_of(backend))
    opts = dict(method="ddim", prediction="x0", clip_denoised=True, clip=clip, noise="none", outputs="x_prev")
    got, want = fused_grads(case, opts, backend, exact=True), reference_grads(case, opts, exact=True)
    assert torch.equal(got[1].double().cpu(), want[1].cpu()), (got[1], want[1])
    clipped = clip is not None  # x0 = x_new at -1, 1 (bounds of x0), 0.5, -0.5 (of the clip), 1, -1, 0.75, 0
    assert (want[1][0, 0] == 0).tolist() == [True, True, clipped, clipped, True, True, clipped, False]


# ---- Triton past one program of each kernel ----------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("project_noise", PROJECTIONS)
@pytest.mark.parametrize("sample_shape", [(3, 20, 20), (1, 17, 19)], ids=str)
def test_triton_backward_every_program_path(sample_shape, project_noise):
    """Several programs per sample (the sample projection's partial sums), ragged last programs, a
    one-channel pixel projection; the clip's extra SUMS pass."""
    case = make_case(batch=2, channels=sample_shape[0], spatial=sample_shape[1:], variance="learned_range", seed=31,
                     device=device_of("triton"))
    for method, noise, clip in (("ddpm", "given", (-1.0, 1.0)), ("ddim", "drawn", None)):
        opts = dict(method=method, variance="learned_range", project_noise=project_noise, clip=clip,
                    guided=True, noise=noise)
        check(fused_grads(case, opts, "triton"), case, opts, opts)


# ---- (c) torch.library conformance ----------------------------------------------------------------------
def opcheck_args(device="cpu"):
    """Forward arguments (x, model_output and guidance_grad requiring grad) for opcheck."""
    case = make_case(batch=2, variance="learned_range", seed=1, device=device)
    x, mo, coef, noise, grad = (case[k] for k in ("x", "model_output", "coef", "noise", "grad"))
    x, mo, grad = (t.clone().requires_grad_() for t in (x, mo, grad))
    seed = torch.tensor([5, 6], device=device)
    step = torch.tensor(3, device=device)
    return [
        (x, mo, coef, noise, None, None, None, 0, 0, 2, True, 0, 0, None, None, True, True),
        (x, mo, coef, None, seed, step, grad, 0, 0, 2, False, 1, 2, -1.0, 1.0, True, True),
        (x, mo[:, :3].detach().requires_grad_(), coef, None, seed, step, None, 1, 2, 0, True, 0, 1, None, None,
         False, False),
        (x, mo, coef, None, None, None, grad, 1, 1, 0, True, 2, 0, -1.1, 1.05, True, True),
    ]


def backward_args(args):
    """The backward op's arguments for forward arguments `args`."""
    x = args[0]
    gy = torch.randn_like(x)
    return (gy, torch.randn_like(x) if args[-1] else None,
            *(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:-1]))


@needs_cpu_kernel
def test_opcheck_cpu_ops():
    for args in opcheck_args():
        torch.library.opcheck(torch.ops.ddpm_fast.diffusion_step.default, args)
    for args in opcheck_args()[1::2]:
        torch.library.opcheck(torch.ops.ddpm_fast.diffusion_step_backward.default, backward_args(args))


@needs_triton
def test_opcheck_triton_ops():
    from ddpm_fast.kernels import diffusion_step as triton_step
    from ddpm_fast.kernels import diffusion_step_backward as triton_backward

    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    args = opcheck_args(device_of("triton"))[1]
    torch.library.opcheck(triton_step.diffusion_step, args, test_utils=utils)
    torch.library.opcheck(triton_backward.diffusion_step_backward, backward_args(args), test_utils=utils)


# ---- the public wrapper ---------------------------------------------------------------------------------
@needs_cpu_kernel
def test_wrapper_keeps_the_reference_for_coef_noise_and_dynamic_threshold():
    """coef / a given noise requiring grad, or dynamic_threshold: the reference's autograd (no
    gradient dropped); otherwise the fused backward."""
    case = make_case(batch=2, seed=2)
    x = case["x"].clone().requires_grad_()
    coef = case["coef"].clone().requires_grad_()
    noise = case["noise"].clone().requires_grad_()
    fused = "GeneratedBackwardFor_ddpm_fast"
    assert fused in type(ops.diffusion_step(x, case["model_output"], case["coef"], case["noise"])[0].grad_fn).__name__
    for kw in (dict(coef=coef, noise=case["noise"]), dict(coef=case["coef"], noise=noise)):
        out, _ = ops.diffusion_step(x, case["model_output"], kw["coef"], kw["noise"])
        assert fused not in type(out.grad_fn).__name__
        leaf = coef if kw["coef"] is coef else noise
        (g,) = torch.autograd.grad(out.sum(), [leaf])
        assert g.abs().sum() > 0
    out, _ = ops.diffusion_step(x, case["model_output"], case["coef"], case["noise"], dynamic_threshold=(0.9, 2.0))
    assert fused not in type(out.grad_fn).__name__


@needs_cpu_kernel
def test_direct_op_refuses_to_drop_coef_gradient():
    case = make_case(batch=2, seed=2)
    x = case["x"].clone().requires_grad_()
    coef = case["coef"].clone().requires_grad_()
    out, _ = torch.ops.ddpm_fast.diffusion_step(x, case["model_output"], coef, case["noise"], None, None, None, 0, 0, 0,
                                                True, 0, 0, None, None, True, True)
    with pytest.raises(RuntimeError, match="coef and noise as constants"):
        out.sum().backward()


@pytest.mark.parametrize("backend", kernel_backends())
def test_backward_without_x0_output_and_unused_outputs(backend):
    """return_x0=False, and a loss of pred_x0 alone (x_prev's gradient None)."""
    case = make_case(batch=2, seed=4, device=device_of(backend))
    x = case["x"].clone().requires_grad_()
    out, none = ops.diffusion_step(x, case["model_output"], case["coef"], case["noise"], return_x0=False,
                                   backend=backend)
    assert none is None
    (g,) = torch.autograd.grad(out.sum(), [x])
    xr = case["x"].double().requires_grad_()
    with Float64():
        out = reference.diffusion_step(xr, case["model_output"].double(), case["coef"].double(), case["noise"].double())
    (want,) = torch.autograd.grad(out[0].sum(), [xr])
    assert_grads_close([g], [want])


# ---- (d) the CUDA C++ backward under the SIMT harness (tests/simt) -------------------------------------
_spec = importlib.util.spec_from_file_location("simt_build", Path(__file__).parent / "simt" / "build.py")
simt_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(simt_build)


@pytest.fixture(scope="module")
def simt_op():
    """The harness build of csrc/cuda/diffusion_step_backward.cu (torch.ops.<namespace>)."""
    namespace = simt_build.load_kernels("diffusion_step_backward")
    torch.ops.simt.enable()
    torch.ops.simt.configure(2**31 - 1, 65535, 65535, 4, 0)
    yield getattr(torch.ops, namespace)
    torch.ops.simt.disable()


def simt_grads(op, case, opts):
    """The harness's diffusion_step_backward for `opts` -> [grad_x, grad_model_output, grad_guidance or None]."""
    kw = step_inputs(case, opts, "cpu")
    gy, gx0 = incoming(case, opts)
    seed = kw.get("seed")
    step = torch.tensor(kw["step"]) if seed is not None else None
    clip_lo, clip_hi = opts.get("clip") or (None, None)
    before = torch.ops.simt.stats()
    gx, gmo, gguide = op.diffusion_step_backward(
        gy, gx0, case["x"], case["model_output"], case["coef"], kw.get("noise"), seed, step, kw["guidance_grad"],
        code("method", opts.get("method", "ddpm"), METHODS), code("prediction", opts.get("prediction", "epsilon"),
                                                                  PREDICTIONS),
        code("variance", opts.get("variance", "fixed_small"), VARIANCES), opts.get("clip_denoised", True),
        code("noise_mode", opts.get("noise_mode", "normal"), NOISE_MODES),
        code("project_noise", opts.get("project_noise"), PROJECTIONS), clip_lo, clip_hi, opts.get("eps_from_x0", True))
    launches = torch.ops.simt.stats()[0] - before[0]
    assert launches > 0, "the harness ran no kernel"
    return [gx, gmo, gguide if kw["guidance_grad"] is not None else None]


@pytest.mark.simt
@pytest.mark.parametrize("opts", COVERING, ids=opts_id)
def test_simt_cuda_backward_covering_set(simt_op, opts):
    case = make_case(batch=3, variance=opts["variance"], seed=COVERING.index(opts))
    check(simt_grads(simt_op, case, opts), case, opts, opts)


@pytest.mark.simt
@pytest.mark.parametrize("project_noise", PROJECTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_simt_cuda_backward_blocks_and_dtypes(simt_op, project_noise, dtype):
    """Several blocks per sample (1024 elements each; the sample projection's partial sums, with the
    clip's extra pass), ragged ends (1200 elements, 400 pixels), storage dtypes."""
    case = make_case(batch=2, channels=3, spatial=(20, 20), variance="learned", seed=41, dtype=dtype)
    for method, noise, clip in (("ddpm", "drawn", (-1.0, 1.0)), ("ddim", "given", None)):
        opts = dict(method=method, variance="learned", project_noise=project_noise, clip=clip, guided=True,
                    noise=noise)
        got = simt_grads(simt_op, case, opts)
        assert all(g.dtype == dtype for g in got)
        check(got, case, opts, (dtype, opts))


@pytest.mark.simt
@pytest.mark.parametrize("x_dtype,mo_dtype", [(torch.float32, torch.float16), (torch.bfloat16, torch.float32)],
                         ids=str)
def test_simt_cuda_backward_mixed_dtypes(simt_op, x_dtype, mo_dtype):
    """model_output in another dtype than x (the backward runs float32 kernels on exact float32 copies): each
    gradient back in its input's dtype."""
    case = make_case(batch=2, channels=3, spatial=(6, 5), variance="learned_range", seed=45, dtype=x_dtype)
    case["model_output"] = case["model_output"].to(mo_dtype)
    opts = dict(method="ddpm", variance="learned_range", project_noise="sample", clip=(-1.0, 1.0), guided=True,
                noise="drawn")
    got = simt_grads(simt_op, case, opts)
    assert got[0].dtype == x_dtype and got[1].dtype == mo_dtype and got[2].dtype == x_dtype
    check(got, case, opts, opts)


@pytest.mark.simt
@pytest.mark.parametrize("project_noise", PROJECTIONS)
def test_simt_cuda_backward_batch_chunks(simt_op, project_noise):
    """A batch beyond the grid's y limit (configured to 2): launches in chunks of samples."""
    case = make_case(batch=4, channels=2, spatial=(3, 5), variance="learned_range", seed=43)
    opts = dict(method="ddpm", variance="learned_range", project_noise=project_noise, clip=(-1.0, 1.0),
                noise="drawn", guided=True)
    torch.ops.simt.configure(2**31 - 1, 2, 2, 4, 0)
    try:
        got = simt_grads(simt_op, case, opts)
    finally:
        torch.ops.simt.configure(2**31 - 1, 65535, 65535, 4, 0)
    check(got, case, opts, opts)


# ---- (e) on a GPU --------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("method,variance,prediction,project_noise", STEP_GRID, ids=map(grid_id, STEP_GRID))
def test_gpu_backward_matches_reference(backend, method, variance, prediction, project_noise):
    if not backends()[backend]:
        pytest.skip(str(backends()[backend]))
    case = make_case(batch=3, variance=variance, seed=5, device="cuda")
    for opts in COVERING[::4]:
        opts = {**opts, "method": method, "variance": variance, "prediction": prediction,
                "project_noise": project_noise}
        check(fused_grads(case, opts, backend), case, opts, opts)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("project_noise", PROJECTIONS)
@pytest.mark.parametrize("sample_shape", [(3, 64, 64), (1, 37, 53)], ids=str)
def test_gpu_backward_shapes_and_dtypes(backend, dtype, project_noise, sample_shape):
    if not backends()[backend]:
        pytest.skip(str(backends()[backend]))
    case = make_case(batch=3, channels=sample_shape[0], spatial=sample_shape[1:], variance="learned", seed=32,
                     dtype=dtype, device="cuda")
    for method in METHODS:
        opts = dict(method=method, variance="learned", project_noise=project_noise, clip=(-1.0, 1.0), guided=True,
                    noise="drawn")
        check(fused_grads(case, opts, backend), case, opts, opts)
