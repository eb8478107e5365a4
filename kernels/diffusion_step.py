"""Triton kernel of ddpm_fast::diffusion_step (definition: ddpm_fast/reference.py diffusion_step).

The same contract as the C++ op (csrc/ops.cpp), registered as the custom op
ddpm_fast::diffusion_step_triton. Options are tl.constexpr (one compiled variant per combination
used). Coefficient columns and option codes mirror ddpm_fast/step_layout.py; the noise is the
construction of ddpm_fast/philox.py (Philox4x32-10 rounds written out with tl.umulhi, Box-Muller
with tl.log / tl.sqrt / tl.cos / tl.sin).

Programs: one grid axis, (programs per sample) x B, program i + b * (programs per sample). No
projection and "sample" handle BLOCK_Q Philox blocks = 4 * BLOCK_Q consecutive elements of one
sample as a (BLOCK_Q, 4) tile (the 4 lanes of a Philox block side by side). "sample" runs two
kernels: partial sums per program, then each program reduces its sample's partials (in a fixed
order) and recomputes its tile. "pixel" handles BLOCK_P pixels x all channels as a (C, BLOCK_P)
tile (norms over axis 0, BLOCK_C * BLOCK_P <= PIXEL_TILE); its noise evaluates one Philox block
per element. A sample's base offset is 64-bit, offsets inside a sample 32-bit (checked). Launches
run under x's device guard.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ddpm_fast import step_layout as layout
from ddpm_fast.philox import NOISE_STREAM

from ._launch import check_grid, check_sample_numel, device_guard

# ---- ddpm_fast/step_layout.py as Triton constants ----------------------------------------------------
# A global a @triton.jit function reads must be a tl.constexpr *instance*: the code generator rejects
# plain Python ints and the `NAME: tl.constexpr = value` annotation form (the interpreter accepts
# both, so only a GPU compile -- tests/test_offline_compile.py -- sees the difference).
SQRT_RECIP_AB = tl.constexpr(layout.SQRT_RECIP_AB)
SQRT_RECIPM1_AB = tl.constexpr(layout.SQRT_RECIPM1_AB)
SQRT_AB = tl.constexpr(layout.SQRT_AB)
SQRT_1M_AB = tl.constexpr(layout.SQRT_1M_AB)
POST_COEF1 = tl.constexpr(layout.POST_COEF1)
POST_COEF2 = tl.constexpr(layout.POST_COEF2)
LOG_VAR_MIN = tl.constexpr(layout.LOG_VAR_MIN)
LOG_VAR_MAX = tl.constexpr(layout.LOG_VAR_MAX)
VARIANCE = tl.constexpr(layout.VARIANCE)
SQRT_AB_PREV = tl.constexpr(layout.SQRT_AB_PREV)
DDIM_DIR = tl.constexpr(layout.DDIM_DIR)
DDIM_SIGMA = tl.constexpr(layout.DDIM_SIGMA)
NONZERO = tl.constexpr(layout.NONZERO)
NUM_COEFS = tl.constexpr(layout.NUM_COEFS)
# option codes: index in step_layout's METHODS, PREDICTIONS, VARIANCES, NOISE_MODES, PROJECTIONS
DDPM = tl.constexpr(layout.METHODS.index("ddpm"))
EPSILON = tl.constexpr(layout.PREDICTIONS.index("epsilon"))
PRED_V = tl.constexpr(layout.PREDICTIONS.index("v"))
FIXED_SMALL = tl.constexpr(layout.VARIANCES.index("fixed_small"))
FIXED_LARGE = tl.constexpr(layout.VARIANCES.index("fixed_large"))
LEARNED_RANGE = tl.constexpr(layout.VARIANCES.index("learned_range"))
NOISE_NORMAL = tl.constexpr(layout.NOISE_MODES.index("normal"))
NOISE_SQUARED = tl.constexpr(layout.NOISE_MODES.index("squared"))
PROJECT_PIXEL = layout.PROJECTIONS.index("pixel")    # launcher-side only
PROJECT_SAMPLE = layout.PROJECTIONS.index("sample")
# where the noise comes from (launcher-side codes, kernel constexpr NOISE_SRC)
NOISE_NONE = tl.constexpr(0)
NOISE_GIVEN = tl.constexpr(1)
NOISE_DRAWN = tl.constexpr(2)
# kernel modes (constexpr MODE of _step_kernel)
PLAIN = tl.constexpr(0)
STATS = tl.constexpr(1)
APPLY = tl.constexpr(2)

STREAM = tl.constexpr(NOISE_STREAM)


# ---- noise: ddpm_fast/philox.py's construction -------------------------------------------------------
@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Random123's Philox4x32-10 on uint32 counters (c0..c3) with a uint32 key (k0, k1)."""
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(0xCD9E8D57, a2) ^ c1 ^ k0
        c2 = tl.umulhi(0xD2511F53, a0) ^ c3 ^ k1
        c1 = tl.mul(a2, 0xCD9E8D57, sanitize_overflow=False)
        c3 = tl.mul(a0, 0xD2511F53, sanitize_overflow=False)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _uniform(r):
    """uint32 -> (floor(r / 2^9) + 1/2) / 2^23 in (0, 1)."""
    return ((r >> 9).to(tl.int32).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def _key_and_step(seed_ptr, step_ptr, b):
    seed = tl.load(seed_ptr + b)
    step = tl.load(step_ptr)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    s0 = (step & 0xFFFFFFFF).to(tl.uint32)
    s1 = ((step >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return k0, k1, s0, s1


@triton.jit
def _philox_words(block, k0, k1, s0, s1):
    """The 4 output words of the Philox blocks `block` (uint32 tensor) of one sample and step."""
    zero = block * 0
    return _philox4x32_10(block, zero + s0, zero + s1, zero + STREAM, k0, k1)


@triton.jit
def _box_muller(radius_bits, angle_bits):
    radius = tl.sqrt(-2.0 * tl.log(_uniform(radius_bits)))
    angle = 6.283185307179586 * _uniform(angle_bits)
    return radius * tl.cos(angle), radius * tl.sin(angle)


@triton.jit
def _normals_tile(q, lane, k0, k1, s0, s1):
    """(BLOCK_Q, 4) normals of elements 4 q + lane (one Philox block per row)."""
    r0, r1, r2, r3 = _philox_words(q.to(tl.uint32), k0, k1, s0, s1)
    za_cos, za_sin = _box_muller(r0, r1)
    zb_cos, zb_sin = _box_muller(r2, r3)
    lane = lane[None, :]
    return tl.where(lane == 0, za_cos[:, None],
                    tl.where(lane == 1, za_sin[:, None],
                             tl.where(lane == 2, zb_cos[:, None], zb_sin[:, None])))


@triton.jit
def _normals_at(idx, k0, k1, s0, s1):
    """Normals of arbitrary element indices (int tensor): one Philox block per element."""
    r0, r1, r2, r3 = _philox_words((idx >> 2).to(tl.uint32), k0, k1, s0, s1)
    lane = idx & 3
    z_cos, z_sin = _box_muller(tl.where(lane < 2, r0, r2), tl.where(lane < 2, r1, r3))
    return tl.where((lane & 1) == 0, z_cos, z_sin)


# ---- the step math: ddpm_fast/reference.py diffusion_step per element ----------------------------------
@triton.jit
def _step_values(x, pred, var_out, grad, row, METHOD: tl.constexpr, PREDICTION: tl.constexpr,
                 VARIANCE_CODE: tl.constexpr, CLIP_DENOISED: tl.constexpr, NOISE_MODE: tl.constexpr,
                 EPS_FROM_X0: tl.constexpr, HAS_GRAD: tl.constexpr):
    """(x_det, x0, scale): x_new = x_det + scale * z before projection and clip."""
    c_recip = tl.load(row + SQRT_RECIP_AB)
    c_recipm1 = tl.load(row + SQRT_RECIPM1_AB)
    c_ab = tl.load(row + SQRT_AB)
    c_1m_ab = tl.load(row + SQRT_1M_AB)
    if PREDICTION == EPSILON:
        x0_raw = c_recip * x - c_recipm1 * pred
    elif PREDICTION == PRED_V:
        x0_raw = c_ab * x - c_1m_ab * pred
    else:
        x0_raw = pred
    if CLIP_DENOISED:
        x0 = tl.minimum(tl.maximum(x0_raw, -1.0), 1.0)
    else:
        x0 = x0_raw
    if METHOD == DDPM:
        mean = tl.load(row + POST_COEF1) * x0 + tl.load(row + POST_COEF2) * x
        if VARIANCE_CODE == FIXED_SMALL or VARIANCE_CODE == FIXED_LARGE:
            if HAS_GRAD:
                mean = mean + tl.load(row + VARIANCE) * grad
            std = tl.exp(0.5 * tl.load(row + LOG_VAR_MIN))
        else:
            if VARIANCE_CODE == LEARNED_RANGE:
                frac = (var_out + 1.0) / 2.0
                log_var = frac * tl.load(row + LOG_VAR_MAX) + (1.0 - frac) * tl.load(row + LOG_VAR_MIN)
            else:
                log_var = var_out
            if HAS_GRAD:
                mean = mean + tl.exp(log_var) * grad
            std = tl.exp(0.5 * log_var)
        x_det = mean
    else:
        if HAS_GRAD:
            eps = (c_recip * x - x0) / c_recipm1 - c_1m_ab * grad
            x0 = c_recip * x - c_recipm1 * eps
        elif EPS_FROM_X0:
            eps = (c_recip * x - x0) / c_recipm1
        elif PREDICTION == EPSILON:
            eps = pred
        elif PREDICTION == PRED_V:
            eps = c_ab * pred + c_1m_ab * x
        else:
            eps = (c_recip * x - x0_raw) / c_recipm1
        x_det = tl.load(row + SQRT_AB_PREV) * x0 + tl.load(row + DDIM_DIR) * eps
        std = tl.load(row + DDIM_SIGMA)
    nonzero = tl.load(row + NONZERO)
    if NOISE_MODE == NOISE_NORMAL:
        scale = std * nonzero
    elif NOISE_MODE == NOISE_SQUARED:
        scale = (std * std) * nonzero
    else:
        scale = 0.0
    return x_det, x0, scale


@triton.jit
def _load_inputs(x_ptr, mo_ptr, noise_ptr, grad_ptr, seed_ptr, step_ptr, b, idx, mask, numel, mo_stride,
                 READ_VAR: tl.constexpr, HAS_GRAD: tl.constexpr, NOISE_SRC: tl.constexpr,
                 TILE_NOISE: tl.constexpr, q, lane):
    """Elements idx of sample b in float32: (x, pred, var_out, grad, z). var_out (read with
    READ_VAR) and grad (with HAS_GRAD) are x when not read; z is 0 without noise. TILE_NOISE: idx
    is the (BLOCK_Q, 4) tile 4 q + lane."""
    base = b.to(tl.int64) * numel
    mo_base = b.to(tl.int64) * mo_stride
    x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    pred = tl.load(mo_ptr + mo_base + idx, mask=mask, other=0.0).to(tl.float32)
    if READ_VAR:
        var_out = tl.load(mo_ptr + mo_base + numel + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        var_out = x  # not read
    if HAS_GRAD:
        grad = tl.load(grad_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        grad = x  # not read
    if NOISE_SRC == NOISE_GIVEN:
        z = tl.load(noise_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    elif NOISE_SRC == NOISE_DRAWN:
        k0, k1, s0, s1 = _key_and_step(seed_ptr, step_ptr, b)
        if TILE_NOISE:
            z = _normals_tile(q, lane, k0, k1, s0, s1)
        else:
            z = _normals_at(idx, k0, k1, s0, s1)
    else:
        z = tl.zeros_like(x)
    return x, pred, var_out, grad, z


@triton.jit
def _load_step(x_ptr, mo_ptr, noise_ptr, grad_ptr, coef_ptr, seed_ptr, step_ptr, b, idx, mask, numel,
               mo_stride, METHOD: tl.constexpr, PREDICTION: tl.constexpr, VARIANCE_CODE: tl.constexpr,
               CLIP_DENOISED: tl.constexpr, NOISE_MODE: tl.constexpr, EPS_FROM_X0: tl.constexpr,
               HAS_GRAD: tl.constexpr, NOISE_SRC: tl.constexpr, TILE_NOISE: tl.constexpr, q, lane):
    """Loads elements idx of sample b and returns (x_new, x_det, x0) in float32 (before projection
    and clip). TILE_NOISE: idx is the (BLOCK_Q, 4) tile 4 q + lane."""
    x, pred, var_out, grad, z = _load_inputs(x_ptr, mo_ptr, noise_ptr, grad_ptr, seed_ptr, step_ptr, b, idx, mask,
                                             numel, mo_stride, METHOD == DDPM and VARIANCE_CODE >= LEARNED_RANGE,
                                             HAS_GRAD, NOISE_SRC, TILE_NOISE, q, lane)
    x_det, x0, scale = _step_values(x, pred, var_out, grad, coef_ptr + b * NUM_COEFS, METHOD, PREDICTION,
                                    VARIANCE_CODE, CLIP_DENOISED, NOISE_MODE, EPS_FROM_X0, HAS_GRAD)
    if NOISE_SRC == NOISE_NONE:
        x_new = x_det
    else:
        x_new = x_det + scale * z
    return x_new, x_det, x0


@triton.jit
def _projection_factor(radius2, length2):
    """x0 + factor (x_new - x0) lies at distance sqrt(radius2) from x0 (0 where length2 is 0)."""
    return tl.where(length2 > 0, tl.sqrt(radius2) / tl.sqrt(tl.where(length2 > 0, length2, 1.0)), 0.0)


@triton.jit
def _sample_sum(partial_ptr, b, n_chunks, SLOT: tl.constexpr, SLOTS: tl.constexpr, PARTIALS: tl.constexpr):
    """Sum of slot SLOT of sample b's n_chunks partial rows (partial_ptr: (B, n_chunks, SLOTS)
    float32), PARTIALS at a time: a fixed order, the same on every run and in every program."""
    j = tl.arange(0, PARTIALS)
    acc = tl.zeros([PARTIALS], tl.float32)
    for j0 in range(0, n_chunks, PARTIALS):
        valid = j0 + j < n_chunks
        acc += tl.load(partial_ptr + (b * n_chunks + j0 + j) * SLOTS + SLOT, mask=valid, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _clip(v, clip_lo, clip_hi, HAS_CLIP: tl.constexpr):
    if HAS_CLIP:
        v = tl.minimum(tl.maximum(v, clip_lo), clip_hi)
    return v


@triton.jit
def _step_kernel(x_ptr, mo_ptr, noise_ptr, grad_ptr, coef_ptr, seed_ptr, step_ptr, out_ptr, x0_ptr,
                 partial_ptr, numel, mo_stride, clip_lo, clip_hi, n_chunks,
                 METHOD: tl.constexpr, PREDICTION: tl.constexpr, VARIANCE_CODE: tl.constexpr,
                 CLIP_DENOISED: tl.constexpr, NOISE_MODE: tl.constexpr, EPS_FROM_X0: tl.constexpr,
                 HAS_GRAD: tl.constexpr, NOISE_SRC: tl.constexpr, HAS_CLIP: tl.constexpr,
                 RETURN_X0: tl.constexpr, MODE: tl.constexpr, BLOCK_Q: tl.constexpr,
                 PARTIALS: tl.constexpr):
    """No projection (MODE PLAIN) or the two passes of the sample projection (STATS, APPLY).
    Program chunk + b * n_chunks (one grid axis: a batch never meets axis 1's 65535 limit)."""
    pid = tl.program_id(0)
    b = pid // n_chunks
    chunk = pid - b * n_chunks
    q = chunk * BLOCK_Q + tl.arange(0, BLOCK_Q)
    lane = tl.arange(0, 4)
    idx = q[:, None] * 4 + lane[None, :]
    mask = idx < numel
    x_new, x_det, x0 = _load_step(x_ptr, mo_ptr, noise_ptr, grad_ptr, coef_ptr, seed_ptr, step_ptr, b, idx,
                                  mask, numel, mo_stride, METHOD, PREDICTION, VARIANCE_CODE, CLIP_DENOISED,
                                  NOISE_MODE, EPS_FROM_X0, HAS_GRAD, NOISE_SRC, True, q, lane)
    if MODE == STATS:
        d = tl.where(mask, x_det - x0, 0.0)
        e = tl.where(mask, x_new - x0, 0.0)
        slot = partial_ptr + (b * n_chunks + chunk) * 2
        tl.store(slot, tl.sum(tl.sum(d * d, axis=1), axis=0))
        tl.store(slot + 1, tl.sum(tl.sum(e * e, axis=1), axis=0))
    else:
        if MODE == APPLY:
            radius2 = _sample_sum(partial_ptr, b, n_chunks, 0, 2, PARTIALS)
            length2 = _sample_sum(partial_ptr, b, n_chunks, 1, 2, PARTIALS)
            x_new = x0 + _projection_factor(radius2, length2) * (x_new - x0)
        base = b.to(tl.int64) * numel
        tl.store(out_ptr + base + idx, _clip(x_new, clip_lo, clip_hi, HAS_CLIP).to(out_ptr.dtype.element_ty),
                 mask=mask)
        if RETURN_X0:
            tl.store(x0_ptr + base + idx, x0.to(x0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pixel_kernel(x_ptr, mo_ptr, noise_ptr, grad_ptr, coef_ptr, seed_ptr, step_ptr, out_ptr, x0_ptr,
                  numel, mo_stride, pixels, channels, clip_lo, clip_hi, n_blocks,
                  METHOD: tl.constexpr, PREDICTION: tl.constexpr, VARIANCE_CODE: tl.constexpr,
                  CLIP_DENOISED: tl.constexpr, NOISE_MODE: tl.constexpr, EPS_FROM_X0: tl.constexpr,
                  HAS_GRAD: tl.constexpr, NOISE_SRC: tl.constexpr, HAS_CLIP: tl.constexpr,
                  RETURN_X0: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The pixel projection: a (channels, BLOCK_P pixels) tile, norms over the channels.
    Program block + b * n_blocks."""
    pid = tl.program_id(0)
    b = pid // n_blocks
    p = (pid - b * n_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    idx = c[:, None] * pixels + p[None, :]
    mask = (c[:, None] < channels) & (p[None, :] < pixels)
    x_new, x_det, x0 = _load_step(x_ptr, mo_ptr, noise_ptr, grad_ptr, coef_ptr, seed_ptr, step_ptr, b, idx,
                                  mask, numel, mo_stride, METHOD, PREDICTION, VARIANCE_CODE, CLIP_DENOISED,
                                  NOISE_MODE, EPS_FROM_X0, HAS_GRAD, NOISE_SRC, False, p, c)
    d = tl.where(mask, x_det - x0, 0.0)
    e = tl.where(mask, x_new - x0, 0.0)
    factor = _projection_factor(tl.sum(d * d, axis=0), tl.sum(e * e, axis=0))
    result = x0 + factor[None, :] * (x_new - x0)
    base = b.to(tl.int64) * numel
    tl.store(out_ptr + base + idx, _clip(result, clip_lo, clip_hi, HAS_CLIP).to(out_ptr.dtype.element_ty),
             mask=mask)
    if RETURN_X0:
        tl.store(x0_ptr + base + idx, x0.to(x0_ptr.dtype.element_ty), mask=mask)


BLOCK_Q = 256       # Philox blocks (x 4 elements) per program
PIXEL_TILE = 1024   # elements of the pixel projection's (BLOCK_C, BLOCK_P) tile: BLOCK_P = 256 up to 4 channels
PARTIALS_MAX = 1024  # partial sums a program of the sample projection's APPLY pass reads at a time


@torch.library.custom_op("ddpm_fast::diffusion_step_triton", mutates_args=())
def diffusion_step(x: torch.Tensor, model_output: torch.Tensor, coef: torch.Tensor,
                   noise: torch.Tensor | None, seed: torch.Tensor | None, step: torch.Tensor | None,
                   guidance_grad: torch.Tensor | None, method: int, prediction: int, variance: int,
                   clip_denoised: bool, noise_mode: int, project_noise: int, clip_lo: float | None,
                   clip_hi: float | None, eps_from_x0: bool, return_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract of torch.ops.ddpm_fast.diffusion_step (csrc/ops.cpp) in Triton; arguments are
    checked by ddpm_fast.ops.diffusion_step. Returns (x_prev, pred_x0 or an empty tensor).
    Runs on x's device (its device guard), one grid axis of (programs per sample) x B."""
    batch, channels = x.shape[:2]
    numel = math.prod(x.shape[1:])
    pixels = numel // channels if channels else 0
    check_sample_numel("x (with model_output's variance channels)", numel * (2 if model_output.shape[1] != channels else 1))
    with device_guard(x):
        x_c = x.contiguous()
        mo = model_output.contiguous()
        coef32 = coef.to(torch.float32).contiguous()
        out = torch.empty_like(x_c)
        x0 = torch.empty_like(x_c) if return_x0 else x.new_empty((0,))
        if batch == 0 or numel == 0:
            return out, x0
        noise_c = noise.contiguous() if noise is not None else x_c
        grad_c = guidance_grad.contiguous() if guidance_grad is not None else x_c
        seed_c = seed.contiguous() if seed is not None else coef32
        step_c = step if step is not None else coef32
        noise_src = NOISE_DRAWN if seed is not None else (NOISE_GIVEN if noise is not None else NOISE_NONE)
        has_clip = clip_lo is not None
        options = dict(METHOD=method, PREDICTION=prediction, VARIANCE_CODE=variance,
                       CLIP_DENOISED=clip_denoised, NOISE_MODE=noise_mode, EPS_FROM_X0=eps_from_x0,
                       HAS_GRAD=guidance_grad is not None, NOISE_SRC=noise_src.value, HAS_CLIP=has_clip,
                       RETURN_X0=return_x0)
        lo = float(clip_lo) if has_clip else 0.0
        hi = float(clip_hi) if has_clip else 0.0
        x0_arg = x0 if return_x0 else out
        pointers = (x_c, mo, noise_c, grad_c, coef32, seed_c, step_c, out, x0_arg)
        if project_noise == PROJECT_PIXEL:
            block_c = triton.next_power_of_2(channels)
            block_p = max(1, min(256, PIXEL_TILE // block_c))
            blocks = triton.cdiv(pixels, block_p)
            grid = check_grid("x", (blocks * batch,))
            _pixel_kernel[grid](*pointers, numel, mo.shape[1] * pixels, pixels, channels, lo, hi, blocks,
                                BLOCK_C=block_c, BLOCK_P=block_p, **options)
            return out, x0
        chunks = triton.cdiv(numel, 4 * BLOCK_Q)
        grid = check_grid("x", (chunks * batch,))
        sizes = (numel, mo.shape[1] * pixels, lo, hi, chunks)
        if project_noise == PROJECT_SAMPLE:
            partial = torch.empty((batch, chunks, 2), dtype=torch.float32, device=x.device)
            for mode in (STATS, APPLY):
                _step_kernel[grid](*pointers, partial, *sizes, MODE=mode.value, BLOCK_Q=BLOCK_Q,
                                   PARTIALS=min(PARTIALS_MAX, triton.next_power_of_2(chunks)), **options)
        else:
            _step_kernel[grid](*pointers, None, *sizes, MODE=PLAIN.value, BLOCK_Q=BLOCK_Q, PARTIALS=1,
                               **options)
    return out, x0


@diffusion_step.register_fake
def _(x, model_output, coef, noise, seed, step, guidance_grad, method, prediction, variance, clip_denoised,
      noise_mode, project_noise, clip_lo, clip_hi, eps_from_x0, return_x0):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, (torch.empty_like(out) if return_x0 else x.new_empty((0,)))


# the backward kernels and this op's autograd (imported last: they use this module's kernels)
from . import diffusion_step_backward as _backward  # noqa: E402,F401
