"""Triton backward of group_norm_scale_shift (ADM's AdaGN): the gradients of
y = SiLU?(((x - mean) * rstd * weight + bias) * (1 + scale) + shift) for x, weight, bias, scale and
shift from grad_y and the forward's saved statistics mean, rstd (N, G) fp32, arithmetic in fp32.

The formulas (derived in csrc/include/group_norm_math.h, "backward"): with z = a * x + b the
forward's fused map, dz = dy * SiLU'(z) (or dy), m = 1 + scale, and per (n, c) the sums
A = sum_p dz, B = rstd * sum_p dz * (x - mean):
    dshift = A, dscale = weight * B + bias * A, dbias = sum_n m * A, dweight = sum_n m * B,
    dx = alpha * dz + beta * (x - mean) + gamma,  alpha = rstd * m * weight,
    beta = -rstd^2 * sum_c(m * weight * B) / K, gamma = -rstd * sum_c(m * weight * A) / K,
K = (C / G) * pixels the group's size. Two kernels, x viewed as (N, C, P) as in the forward:

  * `_gn_backward_sums_kernel`, program (n*G + g, split): A and sum dz * (x - mean) of each
    channel of the group over the split's pixels (partials, fp32);
  * `_gn_backward_dx_kernel`, program (n*G + g, pixel block): adds the group's partials up; block
    0 writes the per-(n, c) terms (dscale, dshift, m * A, m * B); with WRITE_DX the dx of its pixels.
dweight / dbias are the sums of m * B / m * A over n (torch, on the (N, C) terms: deterministic).

Registered as ddpm_fast::group_norm_scale_shift_backward_triton, with the autograd of
ddpm_fast::group_norm_scale_shift_triton and ..._stats_triton (ddpm_fast.ops.group_norm_scale_shift
.register_autograd). Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ddpm_fast.ops.group_norm_scale_shift import grad_like, register_autograd

from . import group_norm_scale_shift as forward
from .group_norm_scale_shift import _coefficients
from ._launch import check_grid, check_sample_numel, device_guard

BACKWARD_OP_NAME = "ddpm_fast::group_norm_scale_shift_backward_triton"


@triton.jit
def _dz(v, dy, a, b, SILU: tl.constexpr):
    """dz = dy * SiLU'(z) (or dy) at z = a * x + b (a, b per channel, along axis 0);
    SiLU'(z) = s (1 + z (1 - s)), s = sigmoid(z)."""
    if SILU:
        z = a[:, None] * v + b[:, None]
        s = tl.sigmoid(z)
        dy = dy * s * (1.0 + z * (1.0 - s))
    return dy


@triton.jit
def _program_group(mean_ptr, rstd_ptr, G):
    """The group (n*G + g) of program axis 0: (ng, n, g, its mean, its rstd)."""
    ng = tl.program_id(0)
    return ng, ng // G, ng % G, tl.load(mean_ptr + ng), tl.load(rstd_ptr + ng)


@triton.jit
def _channel_params(w_ptr, b_ptr, scale_ptr, n, cc, cmask, C,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr):
    """weight, bias, 1 + scale of channels cc of sample n (1, 0, 1 where absent)."""
    w = tl.full(cc.shape, 1.0, tl.float32)
    bias = tl.zeros(cc.shape, tl.float32)
    m = tl.full(cc.shape, 1.0, tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cc, mask=cmask, other=1.0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cc, mask=cmask, other=0.0)
    if HAS_SCALE:
        m = 1.0 + tl.load(scale_ptr + n * C + cc, mask=cmask, other=0.0)
    return w, bias, m


