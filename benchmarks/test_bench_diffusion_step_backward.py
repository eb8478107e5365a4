"""Benchmarks of the backward of ops.diffusion_step against the reference's autograd, timed in the
same run: the forward under autograd and the gradients of x, model_output (with its learned
variance channels) and guidance_grad from incoming gradients of both outputs (x_prev, pred_x0),
as classifier guidance or a trainer differentiates the step. The fused path draws its noise
in-kernel from (seed, step) and redraws it in the backward; the reference is given the same noise
as a precomputed tensor (its draw is not timed: conservative for the fused path).

speedup = t_reference / t_fused (the compare fixture) on U-Net-sized shapes, on CPU (and on a
GPU for the CUDA and Triton backends in the tests marked `cuda`)."""
from __future__ import annotations

import pytest
import torch

import ddpm_fast
from ddpm_fast import ops, philox, reference
from ddpm_fast.step_layout import (LOG_VAR_MAX, LOG_VAR_MIN, NONZERO, NUM_COEFS, POST_COEF1, POST_COEF2,
                                   SQRT_1M_AB, SQRT_AB, SQRT_RECIP_AB, SQRT_RECIPM1_AB, VARIANCE)

SHAPES = [(8, 3, 64, 64), (16, 3, 256, 256)]
# (method, options): guided DDPM with a learned variance (classifier guidance), and the same with
# the sample projection (its reduction pass) and the x_t clip
CASES = {
    "ddpm_learned_guided": dict(variance="learned_range", clip_denoised=True),
    "ddpm_learned_guided_sample_clip": dict(variance="learned_range", clip_denoised=True, project_noise="sample",
                                            clip=(-1.0, 1.0)),
}


def ddpm_case(shape, dtype, device):
    """x, model_output (2C: eps, variance), guidance gradient, DDPM coefficient rows at ab = 0.5,
    seeds; the incoming gradients of (x_prev, pred_x0)."""
    gen = torch.Generator(device=device).manual_seed(0)
    b, c = shape[:2]
    x = torch.randn(shape, generator=gen, device=device).to(dtype)
    mo = torch.cat([torch.randn(shape, generator=gen, device=device),
                    torch.rand(shape, generator=gen, device=device) * 2 - 1], 1).to(dtype)
    guide = (torch.randn(shape, generator=gen, device=device) * 0.1).to(dtype)
    ab, ab_prev, beta = 0.5, 0.55, 0.09
    coef = torch.zeros(b, NUM_COEFS, device=device)
    coef[:, SQRT_RECIP_AB] = ab ** -0.5
    coef[:, SQRT_RECIPM1_AB] = (1 / ab - 1) ** 0.5
    coef[:, SQRT_AB] = ab ** 0.5
    coef[:, SQRT_1M_AB] = (1 - ab) ** 0.5
    coef[:, POST_COEF1] = beta * ab_prev ** 0.5 / (1 - ab)
    coef[:, POST_COEF2] = (1 - ab_prev) * (1 - beta) ** 0.5 / (1 - ab)
    coef[:, LOG_VAR_MIN] = -3.0
    coef[:, LOG_VAR_MAX] = -2.4
    coef[:, VARIANCE] = 0.05
    coef[:, NONZERO] = 1.0
    seed = torch.arange(b, dtype=torch.int64, device=device)
    grads = [torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(2)]
    return x, mo, guide, coef, seed, grads


def _run(compare, shape, dtype, device, backend, options):
    x, mo, guide, coef, seed, grads = ddpm_case(shape, dtype, device)
    step = torch.tensor(9, device=device)
    noise = philox.philox_normal(seed, step, shape[1:]).to(dtype)
    leaves = [t.requires_grad_() for t in (x, mo, guide)]

    def fused():
        outs = ops.diffusion_step(*leaves[:2], coef, seed=seed, step=step, guidance_grad=leaves[2], method="ddpm",
                                  backend=backend, **options)
        return torch.autograd.grad(outs, leaves, grads)

    def ref():
        outs = reference.diffusion_step(*leaves[:2], coef, noise, guidance_grad=leaves[2], method="ddpm", **options)
        return torch.autograd.grad(outs, leaves, grads)

    half = dtype != torch.float32
    for got, want in zip(fused(), ref()):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.float(), want.float(), atol=(2e-2 if half else 1e-4) * scale,
                                   rtol=2e-2 if half else 1e-4)
    # reads x, model_output (2C), guidance, both incoming gradients; writes the three gradients
    nbytes = 10 * x.numel() * x.element_size()
    return compare(fused, ref, device=device, dtype=dtype, shape=shape, nbytes=nbytes)


@pytest.mark.skipif(not ddpm_fast.backends()["cpu"], reason="ddpm_fast._C is not built")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bench_diffusion_step_backward_cpu(compare, benchmark, shape, case):
    benchmark.extra_info["case"] = case
    _run(compare, shape, torch.float32, "cpu", "cpu", CASES[case])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_bench_diffusion_step_backward_gpu(compare, benchmark, case, dtype, backend):
    if not ddpm_fast.backends()[backend]:
        pytest.skip(f"backend {backend}: {ddpm_fast.backends()[backend].reason}")
    benchmark.extra_info["case"] = case
    _run(compare, (64, 3, 256, 256), dtype, "cuda", backend, CASES[case])
