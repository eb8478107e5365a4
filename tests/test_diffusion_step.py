"""ops.diffusion_step on every backend against reference.diffusion_step (the definition), the golden
steps of guided-diffusion, and the in-kernel noise against ddpm_fast.philox.

Coverage: the C++ CPU kernel over the full option cross-product (method x variance x prediction x
projection x clip_denoised x noise mode x clip x guidance x eps_from_x0); the Triton kernel (under
TRITON_INTERPRET=1 without a GPU) over every method x variance x prediction x projection with the
other options rotated; the CUDA kernel and Triton on a GPU in the tests marked `cuda`.
"""
import itertools
import math

import pytest
import torch
from conftest import device_of, run_under_cpu_isa

from ddpm_fast import backends, ops, philox, reference
from ddpm_fast.ops.diffusion_step import draw_noise
from ddpm_fast.step_layout import (DDIM_DIR, DDIM_SIGMA, LOG_VAR_MAX, LOG_VAR_MIN, METHODS,
                                   NOISE_MODES, NONZERO, NUM_COEFS, POST_COEF1, POST_COEF2,
                                   PREDICTIONS, PROJECTIONS, SQRT_1M_AB, SQRT_AB, SQRT_AB_PREV,
                                   SQRT_RECIP_AB, SQRT_RECIPM1_AB, VARIANCE, VARIANCES)

HAS_CUDA = torch.cuda.is_available()
CPU_KERNEL = backends()["cpu"].available
TRITON = backends()["triton"].available
needs_cpu_kernel = pytest.mark.skipif(not CPU_KERNEL, reason="ddpm_fast._C is not built")
needs_triton = pytest.mark.skipif(not TRITON, reason="triton unavailable (no GPU and no TRITON_INTERPRET=1)")


# ---- a float64 schedule as guided-diffusion computes it (linear / cosine betas, respacing) -----------
def betas_of(schedule: str, steps: int) -> torch.Tensor:
    if schedule == "linear":
        scale = 1000 / steps
        return torch.linspace(scale * 0.0001, scale * 0.02, steps, dtype=torch.float64)

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                         for i in range(steps)], dtype=torch.float64)


def kept_timesteps(steps: int, spec: str) -> list[int]:
    """guided-diffusion's space_timesteps: "ddimN" or comma-separated section counts."""
    if spec.startswith("ddim"):
        want = int(spec[4:])
        stride = next(s for s in range(1, steps) if len(range(0, steps, s)) == want)
        return list(range(0, steps, stride))
    counts = [int(c) for c in spec.split(",")]
    size_per, extra = divmod(steps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(kept))


def respaced(schedule: str, steps: int, spec: str):
    """(betas, timestep_map) of the respaced process, float64."""
    alphas_cumprod = torch.cumprod(1 - betas_of(schedule, steps), 0)
    kept = kept_timesteps(steps, spec)
    last, betas = 1.0, []
    for t in kept:
        betas.append(1 - alphas_cumprod[t].item() / last)
        last = alphas_cumprod[t].item()
    return torch.tensor(betas, dtype=torch.float64), torch.tensor(kept)


def coefficient_table(betas: torch.Tensor, variance: str, eta: float) -> torch.Tensor:
    """(S, NUM_COEFS) float64 rows of step_layout for every step index of the process."""
    alphas = 1 - betas
    ab = torch.cumprod(alphas, 0)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    c = torch.zeros(len(betas), NUM_COEFS, dtype=torch.float64)
    c[:, SQRT_RECIP_AB] = torch.sqrt(1 / ab)
    c[:, SQRT_RECIPM1_AB] = torch.sqrt(1 / ab - 1)
    c[:, SQRT_AB] = ab.sqrt()
    c[:, SQRT_1M_AB] = (1 - ab).sqrt()
    c[:, POST_COEF1] = betas * ab_prev.sqrt() / (1 - ab)
    c[:, POST_COEF2] = (1 - ab_prev) * alphas.sqrt() / (1 - ab)
    if variance == "fixed_large":
        large = torch.cat([post_var[1:2], betas[1:]])
        c[:, LOG_VAR_MIN], c[:, VARIANCE] = large.log(), large
    else:
        c[:, LOG_VAR_MIN] = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        c[:, VARIANCE] = post_var
    c[:, LOG_VAR_MAX] = betas.log()
    sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
    c[:, SQRT_AB_PREV] = ab_prev.sqrt()
    c[:, DDIM_DIR] = torch.sqrt(1 - ab_prev - sigma ** 2)
    c[:, DDIM_SIGMA] = sigma
    c[:, NONZERO] = (torch.arange(len(betas)) > 0).double()
    return c


