"""Triton kernels of group_norm_scale_shift (ADM's AdaGN): GroupNorm(x) [* weight + bias]
[* (1 + scale) + shift] [then SiLU], statistics and arithmetic in fp32.

x is viewed as (N, C, P) with P the flattened spatial dims and strides (s_n, s_c, s_p): NCHW
(C*P, P, 1) or channels-last (P*C, 1, C); the output has x's layout. Two paths:

  * a group of at most FUSED_MAX_ELEMENTS values: one program per (n, group) loads the group once,
    computes its mean/variance and writes the result (one launch);
  * larger groups: `_moments_kernel` sums slices of each group (program (n*G + g, split)) into
    fp32 partial sums of values shifted by the group's first value, then `_apply_kernel` (program
    (n*G + g, pixel block)) adds the group's partials up and writes
    y = a * x + b (+ SiLU) with a, b folded per channel.

A sample's base offset n * s_n is 64-bit (batches past 2^31 elements), offsets inside a sample
32-bit (checked: at most 2^31 - 1 elements per sample); the launches run under x's device guard.

Registered as the torch.library op ddpm_fast::group_norm_scale_shift_triton (see OP_NAME below);
`group_norm_scale_shift` is what ddpm_fast.ops calls. With STATS the kernels also write each
group's mean and rstd: ddpm_fast::group_norm_scale_shift_stats_triton, which ddpm_fast.ops calls
under autograd (the backward: group_norm_scale_shift_backward.py). Runs on
CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.runtime.jit import JITFunction

from ddpm_fast.ops.group_norm_scale_shift import stats_like

from ._launch import check_grid, check_sample_numel, device_guard

FUSED_MAX_ELEMENTS = 4096  # largest (power-of-2 padded) group tile of the one-launch path
BLOCK_P_MAX = 1024         # pixels per tile in the two-kernel path
TILE_MAX = 4096            # elements per (BLOCK_C, BLOCK_P) tile


@triton.jit
def _coefficients(mean, rstd, w_ptr, b_ptr, scale_ptr, shift_ptr, n, cc, cmask, C,
                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_SHIFT: tl.constexpr):
    """Per-channel (a, b) with y = a * x + b == ((x - mean) * rstd * w + bias) * (1 + scale) + shift."""
    gain = tl.full(cc.shape, 1.0, tl.float32) * rstd
    if HAS_WEIGHT:
        gain = gain * tl.load(w_ptr + cc, mask=cmask, other=1.0).to(tl.float32)
    offset = -mean * gain
    if HAS_BIAS:
        offset = offset + tl.load(b_ptr + cc, mask=cmask, other=0.0).to(tl.float32)
    a = gain
    if HAS_SCALE:
        mod = 1.0 + tl.load(scale_ptr + n * C + cc, mask=cmask, other=0.0).to(tl.float32)
        a = a * mod
        offset = offset * mod
    if HAS_SHIFT:
        offset = offset + tl.load(shift_ptr + n * C + cc, mask=cmask, other=0.0).to(tl.float32)
    return a, offset


@triton.jit
def _finish(v, a, b, SILU: tl.constexpr):
    y = a[:, None] * v + b[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def _fused_kernel(x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
                  C, P, G, CG, s_n, s_c, s_p, eps,
                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, STATS: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (n*G + g): the whole group (CG <= BLOCK_C channels, P <= BLOCK_P pixels) at once.
    STATS: also writes the group's mean and rstd to mean_ptr[n*G + g], rstd_ptr[n*G + g]."""
    ng = tl.program_id(0)
    n = ng // G
    g = ng % G
    cj = tl.arange(0, BLOCK_C)
    pp = tl.arange(0, BLOCK_P)
    cc = g * CG + cj
    cmask = cj < CG
    mask = cmask[:, None] & (pp[None, :] < P)
    sample = n.to(tl.int64) * s_n
    offs = cc[:, None] * s_c + pp[None, :] * s_p
    v = tl.load(x_ptr + sample + offs, mask=mask, other=0.0).to(tl.float32)
    count = CG * P
    mean = tl.sum(tl.sum(v, axis=1), axis=0) / count
    d = tl.where(mask, v - mean, 0.0)
    var = tl.sum(tl.sum(d * d, axis=1), axis=0) / count
    rstd = 1.0 / tl.sqrt(var + eps)
    if STATS:
        tl.store(mean_ptr + ng, mean)
        tl.store(rstd_ptr + ng, rstd)
    a, b = _coefficients(mean, rstd, w_ptr, b_ptr, scale_ptr, shift_ptr, n, cc, cmask, C,
                         HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
    y = _finish(v, a, b, SILU)
    tl.store(y_ptr + sample + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _moments_kernel(x_ptr, partial_ptr, P, G, CG, s_n, s_c, s_p, SPLIT_P,
                    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (n*G + g, split): fp32 sums of (x - x0) and (x - x0)^2 over the group's channels
    and pixels [split * SPLIT_P, (split + 1) * SPLIT_P), x0 the group's first value.
    Writes partial[(n*G + g) * splits + split] = (s1, s2)."""
    ng = tl.program_id(0)
    split = tl.program_id(1)
    n = ng // G
    g = ng % G
    base = x_ptr + n.to(tl.int64) * s_n + g * CG * s_c
    x0 = tl.load(base).to(tl.float32)
    cj = tl.arange(0, BLOCK_C)
    pj = tl.arange(0, BLOCK_P)
    p_begin = split * SPLIT_P
    p_end = tl.minimum(P, p_begin + SPLIT_P)
    s1 = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    s2 = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for c0 in range(0, CG, BLOCK_C):
        cc = c0 + cj
        for p0 in range(p_begin, p_end, BLOCK_P):
            pp = p0 + pj
            mask = (cc[:, None] < CG) & (pp[None, :] < p_end)
            v = tl.load(base + cc[:, None] * s_c + pp[None, :] * s_p, mask=mask, other=0.0)
            d = tl.where(mask, v.to(tl.float32) - x0, 0.0)
            s1 += d
            s2 += d * d
    out = partial_ptr + (ng * tl.num_programs(1) + split) * 2
    tl.store(out, tl.sum(tl.sum(s1, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(s2, axis=1), axis=0))


@triton.jit
def _apply_kernel(x_ptr, y_ptr, partial_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
                  C, P, G, CG, s_n, s_c, s_p, SPLITS, eps,
                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, STATS: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (n*G + g, pixel block): group statistics from the partial sums, then the fused
    normalise + affine + scale-shift (+ SiLU) of the group's channels on BLOCK_P pixels.
    STATS: pixel block 0 also writes the group's mean and rstd (as _fused_kernel)."""
    ng = tl.program_id(0)
    pb = tl.program_id(1)
    n = ng // G
    g = ng % G
    s1 = tl.zeros([BLOCK_S], tl.float32)
    s2 = tl.zeros([BLOCK_S], tl.float32)
    sj = tl.arange(0, BLOCK_S)
    for s0 in range(0, SPLITS, BLOCK_S):
        smask = s0 + sj < SPLITS
        ptr = partial_ptr + (ng * SPLITS + s0 + sj) * 2
        s1 += tl.load(ptr, mask=smask, other=0.0)
        s2 += tl.load(ptr + 1, mask=smask, other=0.0)
    count = CG * P
    m_shifted = tl.sum(s1, axis=0) / count
    var = tl.maximum(tl.sum(s2, axis=0) / count - m_shifted * m_shifted, 0.0)
    sample = n.to(tl.int64) * s_n
    mean = tl.load(x_ptr + sample + g * CG * s_c).to(tl.float32) + m_shifted
    rstd = 1.0 / tl.sqrt(var + eps)
    if STATS:
        if pb == 0:
            tl.store(mean_ptr + ng, mean)
            tl.store(rstd_ptr + ng, rstd)
    cj = tl.arange(0, BLOCK_C)
    pp = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pp < P
    for c0 in range(0, CG, BLOCK_C):
        cmask = c0 + cj < CG
        cc = g * CG + c0 + cj
        a, b = _coefficients(mean, rstd, w_ptr, b_ptr, scale_ptr, shift_ptr, n, cc, cmask, C,
                             HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        mask = cmask[:, None] & pmask[None, :]
        offs = cc[:, None] * s_c + pp[None, :] * s_p
        v = tl.load(x_ptr + sample + offs, mask=mask, other=0.0).to(tl.float32)
        y = _finish(v, a, b, SILU)
        tl.store(y_ptr + sample + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _is_channels_last_dense(t: torch.Tensor) -> bool:
    """Dense with C innermost and the spatial dims row-major (NHWC, NDHWC, or (N, L, C) memory)."""
    expected = 1
    for d in [1, *range(t.dim() - 1, 1, -1), 0]:
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def _plan_layout(x: torch.Tensor):
    """(input, result, out, channels_last): the kernels read `input` (NCHW-contiguous or
    channels-last-dense) and write `result`; `out` is laid out like x (torch.empty_like(x), what
    the C++ op returns too) and is `result` unless x has another layout (then copied into)."""
    out = torch.empty_like(x)
    if out.is_contiguous():
        return x.contiguous(), out, out, False
    if _is_channels_last_dense(out):
        if _is_channels_last_dense(x):
            return x, out, out, True
        xin = torch.empty_like(out)
        xin.copy_(x)
        return xin, out, out, True
    return x.contiguous(), torch.empty(x.shape, dtype=x.dtype, device=x.device), out, False


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the CPU interpreter runs programs one after another: fewer is faster


def _launch(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
            bias: torch.Tensor | None, scale: torch.Tensor | None,
            shift: torch.Tensor | None, eps: float, silu: bool) -> torch.Tensor:
    """The op's body: plan the layout and launch the kernels under x's device guard."""
    with device_guard(x):
        return _launch_on_device(x, num_groups, weight, bias, scale, shift, eps, silu, None)


def _launch_stats(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                  bias: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None,
                  eps: float, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward with statistics: (y, mean, rstd), mean/rstd (N, num_groups) fp32 (for an empty
    x those of an empty group: 0 and 1 / sqrt(eps), as the C++ op gives)."""
    mean = torch.zeros((x.shape[0], num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.full_like(mean, eps ** -0.5)
    with device_guard(x):
        y = _launch_on_device(x, num_groups, weight, bias, scale, shift, eps, silu, (mean, rstd))
    return y, mean, rstd


def _launch_on_device(x, num_groups, weight, bias, scale, shift, eps, silu, stats):
    n, c = x.shape[0], x.shape[1]
    xin, result, out, channels_last = _plan_layout(x)
    if x.numel() == 0:
        return out
    p = x.numel() // (n * c)
    check_sample_numel("x", c * p)
    g = num_groups
    cg = c // g
    s_n, s_c, s_p = (p * c, 1, c) if channels_last else (c * p, p, 1)
    params = [t.float().contiguous() if t is not None else None for t in (weight, bias, scale, shift)]
    flags = dict(HAS_WEIGHT=params[0] is not None, HAS_BIAS=params[1] is not None,
                 HAS_SCALE=params[2] is not None, HAS_SHIFT=params[3] is not None, SILU=silu,
                 STATS=stats is not None)
    ptrs = [t if t is not None else xin for t in params]  # placeholders are never read
    ptrs += list(stats) if stats is not None else [result, result]  # placeholders never written
    if triton.next_power_of_2(cg) * triton.next_power_of_2(p) <= FUSED_MAX_ELEMENTS:
        wrap_triton(_fused_kernel)[check_grid("x", (n * g,))](
            xin, result, *ptrs, c, p, g, cg, s_n, s_c, s_p, eps, **flags,
            BLOCK_C=triton.next_power_of_2(cg), BLOCK_P=triton.next_power_of_2(p))
    else:
        block_p = min(BLOCK_P_MAX, triton.next_power_of_2(p))
        block_c = max(1, min(triton.next_power_of_2(cg), TILE_MAX // block_p))
        want_splits = max(1, _target_programs(x.device) // (n * g))
        splits = min(triton.cdiv(p, block_p), want_splits)
        split_p = triton.cdiv(triton.cdiv(p, splits), block_p) * block_p
        splits = triton.cdiv(p, split_p)
        apply_grid = check_grid("x", (n * g, triton.cdiv(p, block_p)))
        partial = torch.empty((n * g, splits, 2), dtype=torch.float32, device=x.device)
        wrap_triton(_moments_kernel)[(n * g, splits)](
            xin, partial, p, g, cg, s_n, s_c, s_p, split_p, BLOCK_C=block_c, BLOCK_P=block_p)
        wrap_triton(_apply_kernel)[apply_grid](
            xin, result, partial, *ptrs, c, p, g, cg, s_n, s_c, s_p, splits, eps, **flags,
            BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_S=min(64, triton.next_power_of_2(splits)))
    if result is not out:
        out.copy_(result)
    return out


# On a GPU: triton_op, so that torch.compile traces the launches and sees the kernels. Under
# TRITON_INTERPRET=1 @triton.jit yields interpreted functions that wrap_triton cannot make
# traceable (they would run on fake tensors): there the launcher is an opaque custom_op with a
# fake implementation. Either way the op is ddpm_fast::group_norm_scale_shift_triton, and its
# forward with statistics ddpm_fast::group_norm_scale_shift_stats_triton (used under autograd;
# the backward is in group_norm_scale_shift_backward.py).
OP_NAME = "ddpm_fast::group_norm_scale_shift_triton"
STATS_OP_NAME = "ddpm_fast::group_norm_scale_shift_stats_triton"
INTERPRETED = not isinstance(_fused_kernel, JITFunction)


def define_op(name: str, body, fake):
    """`body` as the torch.library op `name`: a triton_op on a GPU, an opaque custom_op with the
    fake implementation `fake` under the interpreter (see above)."""
    if INTERPRETED:
        op = torch.library.custom_op(name, mutates_args=())(body)
        op.register_fake(fake)
        return op
    return triton_op(name, mutates_args=())(body)


def _fake(x, num_groups, weight, bias, scale, shift, eps, silu):
    return torch.empty_like(x)


def _fake_stats(x, num_groups, weight, bias, scale, shift, eps, silu):
    return stats_like(x, num_groups)


group_norm_scale_shift_op = define_op(OP_NAME, _launch, _fake)
group_norm_scale_shift_stats_op = define_op(STATS_OP_NAME, _launch_stats, _fake_stats)


def group_norm_scale_shift(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                           bias: torch.Tensor | None, scale: torch.Tensor | None,
                           shift: torch.Tensor | None, eps: float, silu: bool) -> torch.Tensor:
    """x (N, C, *spatial) fp32/fp16/bf16; weight, bias (C,) or None; scale, shift (N, C) or None.
    Returns GroupNorm(x) [* weight + bias] [* (1 + scale) + shift] [SiLU], shaped, typed and laid
    out like x. Arguments are checked by ddpm_fast.ops.group_norm_scale_shift."""
    return torch.ops.ddpm_fast.group_norm_scale_shift_triton(x, num_groups, weight, bias, scale,
                                                             shift, eps, silu)


def group_norm_scale_shift_stats(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                                 bias: torch.Tensor | None, scale: torch.Tensor | None,
                                 shift: torch.Tensor | None, eps: float, silu: bool):
    """As group_norm_scale_shift, also returning the group statistics: (y, mean, rstd), mean and
    rstd (N, num_groups) fp32; differentiable (the backward of group_norm_scale_shift_backward.py)."""
    return torch.ops.ddpm_fast.group_norm_scale_shift_stats_triton(x, num_groups, weight, bias, scale,
                                                                   shift, eps, silu)


# the forward with statistics and the autograd of both ops (the backward kernels' module)
from . import group_norm_scale_shift_backward as _backward  # noqa: E402,F401
