"""Triton kernel of ddpm_fast::diffusion_step_backward (definition: the autograd of
ddpm_fast/reference.py diffusion_step), registered as the custom op
ddpm_fast::diffusion_step_backward_triton, and the autograd of ddpm_fast::diffusion_step_triton.

The per-element math is csrc/include/diffusion_step_backward_math.h (its header comment derives
every formula); this is its Triton copy. The step is recomputed from the forward's inputs (nothing
saved), in-kernel noise redrawn with the same Philox counters (kernels/diffusion_step.py's
_load_inputs: the noise is a constant).

Programs as in the forward: one grid axis, (programs per sample) x B. No projection: one pass.
"sample": STATS writes per program the partial sums |x_det - x0|^2, |x_new - x0|^2 and (without
the x_t clip) S = sum(gout (x_new - x0)); with the clip, SUMS recomputes S with the clip's mask (it
needs the projection factor, hence the sample's first two sums); APPLY reduces the sample's
partials in a fixed order and writes the gradients. "pixel": one (C, BLOCK_P) tile holds every
channel of its pixels, so one program does the norms, S and the gradients.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ddpm_fast.ops.diffusion_step import fake_backward, register_autograd

from ._launch import check_grid, check_sample_numel, device_guard
from .diffusion_step import (BLOCK_Q, DDIM_DIR, DDPM, EPSILON, FIXED_LARGE, FIXED_SMALL, LEARNED_RANGE,
                             LOG_VAR_MAX, LOG_VAR_MIN, NOISE_DRAWN, NOISE_GIVEN, NOISE_NONE, NOISE_NORMAL,
                             NOISE_SQUARED, NONZERO, NUM_COEFS, PARTIALS_MAX, PIXEL_TILE, POST_COEF1,
                             POST_COEF2, PRED_V, PROJECT_PIXEL, PROJECT_SAMPLE, SQRT_1M_AB, SQRT_AB,
                             SQRT_AB_PREV, SQRT_RECIP_AB, SQRT_RECIPM1_AB, VARIANCE, _load_inputs,
                             _projection_factor, _sample_sum, _step_values)

# kernel modes (constexpr MODE of _backward_kernel)
PLAIN = tl.constexpr(0)
STATS = tl.constexpr(1)
SUMS = tl.constexpr(2)
APPLY = tl.constexpr(3)


@triton.jit
def _clamp_pass(v, lo, hi, g):
    """g where lo < v < hi, else 0 (a bound or NaN: 0): the gradient torch.clamp passes back."""
    return tl.where((v > lo) & (v < hi), g, 0.0)


@triton.jit
def _step_grads(x, pred, var_out, grad, z, g_new, g_det, g_x0, row, METHOD: tl.constexpr,
                PREDICTION: tl.constexpr, VARIANCE_CODE: tl.constexpr, CLIP_DENOISED: tl.constexpr,
                NOISE_MODE: tl.constexpr, EPS_FROM_X0: tl.constexpr, HAS_GRAD: tl.constexpr,
                HAS_NOISE: tl.constexpr):
    """step_element_backward of csrc/include/diffusion_step_backward_math.h: the gradients
    (x, pred, var_out, grad) from those reaching x_new (g_new), x_det directly (g_det) and the
    returned x0 (g_x0)."""
    c_recip = tl.load(row + SQRT_RECIP_AB)
    c_recipm1 = tl.load(row + SQRT_RECIPM1_AB)
    c_ab = tl.load(row + SQRT_AB)
    c_1m_ab = tl.load(row + SQRT_1M_AB)
    big_g = g_new + g_det
    if PREDICTION == EPSILON:
        x0_raw = c_recip * x - c_recipm1 * pred
    elif PREDICTION == PRED_V:
        x0_raw = c_ab * x - c_1m_ab * pred
    else:
        x0_raw = pred
    zero = tl.zeros_like(x)
    g_x = zero
    g_pred = zero
    g_var = zero
    g_guide = zero
    if METHOD == DDPM:
        g_x0c = tl.load(row + POST_COEF1) * big_g + g_x0
        g_x = tl.load(row + POST_COEF2) * big_g
        if VARIANCE_CODE == FIXED_SMALL or VARIANCE_CODE == FIXED_LARGE:
            if HAS_GRAD:
                g_guide = tl.load(row + VARIANCE) * big_g
        else:
            lv_min = tl.load(row + LOG_VAR_MIN)
            lv_max = tl.load(row + LOG_VAR_MAX)
            if VARIANCE_CODE == LEARNED_RANGE:
                frac = (var_out + 1.0) / 2.0
                log_var = frac * lv_max + (1.0 - frac) * lv_min
            else:
                log_var = var_out
            g_log_var = zero
            if HAS_GRAD:
                var = tl.exp(log_var)
                g_guide = var * big_g
                g_log_var = var * grad * big_g
            if HAS_NOISE:
                nonzero = tl.load(row + NONZERO)
                if NOISE_MODE == NOISE_NORMAL:  # scale = e^{lv / 2}: d scale / d lv = scale / 2
                    g_log_var += 0.5 * (tl.exp(0.5 * log_var) * nonzero) * z * g_new
                elif NOISE_MODE == NOISE_SQUARED:  # scale = e^{lv}
                    g_log_var += (tl.exp(log_var) * nonzero) * z * g_new
            if VARIANCE_CODE == LEARNED_RANGE:
                g_var = g_log_var * (0.5 * (lv_max - lv_min))
            else:
                g_var = g_log_var
    else:
        ddim_dir = tl.load(row + DDIM_DIR)
        recip = 1.0 / c_recipm1
        g_x0f = tl.load(row + SQRT_AB_PREV) * big_g + g_x0
        if HAS_GRAD:
            g_eps = ddim_dir * big_g - c_recipm1 * g_x0f
            g_x = c_recip * g_x0f + (c_recip * recip) * g_eps
            g_x0c = -recip * g_eps
            g_guide = -c_1m_ab * g_eps
        elif EPS_FROM_X0:
            g_x = (c_recip * recip * ddim_dir) * big_g
            g_x0c = g_x0f - (recip * ddim_dir) * big_g
        else:
            g_x0c = g_x0f
            if PREDICTION == EPSILON:
                g_pred = ddim_dir * big_g
            elif PREDICTION == PRED_V:
                g_pred = (c_ab * ddim_dir) * big_g
                g_x = (c_1m_ab * ddim_dir) * big_g
            else:
                g_x = (c_recip * recip * ddim_dir) * big_g
                g_pred = (-recip * ddim_dir) * big_g
    if CLIP_DENOISED:
        g_raw = _clamp_pass(x0_raw, -1.0, 1.0, g_x0c)
    else:
        g_raw = g_x0c
    if PREDICTION == EPSILON:
        g_x += c_recip * g_raw
        g_pred -= c_recipm1 * g_raw
    elif PREDICTION == PRED_V:
        g_x += c_ab * g_raw
        g_pred -= c_1m_ab * g_raw
    else:
        g_pred += g_raw
    return g_x, g_pred, g_var, g_guide


@triton.jit
def _projection_grad_coefs(radius2, length2, s):
    """(factor, along_e, along_d) of projection_grad_coefs (diffusion_step_backward_math.h)."""
    factor = _projection_factor(radius2, length2)
    safe_l2 = tl.where(length2 > 0, length2, 1.0)
    along_e = tl.where(length2 > 0, factor * s / safe_l2, 0.0)
    along_d = tl.where((length2 > 0) & (radius2 > 0),
                       s / (tl.sqrt(safe_l2) * tl.sqrt(tl.where(radius2 > 0, radius2, 1.0))), 0.0)
    return factor, along_e, along_d


@triton.jit
def _gout(gy_ptr, base, idx, mask, value, clip_lo, clip_hi, HAS_GY: tl.constexpr, HAS_CLIP: tl.constexpr):
    """The gradient of x_prev at elements idx, through the x_t clip of `value` (its input)."""
    if HAS_GY:
        g = tl.load(gy_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.zeros_like(value)
    if HAS_CLIP:
        g = _clamp_pass(value, clip_lo, clip_hi, g)
    return g


@triton.jit
def _load_values(x_ptr, mo_ptr, noise_ptr, grad_ptr, row, seed_ptr, step_ptr, b, idx, mask, numel, mo_stride,
                 METHOD: tl.constexpr, PREDICTION: tl.constexpr, VARIANCE_CODE: tl.constexpr,
                 CLIP_DENOISED: tl.constexpr, NOISE_MODE: tl.constexpr, EPS_FROM_X0: tl.constexpr,
                 HAS_GRAD: tl.constexpr, NOISE_SRC: tl.constexpr, TILE_NOISE: tl.constexpr, q, lane):
    """The inputs and forward values of elements idx: (x, pred, var_out, grad, z, x_new, x_det, x0)."""
    x, pred, var_out, grad, z = _load_inputs(x_ptr, mo_ptr, noise_ptr, grad_ptr, seed_ptr, step_ptr, b, idx, mask,
                                             numel, mo_stride, METHOD == DDPM and VARIANCE_CODE >= LEARNED_RANGE,
                                             HAS_GRAD, NOISE_SRC, TILE_NOISE, q, lane)
    x_det, x0, scale = _step_values(x, pred, var_out, grad, row, METHOD, PREDICTION, VARIANCE_CODE, CLIP_DENOISED,
                                    NOISE_MODE, EPS_FROM_X0, HAS_GRAD)
    if NOISE_SRC == NOISE_NONE:
        x_new = x_det
    else:
        x_new = x_det + scale * z
    return x, pred, var_out, grad, z, x_new, x_det, x0


@triton.jit
def _store_grads(gx_ptr, gmo_ptr, gguide_ptr, b, idx, mask, numel, mo_stride, g_x, g_pred, g_var, g_guide,
                 READ_VAR: tl.constexpr, HAS_GRAD: tl.constexpr):
    base = b.to(tl.int64) * numel
    mo_base = b.to(tl.int64) * mo_stride
    tl.store(gx_ptr + base + idx, g_x.to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(gmo_ptr + mo_base + idx, g_pred.to(gmo_ptr.dtype.element_ty), mask=mask)
    if READ_VAR:
        tl.store(gmo_ptr + mo_base + numel + idx, g_var.to(gmo_ptr.dtype.element_ty), mask=mask)
    if HAS_GRAD:
        tl.store(gguide_ptr + base + idx, g_guide.to(gguide_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(x_ptr, mo_ptr, noise_ptr, grad_ptr, coef_ptr, seed_ptr, step_ptr, gy_ptr, gx0_ptr,
                     gx_ptr, gmo_ptr, gguide_ptr, partial_ptr, numel, mo_stride, clip_lo, clip_hi, n_chunks,
                     METHOD: tl.constexpr, PREDICTION: tl.constexpr, VARIANCE_CODE: tl.constexpr,
                     CLIP_DENOISED: tl.constexpr, NOISE_MODE: tl.constexpr, EPS_FROM_X0: tl.constexpr,
                     HAS_GRAD: tl.constexpr, NOISE_SRC: tl.constexpr, HAS_CLIP: tl.constexpr,
                     HAS_GY: tl.constexpr, HAS_GX0: tl.constexpr, MODE: tl.constexpr, BLOCK_Q: tl.constexpr,
                     PARTIALS: tl.constexpr):
    """No projection (MODE PLAIN) or the passes of the sample projection (STATS, SUMS, APPLY;
    partial_ptr: (B, n_chunks, 3) sums |x_det - x0|^2, |x_new - x0|^2, S). Program chunk + b * n_chunks."""
    pid = tl.program_id(0)
    b = pid // n_chunks
    chunk = pid - b * n_chunks
    q = chunk * BLOCK_Q + tl.arange(0, BLOCK_Q)
    lane = tl.arange(0, 4)
    idx = q[:, None] * 4 + lane[None, :]
    mask = idx < numel
    row = coef_ptr + b * NUM_COEFS
    base = b.to(tl.int64) * numel
    x, pred, var_out, grad, z, x_new, x_det, x0 = _load_values(
        x_ptr, mo_ptr, noise_ptr, grad_ptr, row, seed_ptr, step_ptr, b, idx, mask, numel, mo_stride, METHOD,
        PREDICTION, VARIANCE_CODE, CLIP_DENOISED, NOISE_MODE, EPS_FROM_X0, HAS_GRAD, NOISE_SRC, True, q, lane)
    e = tl.where(mask, x_new - x0, 0.0)
    d = tl.where(mask, x_det - x0, 0.0)
    if MODE == STATS:
        slot = partial_ptr + (b * n_chunks + chunk) * 3
        tl.store(slot, tl.sum(tl.sum(d * d, axis=1), axis=0))
        tl.store(slot + 1, tl.sum(tl.sum(e * e, axis=1), axis=0))
        if not HAS_CLIP:
            gout = _gout(gy_ptr, base, idx, mask, x_new, clip_lo, clip_hi, HAS_GY, False)
            tl.store(slot + 2, tl.sum(tl.sum(gout * e, axis=1), axis=0))
    elif MODE == SUMS:
        factor = _projection_factor(_sample_sum(partial_ptr, b, n_chunks, 0, 3, PARTIALS),
                                    _sample_sum(partial_ptr, b, n_chunks, 1, 3, PARTIALS))
        gout = _gout(gy_ptr, base, idx, mask, x0 + factor * e, clip_lo, clip_hi, HAS_GY, HAS_CLIP)
        tl.store(partial_ptr + (b * n_chunks + chunk) * 3 + 2, tl.sum(tl.sum(gout * e, axis=1), axis=0))
    else:
        if HAS_GX0:
            g_x0 = tl.load(gx0_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        else:
            g_x0 = tl.zeros_like(x)
        if MODE == APPLY:
            factor, along_e, along_d = _projection_grad_coefs(_sample_sum(partial_ptr, b, n_chunks, 0, 3, PARTIALS),
                                                              _sample_sum(partial_ptr, b, n_chunks, 1, 3, PARTIALS),
                                                              _sample_sum(partial_ptr, b, n_chunks, 2, 3, PARTIALS))
            gout = _gout(gy_ptr, base, idx, mask, x0 + factor * e, clip_lo, clip_hi, HAS_GY, HAS_CLIP)
            g_e = factor * gout - along_e * e
            g_d = along_d * d
            g_new = g_e
            g_det = g_d
            g_x0 = g_x0 + gout - g_e - g_d
        else:
            g_new = _gout(gy_ptr, base, idx, mask, x_new, clip_lo, clip_hi, HAS_GY, HAS_CLIP)
            g_det = tl.zeros_like(x)
        g_x, g_pred, g_var, g_guide = _step_grads(x, pred, var_out, grad, z, g_new, g_det, g_x0, row, METHOD,
                                                  PREDICTION, VARIANCE_CODE, CLIP_DENOISED, NOISE_MODE,
                                                  EPS_FROM_X0, HAS_GRAD, NOISE_SRC != NOISE_NONE)
        _store_grads(gx_ptr, gmo_ptr, gguide_ptr, b, idx, mask, numel, mo_stride, g_x, g_pred, g_var, g_guide,
                     METHOD == DDPM and VARIANCE_CODE >= LEARNED_RANGE, HAS_GRAD)


@triton.jit
def _pixel_backward_kernel(x_ptr, mo_ptr, noise_ptr, grad_ptr, coef_ptr, seed_ptr, step_ptr, gy_ptr, gx0_ptr,
                           gx_ptr, gmo_ptr, gguide_ptr, numel, mo_stride, pixels, channels, clip_lo, clip_hi,
                           n_blocks, METHOD: tl.constexpr, PREDICTION: tl.constexpr,
                           VARIANCE_CODE: tl.constexpr, CLIP_DENOISED: tl.constexpr, NOISE_MODE: tl.constexpr,
                           EPS_FROM_X0: tl.constexpr, HAS_GRAD: tl.constexpr, NOISE_SRC: tl.constexpr,
                           HAS_CLIP: tl.constexpr, HAS_GY: tl.constexpr, HAS_GX0: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The pixel projection's backward on a (channels, BLOCK_P pixels) tile. Program block + b * n_blocks."""
    pid = tl.program_id(0)
    b = pid // n_blocks
    p = (pid - b * n_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    idx = c[:, None] * pixels + p[None, :]
    mask = (c[:, None] < channels) & (p[None, :] < pixels)
    row = coef_ptr + b * NUM_COEFS
    base = b.to(tl.int64) * numel
    x, pred, var_out, grad, z, x_new, x_det, x0 = _load_values(
        x_ptr, mo_ptr, noise_ptr, grad_ptr, row, seed_ptr, step_ptr, b, idx, mask, numel, mo_stride, METHOD,
        PREDICTION, VARIANCE_CODE, CLIP_DENOISED, NOISE_MODE, EPS_FROM_X0, HAS_GRAD, NOISE_SRC, False, p, c)
    e = tl.where(mask, x_new - x0, 0.0)
    d = tl.where(mask, x_det - x0, 0.0)
    radius2 = tl.sum(d * d, axis=0)
    length2 = tl.sum(e * e, axis=0)
    factor = _projection_factor(radius2, length2)[None, :]
    gout = _gout(gy_ptr, base, idx, mask, x0 + factor * e, clip_lo, clip_hi, HAS_GY, HAS_CLIP)
    gout = tl.where(mask, gout, 0.0)
    factor, along_e, along_d = _projection_grad_coefs(radius2, length2, tl.sum(gout * e, axis=0))
    if HAS_GX0:
        g_x0 = tl.load(gx0_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        g_x0 = tl.zeros_like(x)
    g_e = factor[None, :] * gout - along_e[None, :] * e
    g_d = along_d[None, :] * d
    g_x, g_pred, g_var, g_guide = _step_grads(x, pred, var_out, grad, z, g_e, g_d, g_x0 + gout - g_e - g_d, row,
                                              METHOD, PREDICTION, VARIANCE_CODE, CLIP_DENOISED, NOISE_MODE,
                                              EPS_FROM_X0, HAS_GRAD, NOISE_SRC != NOISE_NONE)
    _store_grads(gx_ptr, gmo_ptr, gguide_ptr, b, idx, mask, numel, mo_stride, g_x, g_pred, g_var, g_guide,
                 METHOD == DDPM and VARIANCE_CODE >= LEARNED_RANGE, HAS_GRAD)


@torch.library.custom_op("ddpm_fast::diffusion_step_backward_triton", mutates_args=())
def diffusion_step_backward(grad_x_prev: torch.Tensor | None, grad_x0: torch.Tensor | None, x: torch.Tensor,
                            model_output: torch.Tensor, coef: torch.Tensor, noise: torch.Tensor | None,
                            seed: torch.Tensor | None, step: torch.Tensor | None,
                            guidance_grad: torch.Tensor | None, method: int, prediction: int, variance: int,
                            clip_denoised: bool, noise_mode: int, project_noise: int, clip_lo: float | None,
                            clip_hi: float | None,
                            eps_from_x0: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract of torch.ops.ddpm_fast.diffusion_step_backward (csrc/ops.cpp) in Triton:
    (grad_x, grad_model_output, grad_guidance_grad or an empty tensor), each in its input's dtype."""
    batch, channels = x.shape[:2]
    numel = math.prod(x.shape[1:])
    pixels = numel // channels if channels else 0
    check_sample_numel("x (with model_output's variance channels)",
                       numel * (2 if model_output.shape[1] != channels else 1))
    read_var = method == DDPM.value and variance >= LEARNED_RANGE.value
    with device_guard(x):
        x_c = x.contiguous()
        mo = model_output.contiguous()
        coef32 = coef.to(torch.float32).contiguous()
        g_x = torch.empty_like(x_c)
        # model_output's variance channels get 0 unless the kernel writes them (read_var)
        g_mo = (torch.zeros_like(mo) if mo.shape[1] != channels and not read_var else torch.empty_like(mo))
        g_guide = (torch.empty_like(guidance_grad, memory_format=torch.contiguous_format)
                   if guidance_grad is not None else x.new_empty((0,)))
        if batch == 0 or numel == 0:
            return g_x, g_mo, g_guide
        noise_src = NOISE_DRAWN if seed is not None else (NOISE_GIVEN if noise is not None else NOISE_NONE)
        has_clip = clip_lo is not None
        options = dict(METHOD=method, PREDICTION=prediction, VARIANCE_CODE=variance,
                       CLIP_DENOISED=clip_denoised, NOISE_MODE=noise_mode, EPS_FROM_X0=eps_from_x0,
                       HAS_GRAD=guidance_grad is not None, NOISE_SRC=noise_src.value, HAS_CLIP=has_clip,
                       HAS_GY=grad_x_prev is not None, HAS_GX0=grad_x0 is not None)
        pointers = (x_c, mo,
                    noise.contiguous() if noise is not None else x_c,
                    guidance_grad.contiguous() if guidance_grad is not None else x_c,
                    coef32,
                    seed.contiguous() if seed is not None else coef32,
                    step if step is not None else coef32,
                    grad_x_prev.contiguous() if grad_x_prev is not None else x_c,
                    grad_x0.contiguous() if grad_x0 is not None else x_c,
                    g_x, g_mo, g_guide if guidance_grad is not None else g_x)
        lo = float(clip_lo) if has_clip else 0.0
        hi = float(clip_hi) if has_clip else 0.0
        mo_stride = mo.shape[1] * pixels
        if project_noise == PROJECT_PIXEL:
            block_c = triton.next_power_of_2(channels)
            block_p = max(1, min(256, PIXEL_TILE // block_c))
            blocks = triton.cdiv(pixels, block_p)
            grid = check_grid("x", (blocks * batch,))
            _pixel_backward_kernel[grid](*pointers, numel, mo_stride, pixels, channels, lo, hi, blocks,
                                         BLOCK_C=block_c, BLOCK_P=block_p, **options)
            return g_x, g_mo, g_guide
        chunks = triton.cdiv(numel, 4 * BLOCK_Q)
        grid = check_grid("x", (chunks * batch,))
        sizes = (numel, mo_stride, lo, hi, chunks)
        if project_noise == PROJECT_SAMPLE:
            partial = torch.empty((batch, chunks, 3), dtype=torch.float32, device=x.device)
            partials = min(PARTIALS_MAX, triton.next_power_of_2(chunks))
            for mode in ((STATS, SUMS, APPLY) if has_clip else (STATS, APPLY)):
                _backward_kernel[grid](*pointers, partial, *sizes, MODE=mode.value, BLOCK_Q=BLOCK_Q,
                                       PARTIALS=partials, **options)
        else:
            _backward_kernel[grid](*pointers, None, *sizes, MODE=PLAIN.value, BLOCK_Q=BLOCK_Q, PARTIALS=1,
                                   **options)
    return g_x, g_mo, g_guide


diffusion_step_backward.register_fake(fake_backward)
register_autograd("ddpm_fast::diffusion_step_triton", diffusion_step_backward)