def make_case(batch=3, channels=3, spatial=(5, 7), *, variance="fixed_small", eta=0.5, seed=0,
              dtype=torch.float32, device="cpu"):
    """Random but valid inputs: x, model_output (2C channels, the variance channels meaningful for
    `variance`), coef rows at random step indices (index 0 included: no noise there), noise, grad."""
    g = torch.Generator().manual_seed(seed)
    table = coefficient_table(respaced("linear", 1000, "50")[0], variance, eta)
    index = torch.randint(0, table.shape[0], (batch,), generator=g)
    index[0] = 0
    shape = (batch, channels, *spatial)
    eps = torch.randn(shape, generator=g)
    if variance == "learned":
        var = torch.empty(shape).uniform_(-8.0, -2.0, generator=g)  # log variances
    else:
        var = torch.empty(shape).uniform_(-1.0, 1.0, generator=g)
    case = dict(x=torch.randn(shape, generator=g) * 1.5, model_output=torch.cat([eps, var], 1),
                coef=table[index].float(), noise=torch.randn(shape, generator=g),
                grad=torch.randn(shape, generator=g) * 0.3)
    return {k: (v.to(device=device, dtype=dtype) if k != "coef" else v.to(device)) for k, v in case.items()}


def error_scale(x, model_output, coef, x0, project_noise=None):
    """Per element, the magnitude of the step's largest intermediate: max(1, |x / sqrt(ab)|,
    |sqrt(1 / ab - 1) pred|, |x0|). fp32 rounding errors are relative to it in any implementation
    (x0 from eps, or DDIM's guided x0 recomputed from eps, cancels terms of that size); with a
    projection, x0 + f (x_new - x0) spreads the sample's largest such value to all its elements."""
    c = x.shape[1]
    col = lambda i: coef[:, i].float().reshape(-1, *([1] * (x.dim() - 1)))  # noqa: E731
    scale = torch.stack([torch.ones_like(x, dtype=torch.float32), (col(SQRT_RECIP_AB) * x.float()).abs(),
                         (col(SQRT_RECIPM1_AB) * model_output[:, :c].float()).abs(),
                         x0.float().abs()]).amax(0)
    if project_noise is not None:
        scale = scale.flatten(1).amax(1).reshape(-1, *([1] * (x.dim() - 1))).expand_as(scale)
    return scale