@triton.jit
def _gn_backward_sums_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                             partial_ptr, C, P, G, CG, s_n, s_c, s_p, SPLIT_P,
                             HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                             HAS_SHIFT: tl.constexpr, SILU: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (n*G + g, split): for each channel j < CG of the group, sum dz and sum dz * (x - mean)
    over the pixels [split * SPLIT_P, (split + 1) * SPLIT_P), written to
    partial[((n*G + g) * splits + split) * 2 * CG + {0, CG} + j]."""
    ng, n, g, mean, rstd = _program_group(mean_ptr, rstd_ptr, G)
    split = tl.program_id(1)
    sample = n.to(tl.int64) * s_n
    pj = tl.arange(0, BLOCK_P)
    p_begin = split * SPLIT_P
    p_end = tl.minimum(P, p_begin + SPLIT_P)
    out = partial_ptr + (ng * tl.num_programs(1) + split) * 2 * CG
    for c0 in range(0, CG, BLOCK_C):
        cj = c0 + tl.arange(0, BLOCK_C)
        cmask = cj < CG
        cc = g * CG + cj
        a, b = _coefficients(mean, rstd, w_ptr, b_ptr, scale_ptr, shift_ptr, n, cc, cmask, C,
                             HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
        acc_a = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        acc_b = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        for p0 in range(p_begin, p_end, BLOCK_P):
            pp = p0 + pj
            mask = cmask[:, None] & (pp[None, :] < p_end)
            offs = sample + cc[:, None] * s_c + pp[None, :] * s_p
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dz = _dz(v, dy, a, b, SILU)  # 0 where masked (dy = 0)
            acc_a += dz
            acc_b += dz * (v - mean)
        tl.store(out + cj, tl.sum(acc_a, axis=1), mask=cmask)
        tl.store(out + CG + cj, tl.sum(acc_b, axis=1), mask=cmask)


@triton.jit
def _gn_backward_dx_kernel(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
                           partial_ptr, terms_ptr, N, C, P, G, CG, s_n, s_c, s_p, SPLITS,
                           HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                           HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, WRITE_DX: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (n*G + g, pixel block): A, B of the group's channels from the partials; block 0
    writes terms[k, n, c] ((4, N, C) fp32: dscale, dshift, m * A, m * B); with WRITE_DX, dx on
    the block's BLOCK_P pixels."""
    ng, n, g, mean, rstd = _program_group(mean_ptr, rstd_ptr, G)
    pb = tl.program_id(1)
    sum_dxhat = 0.0    # sum_c m w A
    sum_dxhat_x = 0.0  # sum_c m w B
    for c0 in range(0, CG, BLOCK_C):
        cj = c0 + tl.arange(0, BLOCK_C)
        cmask = cj < CG
        cc = g * CG + cj
        A = tl.zeros([BLOCK_C], tl.float32)
        B = tl.zeros([BLOCK_C], tl.float32)
        for s in range(0, SPLITS):
            part = partial_ptr + (ng * SPLITS + s) * 2 * CG
            A += tl.load(part + cj, mask=cmask, other=0.0)
            B += tl.load(part + CG + cj, mask=cmask, other=0.0)
        B = B * rstd
        w, bias, m = _channel_params(w_ptr, b_ptr, scale_ptr, n, cc, cmask, C,
                                     HAS_WEIGHT, HAS_BIAS, HAS_SCALE)
        if pb == 0:
            nc = n * C + cc
            tl.store(terms_ptr + nc, w * B + bias * A, mask=cmask)
            tl.store(terms_ptr + N * C + nc, A, mask=cmask)
            tl.store(terms_ptr + 2 * N * C + nc, m * A, mask=cmask)
            tl.store(terms_ptr + 3 * N * C + nc, m * B, mask=cmask)
        sum_dxhat += tl.sum(m * w * A, axis=0)
        sum_dxhat_x += tl.sum(m * w * B, axis=0)
    if WRITE_DX:
        count = CG * P
        beta = -rstd * rstd * sum_dxhat_x / count
        gamma = -rstd * sum_dxhat / count
        sample = n.to(tl.int64) * s_n
        pp = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = pp < P
        for c0 in range(0, CG, BLOCK_C):
            cj = c0 + tl.arange(0, BLOCK_C)
            cmask = cj < CG
            cc = g * CG + cj
            a, b = _coefficients(mean, rstd, w_ptr, b_ptr, scale_ptr, shift_ptr, n, cc, cmask, C,
                                 HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT)
            w, bias, m = _channel_params(w_ptr, b_ptr, scale_ptr, n, cc, cmask, C,
                                         HAS_WEIGHT, HAS_BIAS, HAS_SCALE)
            alpha = rstd * m * w
            mask = cmask[:, None] & pmask[None, :]
            offs = sample + cc[:, None] * s_c + pp[None, :] * s_p
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dz = _dz(v, dy, a, b, SILU)
            dx = alpha[:, None] * dz + (beta * (v - mean) + gamma)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _grad_like_input(grad_y: torch.Tensor, xin: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """grad_y laid out as the kernels read x (`xin`: NCHW-contiguous or channels-last-dense)."""
    if not channels_last:
        return grad_y.contiguous()
    if forward._is_channels_last_dense(grad_y):
        return grad_y
    return torch.empty_like(xin).copy_(grad_y)


def _launch_backward(grad_y: torch.Tensor, x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                     bias: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None,
                     mean: torch.Tensor, rstd: torch.Tensor, silu: bool,
                     output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                       torch.Tensor, torch.Tensor]:
    """The op's body: (dx, dweight, dbias, dscale, dshift) as grad_like describes them."""
    with device_guard(x):
        return _backward_on_device(grad_y, x, num_groups, weight, bias, scale, shift, mean, rstd, silu,
                                   output_mask)


def _backward_on_device(grad_y, x, num_groups, weight, bias, scale, shift, mean, rstd, silu, output_mask):
    n, c = x.shape[0], x.shape[1]
    params = (weight, bias, scale, shift)
    want = [output_mask[0]] + [m and t is not None for m, t in zip(output_mask[1:], params)]
    xin, result, out, channels_last = forward._plan_layout(x)
    terms = torch.zeros((4, n, c), dtype=torch.float32, device=x.device)  # dscale, dshift, m*A, m*B
    if x.numel() > 0:
        p = x.numel() // (n * c)
        check_sample_numel("x", c * p)
        g = num_groups
        cg = c // g
        s_n, s_c, s_p = (p * c, 1, c) if channels_last else (c * p, p, 1)
        dy = _grad_like_input(grad_y, xin, channels_last)
        mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
        fp32 = [t.float().contiguous() if t is not None else None for t in params]
        flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                     HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SILU=silu)
        ptrs = [t if t is not None else mean for t in fp32]  # placeholders are never read
        block_p = min(forward.BLOCK_P_MAX, triton.next_power_of_2(p))
        block_c = max(1, min(triton.next_power_of_2(cg), forward.TILE_MAX // block_p))
        want_splits = max(1, forward._target_programs(x.device) // (n * g))
        splits = min(triton.cdiv(p, block_p), want_splits)
        split_p = triton.cdiv(triton.cdiv(p, splits), block_p) * block_p
        splits = triton.cdiv(p, split_p)
        partial = torch.empty((n * g, splits, 2, cg), dtype=torch.float32, device=x.device)
        wrap_triton(_gn_backward_sums_kernel)[check_grid("x", (n * g, splits))](
            xin, dy, mean, rstd, *ptrs, partial, c, p, g, cg, s_n, s_c, s_p, split_p, **flags,
            BLOCK_C=block_c, BLOCK_P=block_p)
        dx_grid = check_grid("x", (n * g, triton.cdiv(p, block_p) if want[0] else 1))
        wrap_triton(_gn_backward_dx_kernel)[dx_grid](
            xin, dy, result, mean, rstd, *ptrs, partial, terms, n, c, p, g, cg, s_n, s_c, s_p, splits,
            **flags, WRITE_DX=bool(want[0]), BLOCK_C=block_c, BLOCK_P=block_p)
        if want[0] and result is not out:
            out.copy_(result)
    dscale, dshift, m_a, m_b = terms
    grads = [out if want[0] else x.new_empty(0)]
    for wanted, param, value in zip(want[1:], params, (m_b.sum(0), m_a.sum(0), dscale, dshift)):
        grads.append(value.to(param.dtype, copy=True) if wanted else x.new_empty(0))
    return tuple(grads)


def _fake_backward(grad_y, x, num_groups, weight, bias, scale, shift, mean, rstd, silu, output_mask):
    return grad_like(x, weight, bias, scale, shift, output_mask)


group_norm_scale_shift_backward_op = forward.define_op(BACKWARD_OP_NAME, _launch_backward, _fake_backward)
register_autograd(forward.OP_NAME, torch.ops.ddpm_fast.group_norm_scale_shift_stats_triton,
                  torch.ops.ddpm_fast.group_norm_scale_shift_backward_triton)