# Unit roundoff u of each storage dtype. Both sides compute in fp32 (results ~1e-5 x (scale + |v|)
# apart) and round to the storage dtype, each moving a value by at most u |v|: they may land on
# neighbouring values, so a half-precision result gets 2u |v| (one to two ulps) on top.
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def assert_within(got, want, scale, rtol, what):
    """|got - want| <= rtol (scale + |want|) + 2u |want| elementwise, u = UNIT_ROUNDOFF[want.dtype]."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    err = (got.float() - want.float()).abs()
    ulps = 2 * UNIT_ROUNDOFF[want.dtype]
    bound = rtol * (scale + want.float().abs()) + ulps * want.float().abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, (f"{what}: error {err.max().item():.3g} is {worst:.3g} x the bound "
                          f"{rtol:g} x (scale + |value|) + {ulps:g} |value|")


def assert_step_equal(got, want, inputs=None, project_noise=None, rtol=1e-5):
    """x_prev and pred_x0 equal to rtol x (error_scale + |value|) elementwise (the scale is 1
    without `inputs` = (x, model_output, coef): then rtol is both a relative and absolute bound),
    plus two units of roundoff of |value| for half-precision storage (assert_within)."""
    scale = 1.0 if inputs is None else error_scale(*inputs, want[1], project_noise)
    assert_within(got[0], want[0], scale, rtol, "x_prev")
    assert_within(got[1], want[1], scale, rtol, "pred_x0")


def run_both(case, backend, **options):
    """(op on `backend`, reference, inputs) for the given-noise path; asserts them equal."""
    grad = case["grad"] if options.pop("guided", False) else None
    args = (case["x"], case["model_output"], case["coef"], case["noise"])
    got = ops.diffusion_step(*args, guidance_grad=grad, backend=backend, **options)
    want = reference.diffusion_step(*args, guidance_grad=grad, **options)
    return got, want, args[:3]


def full_options():
    """Every combination of the options that the per-test parametrisation leaves open."""
    for clip_denoised, noise_mode, clip, guided in itertools.product(
            (True, False), NOISE_MODES, (None, (-1.1, 1.05)), (False, True)):
        yield dict(clip_denoised=clip_denoised, noise_mode=noise_mode, clip=clip, guided=guided)


STEP_GRID = list(itertools.product(METHODS, VARIANCES, PREDICTIONS, PROJECTIONS))


def grid_id(params):
    return "-".join(str(p) for p in params)


# ---- the C++ CPU kernel: the full cross-product -------------------------------------------------------
@needs_cpu_kernel
@pytest.mark.parametrize("method,variance,prediction,project_noise", STEP_GRID, ids=map(grid_id, STEP_GRID))
def test_cpu_matches_reference_every_combination(method, variance, prediction, project_noise):
    case = make_case(variance=variance, seed=STEP_GRID.index((method, variance, prediction, None)))
    for options in full_options():
        for eps_from_x0 in ((True, False) if method == "ddim" else (True,)):
            got, want, inputs = run_both(case, "cpu", method=method, variance=variance, prediction=prediction,
                                 project_noise=project_noise, eps_from_x0=eps_from_x0, **options)
            assert_step_equal(got, want, inputs, project_noise)


@needs_cpu_kernel
@pytest.mark.parametrize("spatial", [(8, 8), (3, 5), (1, 1), (33,), (70, 70)])
@pytest.mark.parametrize("project_noise", PROJECTIONS)
def test_cpu_shapes_and_chunk_boundaries(spatial, project_noise):
    # odd sizes (vector tails, pixel blocks not a multiple of 4), 1-D spatial, and a sample larger
    # than one work chunk (3 * 70 * 70 > 4096 elements, > 256 pixels)
    case = make_case(batch=2, channels=3, spatial=spatial, variance="learned_range", seed=3)
    for method in METHODS:
        got, want, inputs = run_both(case, "cpu", method=method, variance="learned_range",
                                     project_noise=project_noise, clip=(-1.0, 1.0), guided=True)
        assert_step_equal(got, want, inputs, project_noise)


# ---- Triton (the interpreter without a GPU): every step grid point, other options rotated -------------
TRITON_ROTATION = [
    dict(clip_denoised=True, noise_mode="normal", clip=None, guided=False, eps_from_x0=True),
    dict(clip_denoised=False, noise_mode="squared", clip=(-1.1, 1.05), guided=True, eps_from_x0=False),
    dict(clip_denoised=True, noise_mode="zero", clip=(-1.1, 1.05), guided=False, eps_from_x0=False),
]


@needs_triton
@pytest.mark.parametrize("method,variance,prediction,project_noise", STEP_GRID, ids=map(grid_id, STEP_GRID))
def test_triton_matches_reference(method, variance, prediction, project_noise):
    case = make_case(batch=2, variance=variance, seed=7, device=device_of("triton"))
    for options in TRITON_ROTATION:
        got, want, inputs = run_both(case, "triton", method=method, variance=variance, prediction=prediction,
                             project_noise=project_noise, **options)
        assert_step_equal(got, want, inputs, project_noise)


# Sample shapes past one program of each Triton kernel (1024 elements per program of the plain and
# the two-kernel "sample" projection; 256 pixels per program of the pixel projection for up to 4
# channels): 1200 elements / 400 pixels, 1400 / 700 (1-D), and a one-channel pixel projection.
TRITON_PROGRAM_SHAPES = [(3, 20, 20), (1, 17, 19), (2, 700)]


@needs_triton
@pytest.mark.parametrize("project_noise", PROJECTIONS)
@pytest.mark.parametrize("sample_shape", TRITON_PROGRAM_SHAPES, ids=str)
def test_triton_every_program_path(sample_shape, project_noise):
    case = make_case(batch=2, channels=sample_shape[0], spatial=sample_shape[1:], variance="learned_range",
                     seed=31, device=device_of("triton"))
    args = (case["x"], case["model_output"], case["coef"])
    kw = dict(method="ddpm", variance="learned_range", project_noise=project_noise, clip_denoised=False)
    got, want, inputs = run_both(case, "triton", guided=True, **kw)
    assert_step_equal(got, want, inputs, project_noise)
    seed = torch.tensor([7, 1 << 33], device=case["x"].device)
    got = ops.diffusion_step(*args, seed=seed, step=3, backend="triton", **{**kw, "method": "ddim"})
    want = reference.diffusion_step(*args, philox.philox_normal(seed, 3, sample_shape), **{**kw, "method": "ddim"})
    assert_step_equal(got, want, args, project_noise)


@pytest.mark.cuda
@pytest.mark.parametrize("project_noise", PROJECTIONS)
@pytest.mark.parametrize("sample_shape", [(3, 64, 64), (1, 37, 53), (4, 33, 31), (6, 1000)], ids=str)
def test_cuda_multi_block_shapes(sample_shape, project_noise):
    """The CUDA C++ step over many blocks per sample (1024 elements per block; the "sample"
    projection reduces across them), ragged last blocks and a one-channel pixel projection."""
    case = make_case(batch=3, channels=sample_shape[0], spatial=sample_shape[1:], variance="learned",
                     seed=32, device="cuda")
    args = (case["x"], case["model_output"], case["coef"])
    for method in METHODS:
        kw = dict(method=method, variance="learned", project_noise=project_noise)
        got, want, inputs = run_both(case, "cuda", guided=True, **kw)
        assert_step_equal(got, want, inputs, project_noise)
        seed = torch.tensor([3, -4, 1 << 40], device="cuda")
        got = ops.diffusion_step(*args, seed=seed, step=8, backend="cuda", **kw)
        want = reference.diffusion_step(*args, philox.philox_normal(seed, 8, sample_shape), **kw)
        assert_step_equal(got, want, args, project_noise)


# ---- storage dtypes ------------------------------------------------------------------------------------
def kernel_backends():
    """Every fused backend runnable here: the C++ CPU kernel, Triton (GPU or interpreter) and the
    CUDA C++ kernel when a GPU is visible (tests over these build tensors on device_of(backend);
    conftest marks the GPU ones `cuda`)."""
    out = []
    if CPU_KERNEL:
        out.append("cpu")
    if TRITON:
        out.append("triton")
    if backends()["cuda"].available:
        out.append("cuda")
    return out


HALF_DTYPES = [torch.float16, torch.bfloat16]


def low_precision_case(dtype, device="cpu"):
    return make_case(batch=2, variance="learned_range", dtype=dtype, seed=11, device=device)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("project_noise", PROJECTIONS)
def test_low_precision_storage(backend, dtype, project_noise):
    case = low_precision_case(dtype, device_of(backend))
    for method in METHODS:
        got, want, inputs = run_both(case, backend, method=method, variance="learned_range",
                             project_noise=project_noise, guided=True, clip_denoised=False)
        assert got[0].dtype == dtype and got[1].dtype == dtype
        assert_step_equal(got, want, inputs, project_noise)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("project_noise", PROJECTIONS)
def test_low_precision_bound_rejects_wrong_steps(dtype, project_noise):
    """The bound of test_low_precision_storage, on its data, rejects plausible wrong kernels: one
    ignoring the learned-variance channels (DDPM) and one dropping the guidance gradient."""
    case = low_precision_case(dtype)
    args = (case["x"], case["model_output"], case["coef"], case["noise"])
    for method in METHODS:
        options = dict(method=method, variance="learned_range", project_noise=project_noise,
                       clip_denoised=False)
        want = reference.diffusion_step(*args, guidance_grad=case["grad"], **options)
        planted = {"drops guidance": reference.diffusion_step(*args, **options)}
        if method == "ddpm":
            planted["ignores the variance channels"] = reference.diffusion_step(
                *args, guidance_grad=case["grad"], **{**options, "variance": "fixed_small"})
        for name, wrong in planted.items():
            with pytest.raises(AssertionError, match="x_prev"):
                assert_step_equal(wrong, want, args[:3], project_noise)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("mo_dtype", [torch.float16, torch.bfloat16])
def test_model_output_dtype_may_differ_from_x(backend, mo_dtype):
    # an fp16 U-Net beside an fp32 sample: the arithmetic is fp32 on the given values
    device = device_of(backend)
    case = make_case(batch=2, variance="learned_range", seed=5, device=device)
    case["model_output"] = case["model_output"].to(mo_dtype)
    got, want, inputs = run_both(case, backend, method="ddpm", variance="learned_range", guided=True)
    assert got[0].dtype == torch.float32
    assert_step_equal(got, want, inputs)


# ---- in-kernel noise ---------------------------------------------------------------------------------
NOISE_SHAPES = [(3, 8, 8), (3, 5, 7), (2, 3)]  # aligned; pixels and numel not multiples of 4; 1-D spatial


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("sample_shape", NOISE_SHAPES, ids=str)
@pytest.mark.parametrize("project_noise", PROJECTIONS)
def test_drawn_noise_matches_reference_with_philox_noise(backend, sample_shape, project_noise):
    device = device_of(backend)
    case = make_case(batch=3, channels=sample_shape[0], spatial=sample_shape[1:], variance="learned_range",
                     seed=2, device=device)
    seed = torch.tensor([11, -7, (5 << 32) + 3], device=device)
    for method, step in (("ddpm", 4), ("ddim", torch.tensor(2 ** 33 + 1, device=device))):
        kwargs = dict(method=method, variance="learned_range", project_noise=project_noise, clip=(-1.0, 1.0))
        got = ops.diffusion_step(case["x"], case["model_output"], case["coef"], seed=seed, step=step,
                                 backend=backend, **kwargs)
        noise = philox.philox_normal(seed, step, sample_shape)
        want = reference.diffusion_step(case["x"], case["model_output"], case["coef"], noise, **kwargs)
        assert_step_equal(got, want, (case["x"], case["model_output"], case["coef"]), project_noise)


@pytest.mark.parametrize("backend", ["torch", *kernel_backends()])
def test_noise_is_the_same_on_every_backend(backend):
    device = device_of(backend)
    seed = torch.tensor([0, 1, 2 ** 40, -9], device=device)
    for shape, step in (((3, 8, 8), 0), ((3, 5, 7), 17), ((4, 3), philox.INITIAL_NOISE_STEP)):
        drawn = draw_noise(seed, step, shape, backend=backend)
        torch.testing.assert_close(drawn.cpu(), philox.philox_normal(seed.cpu(), step, shape), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
def test_drawn_sample_does_not_depend_on_its_batch(backend):
    device = device_of(backend)
    case = make_case(batch=4, variance="fixed_large", seed=4, device=device)
    seed = torch.tensor([21, 22, 23, 24], device=device)
    for project_noise in PROJECTIONS:
        kwargs = dict(method="ddpm", variance="fixed_large", project_noise=project_noise, seed=seed, step=6,
                      backend=backend)
        full = ops.diffusion_step(case["x"], case["model_output"], case["coef"], **kwargs)
        for idx in ([2], [3, 1]):
            part = ops.diffusion_step(case["x"][idx], case["model_output"][idx], case["coef"][idx],
                                      **{**kwargs, "seed": seed[idx]})
            assert torch.equal(part[0], full[0][idx]) and torch.equal(part[1], full[1][idx])


@needs_cpu_kernel
@pytest.mark.parametrize("project_noise", PROJECTIONS)
def test_cpu_drawn_noise_over_many_runs_and_ragged_ends(project_noise):
    # (3, 37, 53): 5883 elements per sample, so the CPU kernel draws in several runs of 1024 and
    # chunks of 4096 with ragged ends, and the pixel projection starts channels at offsets that are
    # not multiples of 4 (the AVX-512 draw stages those through its Philox block grid)
    shape = (3, 37, 53)
    seed = torch.tensor([3, -(1 << 40) + 5])
    drawn = draw_noise(seed, 123, shape, backend="cpu")
    torch.testing.assert_close(drawn, philox.philox_normal(seed, 123, shape), rtol=0, atol=1e-5)
    case = make_case(batch=2, channels=3, spatial=shape[1:], variance="fixed_large", seed=8)
    kwargs = dict(method="ddim", project_noise=project_noise, clip_denoised=False)
    got = ops.diffusion_step(case["x"], case["model_output"], case["coef"], seed=seed, step=9, backend="cpu",
                             **kwargs)
    want = reference.diffusion_step(case["x"], case["model_output"], case["coef"],
                                    philox.philox_normal(seed, 9, shape), **kwargs)
    assert_step_equal(got, want, (case["x"], case["model_output"], case["coef"]), project_noise)


@needs_cpu_kernel
@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_cpu_infinite_model_output_clipped_like_the_reference(method):
    # with clip_denoised, an infinite eps gives x0 = -1 / +1 and (DDPM's mean; DDIM's eps re-derived
    # from x0) a finite step: the kernel's affine form must not turn it into 0 * inf = NaN
    case = make_case(batch=2, variance="fixed_small", seed=5)
    model_output = case["model_output"][:, :3].clone()
    model_output[0, 1, 2] = float("inf")
    model_output[1, 0, :, 3] = float("-inf")
    args = (case["x"], model_output, case["coef"], case["noise"])
    kwargs = dict(method=method, clip_denoised=True, eps_from_x0=True)
    got = ops.diffusion_step(*args, backend="cpu", **kwargs)
    want = reference.diffusion_step(*args, **kwargs)
    for g, w in zip(got, want):
        assert torch.isfinite(w).all() and torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@needs_cpu_kernel
def test_cpu_noise_statistics_and_independence():
    seed = torch.arange(4, dtype=torch.int64) + 100
    z = draw_noise(seed, 3, (4, 250, 250), backend="cpu").double()
    assert z.numel() == 10 ** 6
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    other_step = draw_noise(seed, 4, (4, 250, 250), backend="cpu").double()
    other_seed = draw_noise(seed + 4, 3, (4, 250, 250), backend="cpu").double()
    for other in (other_step, other_seed):
        corr = torch.corrcoef(torch.stack([z.flatten(), other.flatten()]))[0, 1].item()
        assert abs(corr) < 1e-2


# ---- call conventions ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", *kernel_backends()])
def test_call_conventions(backend):
    device = device_of(backend)
    case = make_case(batch=2, seed=9, device=device)
    x, mo, coef = case["x"], case["model_output"][:, :3], case["coef"]
    seed = torch.tensor([1, 2], device=device)
    # step: a Python int or a 0-dim int64 tensor
    a = ops.diffusion_step(x, mo, coef, seed=seed, step=5, backend=backend)
    b = ops.diffusion_step(x, mo, coef, seed=seed, step=torch.tensor(5, device=device), backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # return_x0=False: None, same x_prev
    c = ops.diffusion_step(x, mo, coef, seed=seed, step=5, return_x0=False, backend=backend)
    assert c[1] is None and torch.equal(c[0], a[0])
    # neither noise nor seed: no noise (deterministic DDIM)
    d = ops.diffusion_step(x, mo, coef, method="ddim", backend=backend)
    assert_step_equal(d, reference.diffusion_step(x, mo, coef, None, method="ddim"), (x, mo, coef))
    # a C-channel model output with a fixed variance, a 2C one is accepted too (extra channels unused)
    e = ops.diffusion_step(x, case["model_output"], coef, case["noise"], backend=backend)
    assert_step_equal(e, reference.diffusion_step(x, mo, coef, case["noise"]), (x, mo, coef))
    # strided inputs: channels_last tensors, a coefficient row expanded over the batch (stride 0)
    row = coef[1:2].expand(2, -1)
    f = ops.diffusion_step(x.to(memory_format=torch.channels_last), mo.to(memory_format=torch.channels_last),
                           row, case["noise"].to(memory_format=torch.channels_last), backend=backend)
    assert_step_equal(f, reference.diffusion_step(x, mo, row.contiguous(), case["noise"]), (x, mo, row))


@pytest.mark.parametrize("backend", ["torch", *kernel_backends()])
def test_dynamic_threshold_uses_the_reference_path(backend):
    device = device_of(backend)
    case = make_case(batch=2, seed=12, device=device)
    args = (case["x"], case["model_output"], case["coef"])
    seed = torch.tensor([3, 4], device=device)
    got = ops.diffusion_step(*args, seed=seed, step=1, method="ddim", prediction="x0",
                             dynamic_threshold=(0.9, 1.5), backend=backend)
    want = reference.diffusion_step(*args, philox.philox_normal(seed, 1, case["x"].shape[1:]), method="ddim",
                                    prediction="x0", dynamic_threshold=(0.9, 1.5))
    assert_step_equal(got, want, args)


# ---- noise projection: an oracle independent of reference._project ------------------------------------
def _norm(v, mode):
    """float64 norms of v over the channels of each pixel (mode "pixel") or over each sample."""
    dims = (1,) if mode == "pixel" else tuple(range(1, v.dim()))
    return torch.linalg.vector_norm(v.double(), dim=dims, keepdim=True)


def check_projection_geometry(backend, project_noise, method):
    """The seed's projection, as geometry: the step's new sample lies on the sphere around its x0
    with radius |x_det - x0| (x_det: the same step without noise) and on the ray from x0 through
    x_new (the same step with the noise, unprojected): |x_proj - x0| = |x_det - x0| and
    x_proj - x0 = (positive) * (x_new - x0), norms per pixel or per sample as `project_noise` says."""
    case = make_case(batch=3, channels=4, spatial=(5, 6), variance="learned_range", seed=21,
                     device=device_of(backend))
    args = (case["x"], case["model_output"], case["coef"])
    kw = dict(method=method, variance="learned_range", guidance_grad=case["grad"], backend=backend)
    x_det, x0 = ops.diffusion_step(*args, None, **kw)
    x_new, x0_new = ops.diffusion_step(*args, case["noise"], **kw)
    x_proj, x0_proj = ops.diffusion_step(*args, case["noise"], project_noise=project_noise, **kw)
    assert torch.equal(x0_new, x0) and torch.equal(x0_proj, x0)
    tol = 1e-5 * error_scale(*args, x0, "sample").double()[:, :1]  # (B, 1, ...) per sample
    offset, ray = (x_proj - x0).double(), (x_new - x0).double()
    assert (_norm(x_new - x_det, "sample") > 0.01).sum() >= 2, "the noise must move the samples"
    radius_err = (_norm(offset, project_noise) - _norm(x_det - x0, project_noise)).abs()
    assert (radius_err <= tol).all(), f"off the sphere by {radius_err.max().item():.3g}"
    along = (offset * ray).sum(1 if project_noise == "pixel" else tuple(range(1, ray.dim())), keepdim=True)
    assert (along >= 0).all(), "projected onto the opposite side of x0"
    across = offset - along / _norm(ray, project_noise).square().clamp_min(1e-30) * ray
    assert (_norm(across, project_noise) <= tol).all(), (
        f"off the ray through x_new by {_norm(across, project_noise).max().item():.3g}")


@pytest.mark.parametrize("backend", ["torch", *kernel_backends()])
@pytest.mark.parametrize("project_noise", ["pixel", "sample"])
@pytest.mark.parametrize("method", METHODS)
def test_projection_geometry(backend, project_noise, method):
    check_projection_geometry(backend, project_noise, method)


@pytest.mark.parametrize("project_noise", ["pixel", "sample"])
def test_projection_geometry_rejects_the_other_mode(project_noise, monkeypatch):
    """The planted bug: the projection with its norms taken over the other mode's axes (a pixel
    projection keeps the sample radius but leaves the ray; a sample one leaves the pixel spheres)."""
    real = reference._project
    other = "sample" if project_noise == "pixel" else "pixel"
    monkeypatch.setattr(reference, "_project", lambda x_new, x_det, x0, mode: real(x_new, x_det, x0, other))
    with pytest.raises(AssertionError, match="off the (sphere|ray)"):
        check_projection_geometry("torch", project_noise, "ddim")


# ---- the golden steps of guided-diffusion ------------------------------------------------------------
def golden_step_inputs(entry, variance=None):
    """(coef rows, guidance gradient or None) of a golden step; `variance` overrides the entry's
    in the coefficient table (a planted bug)."""
    betas, timestep_map = respaced(entry["schedule"], entry["T"], entry["respacing"])
    table = coefficient_table(betas, variance or entry["variance"], entry["eta"])
    coef = table[entry["step_index"]].float()
    grad = None
    if entry["guided"]:  # cond_fn(x, t) = -0.3 x + 0.05 t / 1000, t the original timestep
        t = timestep_map[entry["step_index"]].double().reshape(-1, 1, 1, 1)
        grad = (-0.3 * entry["x"].double() + 0.05 * t / 1000).float()
    return coef, grad


def test_inline_schedule_matches_golden_respacing(golden_diffusion):
    for entry in golden_diffusion["respacing"]:
        betas, timestep_map = respaced(entry["schedule"], entry["T"], entry["respacing"])
        assert torch.equal(timestep_map, entry["timestep_map"].to(timestep_map.dtype))
        torch.testing.assert_close(betas, entry["betas"].double(), rtol=1e-12, atol=1e-15)


def golden_step(entry, backend, variance=None):
    """(x_prev, pred_x0) on the CPU of the op on `backend` for a golden entry's inputs."""
    device = device_of(backend)
    coef, grad = golden_step_inputs(entry, variance)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    x_prev, x0 = ops.diffusion_step(to(entry["x"]), to(entry["model_output"]), to(coef), to(entry["noise"]),
                                    method=entry["method"], variance=entry["variance"],
                                    clip_denoised=entry["clip_denoised"], guidance_grad=to(grad),
                                    backend=backend)
    return x_prev.cpu(), x0.cpu()


def assert_golden_step(got, entry):
    """Elementwise, like test_diffusion_golden.py: 1e-5 absolute plus 1e-5 relative. The relative
    part serves the unclipped cosine steps near T, whose x0 (~1e5) comes from cancelling terms of
    that size: the kernels' affine form rounds them in another order than guided-diffusion (the C++
    kernel is up to 2e-6 relative off there; a step with fixed_large's variance is off by ~1000x
    this bound)."""
    for value, want in zip(got, (entry["sample"], entry["pred_xstart"])):
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", *kernel_backends()])
def test_golden_steps(golden_diffusion, backend):
    for entry in golden_diffusion["steps"]:
        assert_golden_step(golden_step(entry, backend), entry)


def test_golden_step_check_rejects_fixed_large_variance(golden_diffusion):
    """The planted bug: a DDPM step with fixed_large's variance where the entry has fixed_small."""
    entries = [e for e in golden_diffusion["steps"] if e["method"] == "ddpm" and e["variance"] == "fixed_small"]
    assert entries
    for entry in entries:
        with pytest.raises(AssertionError, match="not close"):
            assert_golden_step(golden_step(entry, "torch", variance="fixed_large"), entry)


# ---- torch.library conformance --------------------------------------------------------------------------
def opcheck_args(device="cpu"):
    case = make_case(batch=2, variance="learned_range", seed=1, device=device)
    x, mo, coef, noise, grad = (case[k] for k in ("x", "model_output", "coef", "noise", "grad"))
    seed = torch.tensor([5, 6], device=device)
    step = torch.tensor(3, device=device)
    return [
        (x, mo, coef, noise, None, None, None, 0, 0, 2, True, 0, 0, None, None, True, True),
        (x, mo, coef, None, seed, step, grad, 0, 0, 2, False, 1, 2, -1.0, 1.0, True, True),
        (x, mo[:, :3], coef, None, seed, step, None, 1, 2, 0, True, 0, 1, None, None, False, False),
        (x, mo[:, :3], coef, None, None, None, grad, 1, 1, 0, True, 2, 0, None, None, True, True),
    ]


@needs_cpu_kernel
def test_opcheck_cpu_op():
    for args in opcheck_args():
        torch.library.opcheck(torch.ops.ddpm_fast.diffusion_step.default, args)


@needs_triton
def test_opcheck_triton_op():
    from ddpm_fast.kernels import diffusion_step as triton_step

    args = opcheck_args(device_of("triton"))[1]
    torch.library.opcheck(triton_step.diffusion_step, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ---- bad input ------------------------------------------------------------------------------------------
def bad_calls():
    case = make_case(batch=2, seed=0)
    x, mo, coef, noise = case["x"], case["model_output"], case["coef"], case["noise"]
    seed = torch.tensor([1, 2])
    yield "model_output", dict(model_output=mo[:, :, :3])
    yield "model_output", dict(model_output=mo[:1])
    yield "model_output", dict(model_output=mo[:, :4])
    yield "model_output", dict(model_output=mo[:, :3], variance="learned_range")  # needs 2C
    yield "coef", dict(coef=coef[:, :5])
    yield "coef", dict(coef=coef[:1])
    yield "noise", dict(noise=noise[:, :2])
    yield "guidance_grad", dict(guidance_grad=noise[..., :3])
    yield "x", dict(x=x.long())
    yield "model_output", dict(model_output=mo.int())
    yield "noise", dict(noise=noise.double())
    yield "noise", dict(noise=noise, seed=seed, step=0)  # both
    yield "seed", dict(seed=seed.int(), step=0)
    yield "seed", dict(seed=torch.tensor([1, 2, 3]), step=0)
    yield "seed", dict(seed=seed.float(), step=0)
    yield "step", dict(seed=seed)
    yield "step", dict(step=3)
    yield "step", dict(seed=seed, step=torch.tensor([1, 2]))
    yield "step", dict(seed=seed, step=torch.tensor(1.0))
    yield "method", dict(method="euler")
    yield "prediction", dict(prediction="score")
    yield "variance", dict(variance="learned_small")
    yield "noise_mode", dict(noise_mode="uniform")
    yield "project_noise", dict(project_noise="channel")
    yield "clip", dict(clip=(1.0, -1.0))
    yield "clip", dict(clip=1.0)
    yield "dynamic_threshold", dict(dynamic_threshold=(1.5, 2.0))
    yield "backend", dict(backend="tpu")
    if HAS_CUDA:
        yield "seed", dict(seed=seed.cuda(), step=0)
        yield "coef", dict(coef=coef.cuda())


@pytest.mark.parametrize("name,override", list(bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_value_error_naming_the_argument(name, override):
    case = make_case(batch=2, seed=0)
    kwargs = dict(x=case["x"], model_output=case["model_output"][:, :3], coef=case["coef"], noise=None)
    kwargs.update(override)
    with pytest.raises(ValueError, match=name):
        ops.diffusion_step(**kwargs)


def test_bad_flag_types_raise_type_error():
    case = make_case(batch=2, seed=0)
    with pytest.raises(TypeError, match="clip_denoised"):
        ops.diffusion_step(case["x"], case["model_output"], case["coef"], clip_denoised=1)


@needs_cpu_kernel
def test_direct_op_calls_are_checked():
    case = make_case(batch=2, seed=0)
    with pytest.raises(RuntimeError, match="coef"):
        torch.ops.ddpm_fast.diffusion_step(case["x"], case["model_output"], case["coef"][:, :4], None, None, None,
                                           None, 0, 0, 0, True, 0, 0, None, None, True, True)
    with pytest.raises(RuntimeError, match="method"):
        torch.ops.ddpm_fast.diffusion_step(case["x"], case["model_output"], case["coef"], None, None, None,
                                           None, 5, 0, 0, True, 0, 0, None, None, True, True)


# ---- every CPU instruction-set variant --------------------------------------------------------------
@needs_cpu_kernel
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_cpu_instruction_set_variants(isa):
    # the kernel picks its variant once per process: run a compact cross-check in a fresh one
    run_under_cpu_isa(isa, """
        import itertools, torch
        from test_diffusion_step import make_case, run_both, assert_step_equal
        import ddpm_fast._C
        from ddpm_fast import ops, philox, reference
        for variance, method, project_noise in itertools.product(
                ("fixed_small", "learned_range", "learned"), ("ddpm", "ddim"), (None, "pixel", "sample")):
            case = make_case(batch=2, spatial=(5, 7), variance=variance, seed=1)
            got, want, inputs = run_both(case, "cpu", method=method, variance=variance,
                                         project_noise=project_noise, guided=True, clip=(-1.0, 1.0))
            assert_step_equal(got, want, inputs, project_noise)
            seed = torch.tensor([4, 5])
            got = ops.diffusion_step(case["x"], case["model_output"], case["coef"], seed=seed, step=2,
                                     method=method, variance=variance, project_noise=project_noise)
            noise = philox.philox_normal(seed, 2, case["x"].shape[1:])
            want = reference.diffusion_step(case["x"], case["model_output"], case["coef"], noise,
                                            method=method, variance=variance, project_noise=project_noise)
            assert_step_equal(got, want, inputs, project_noise)
    """)


# ---- GPU -------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("method,variance,prediction,project_noise", STEP_GRID, ids=map(grid_id, STEP_GRID))
def test_cuda_matches_reference(method, variance, prediction, project_noise):
    case = make_case(batch=3, spatial=(9, 13), variance=variance, seed=13, device="cuda")
    for options in full_options():
        for eps_from_x0 in ((True, False) if method == "ddim" else (True,)):
            got, want, inputs = run_both(case, "cuda", method=method, variance=variance, prediction=prediction,
                                 project_noise=project_noise, eps_from_x0=eps_from_x0, **options)
            assert_step_equal(got, want, inputs, project_noise)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("project_noise", PROJECTIONS)
def test_cuda_drawn_noise_and_dtypes(backend, dtype, project_noise):
    for spatial in ((64, 64), (5, 7)):
        case = make_case(batch=4, spatial=spatial, variance="learned_range", seed=8, dtype=dtype, device="cuda")
        seed = torch.tensor([1, 2, 3, 1 << 35], device="cuda")
        kwargs = dict(method="ddpm", variance="learned_range", project_noise=project_noise)
        got = ops.diffusion_step(case["x"], case["model_output"], case["coef"], seed=seed, step=9,
                                 backend=backend, **kwargs)
        noise = philox.philox_normal(seed, 9, case["x"].shape[1:])
        want = reference.diffusion_step(case["x"], case["model_output"], case["coef"], noise, **kwargs)
        assert_step_equal(got, want, (case["x"], case["model_output"], case["coef"]), project_noise)


@pytest.mark.cuda
@pytest.mark.parametrize("batch,sample_shape", [(5, (3, 128, 128)), (65537, (1, 4, 4))], ids=str)
def test_cuda_sample_projection_factor_once_per_sample(batch, sample_shape):
    """Issue 17: the "sample" projection reduces each sample's partial sums once (factor_kernel,
    fixed order): the reference's values and the same bits on a rerun, with 48 blocks per sample,
    and with 65537 samples (two launches of the y-limit chunks; factor_kernel's blocks start at the
    chunk's first sample)."""
    case = make_case(batch=batch, channels=sample_shape[0], spatial=sample_shape[1:], seed=41, device="cuda")
    seed = torch.arange(batch, device="cuda") * 7 + 1
    args = (case["x"], case["model_output"], case["coef"])
    kw = dict(method="ddim", project_noise="sample", seed=seed, step=5)
    got = ops.diffusion_step(*args, backend="cuda", **kw)
    want = reference.diffusion_step(*args, philox.philox_normal(seed, 5, sample_shape), method="ddim",
                                    project_noise="sample")
    assert_step_equal(got, want, args, "sample")
    again = ops.diffusion_step(*args, backend="cuda", **kw)
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])


@pytest.mark.cuda
def test_cuda_noise_matches_cpu_noise():
    seed = torch.tensor([7, 8, -1])
    for shape in ((3, 64, 64), (3, 5, 7)):
        cpu = philox.philox_normal(seed, 12, shape)
        for backend in ("cuda", "triton"):
            gpu = draw_noise(seed.cuda(), 12, shape, backend=backend)
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replays_with_a_changing_step_tensor(backend):
    case = make_case(batch=2, spatial=(16, 16), variance="learned_range", seed=3, device="cuda")
    seed = torch.tensor([5, 6], device="cuda")
    step = torch.tensor(0, device="cuda")
    kwargs = dict(method="ddpm", variance="learned_range", seed=seed, backend=backend)
    args = (case["x"], case["model_output"], case["coef"])
    ops.diffusion_step(*args, step=step, **kwargs)  # warm up (compilation) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.diffusion_step(*args, step=step, **kwargs)
    for s in (3, 11):
        step.fill_(s)
        graph.replay()
        eager = ops.diffusion_step(*args, step=s, **kwargs)
        assert torch.equal(captured[0], eager[0])
