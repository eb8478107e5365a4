"""Triton flash-attention backward (FlashAttention-2) for ADM's qkv tensor, both channel layouts.

Per (sample, head) with q, k, v (ch, T) read from qkv through its strides (as the forward,
kernels/attention.py), s = 1/sqrt(ch), the forward's P[t, u] = exp(s q_t . k_u - lse[t]) and
output O = v P^T, and the incoming gradient dO (ch, T):
    dV = dO P,   dP = dO^T v,   dZ = P * (dP - delta),   delta[t] = sum_c dO[c, t] O[c, t],
    dq = s k dZ^T,   dk = s q dZ
(dZ: the gradient of the logits Z = s q^T k through the row softmax, whose Jacobian gives
dZ[t, u] = P[t, u] (dP[t, u] - sum_u' P[t, u'] dP[t, u']), and sum_u' P dP = dO_t . O_t.)
P is recomputed tile by tile from q, k and the saved lse (B, heads, T) fp32 -- nothing (T x T) is
stored. Three kernels, as FlashAttention-2's Triton backward:
  _attention_bwd_delta: delta (B, heads, T) fp32 from O and dO;
  _attention_bwd_dkdv:  one program per BLOCK_N keys of a (sample, head): walks the query tiles,
                        accumulating dK and dV in fp32 (no atomics);
  _attention_bwd_dq:    one program per BLOCK_M queries: walks the key tiles, accumulating dQ.
dq, dk, dv are stored straight into grad_qkv (B, 3C, T) contiguous at the layout's channel
offsets (legacy: per head [q, k, v]; new: [q | k | v]). fp16/bf16 tiles go to tl.dot as they are,
P and dZ rounded to the storage dtype for their dots (as the forward rounds P); fp32 uses IEEE
dots. Grids are 1-D (B x heads x blocks); sample base offsets 64-bit, offsets inside a sample
32-bit (checked).

Tiles (GPU): BACKWARD_TILES by head-dim tile and dtype, the same for sm_80 and sm_90 until timed
(tests/test_offline_compile.py compiles them for both without spills); under TRITON_INTERPRET=1
INTERPRET_CONFIG. Registered as ``ddpm_fast::attention_backward_triton`` (with a fake), and the
autograd formula of ``ddpm_fast::attention_triton`` / ``ddpm_fast::attention_lse_triton``
(ddpm_fast.ops.attention.register_attention_autograd).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._registry import triton_interpret
from ..ops.attention import register_attention_autograd
from ._launch import check_grid, device_guard
from .attention import (LOG2E, attention_lse_op, attention_op, block_d, check_head_dim, dot_constexprs,
                        launch_dims, qkv_channels)

LOG2E_C = tl.constexpr(LOG2E)  # inside kernels (a plain float global is not readable there)


@triton.jit
def _load_rows(base, offs_t, offs_d, T, HEAD_DIM, stride_t, stride_c, DOT_DTYPE: tl.constexpr):
    """Tile (len(offs_t), len(offs_d)) [token, dim] of one head's q, k, v (or of O, dO), zero
    beyond T and the head dim, converted to DOT_DTYPE."""
    mask = (offs_t < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(base + offs_t[:, None] * stride_t + offs_d[None, :] * stride_c, mask=mask,
                   other=0.0).to(DOT_DTYPE)


@triton.jit
def _store_rows(base, tile, offs_t, offs_d, T, HEAD_DIM):
    """Stores tile [token, dim] into one head's slice of the contiguous (B, 3C, T) gradient."""
    mask = (offs_t < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(base + offs_d[None, :] * T + offs_t[:, None], tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _program(T, BLOCK: tl.constexpr):
    """(sample x head index, block index) of program blk + (b * heads + h) * cdiv(T, BLOCK) of a
    1-D grid (B x heads may pass grid axis 1's limit)."""
    n_blocks = tl.cdiv(T, BLOCK)
    pid = tl.program_id(0)
    pid_bh = pid // n_blocks
    return pid_bh, pid - pid_bh * n_blocks


@triton.jit
def _attention_bwd_delta(out, grad_out, delta, T, HEAD_DIM, channels,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, t] = sum_d O[b, h*ch + d, t] dO[b, h*ch + d, t]; out, grad_out (B, C, T)
    contiguous; program pid_m + (b * heads + h) * n_m."""
    pid_bh, pid_m = _program(T, BLOCK_M)
    heads = channels // HEAD_DIM
    offset = ((pid_bh // heads).to(tl.int64) * channels + (pid_bh % heads) * HEAD_DIM) * T
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(out + offset, offs_m, offs_d, T, HEAD_DIM, 1, T, tl.float32)
    do = _load_rows(grad_out + offset, offs_m, offs_d, T, HEAD_DIM, 1, T, tl.float32)
    tl.store(delta + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _head_bases(qkv, grad, grad_out, pid_bh, HEADS, HEAD_DIM, stride_b, stride_c,
                q_chan, k_chan, v_chan, head_chan, channels, T):
    """Base pointers of one (sample, head): its q, k, v in qkv, its dq, dk, dv in the contiguous
    grad (B, 3C, T), its dO in grad_out (B, C, T) contiguous, and its row offset in lse / delta."""
    b = (pid_bh // HEADS).to(tl.int64)
    h = pid_bh % HEADS
    base = qkv + b * stride_b
    gbase = grad + b * 3 * channels * T
    q_c = (q_chan + h * head_chan).to(tl.int64)
    k_c = (k_chan + h * head_chan).to(tl.int64)
    v_c = (v_chan + h * head_chan).to(tl.int64)
    do_base = grad_out + (b * channels + h * HEAD_DIM) * T
    return (base + q_c * stride_c, base + k_c * stride_c, base + v_c * stride_c,
            gbase + q_c * T, gbase + k_c * T, gbase + v_c * T, do_base, pid_bh.to(tl.int64) * T)


@triton.jit
def _attention_bwd_dkdv(qkv, grad_out, lse, delta, grad, T, HEADS, HEAD_DIM, stride_b, stride_c, stride_t,
                        q_chan, k_chan, v_chan, head_chan, channels, scale_log2, scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK, dV of BLOCK_N keys of one (sample, head): program pid_n + (b * HEADS + h) * n_n. In
    transposed form over the key rows n and query columns m of a tile:
        P^T[n, m] = exp2(k_n . q_m * scale_log2 - lse[m] * log2(e)),  dV += P^T dO,
        dP^T = v dO^T,  dZ^T = P^T * (dP^T - delta[m]),  dK += scale * dZ^T Q."""
    pid_bh, pid_n = _program(T, BLOCK_N)
    q_base, k_base, v_base, _dq, dk_base, dv_base, do_base, row = _head_bases(
        qkv, grad, grad_out, pid_bh, HEADS, HEAD_DIM, stride_b, stride_c, q_chan, k_chan, v_chan,
        head_chan, channels, T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m0 = tl.arange(0, BLOCK_M)
    k = _load_rows(k_base, offs_n, offs_d, T, HEAD_DIM, stride_t, stride_c, DOT_DTYPE)  # (N, D)
    v = _load_rows(v_base, offs_n, offs_d, T, HEAD_DIM, stride_t, stride_c, DOT_DTYPE)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for m0 in range(0, T, BLOCK_M):
        offs_m = m0 + offs_m0
        m_ok = offs_m < T
        q = _load_rows(q_base, offs_m, offs_d, T, HEAD_DIM, stride_t, stride_c, DOT_DTYPE)  # (M, D)
        do = _load_rows(do_base, offs_m, offs_d, T, HEAD_DIM, 1, T, DOT_DTYPE)
        # queries past T: lse = +inf gives P = 0, so they add nothing
        lse2 = tl.load(lse + row + offs_m, mask=m_ok, other=float("inf")) * LOG2E_C
        dlt = tl.load(delta + row + offs_m, mask=m_ok, other=0.0)
        s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (N, M)
        p = tl.math.exp2(s * scale_log2 - lse2[None, :])
        dv += tl.dot(p.to(DOT_DTYPE), do, input_precision=DOT_PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dz = p * (dp - dlt[None, :])
        dk += tl.dot(dz.to(DOT_DTYPE), q, input_precision=DOT_PRECISION)
    _store_rows(dk_base, dk * scale, offs_n, offs_d, T, HEAD_DIM)
    _store_rows(dv_base, dv, offs_n, offs_d, T, HEAD_DIM)


@triton.jit
def _attention_bwd_dq(qkv, grad_out, lse, delta, grad, T, HEADS, HEAD_DIM, stride_b, stride_c, stride_t,
                      q_chan, k_chan, v_chan, head_chan, channels, scale_log2, scale,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ of BLOCK_M queries of one (sample, head): program pid_m + (b * HEADS + h) * n_m.
        P = exp2(q . k * scale_log2 - lse * log2(e)),  dP = dO v^T,
        dZ = P * (dP - delta),  dQ += scale * dZ K."""
    pid_bh, pid_m = _program(T, BLOCK_M)
    q_base, k_base, v_base, dq_base, _dk, _dv, do_base, row = _head_bases(
        qkv, grad, grad_out, pid_bh, HEADS, HEAD_DIM, stride_b, stride_c, q_chan, k_chan, v_chan,
        head_chan, channels, T)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_ok = offs_m < T
    q = _load_rows(q_base, offs_m, offs_d, T, HEAD_DIM, stride_t, stride_c, DOT_DTYPE)  # (M, D)
    do = _load_rows(do_base, offs_m, offs_d, T, HEAD_DIM, 1, T, DOT_DTYPE)
    lse2 = tl.load(lse + row + offs_m, mask=m_ok, other=float("inf")) * LOG2E_C
    dlt = tl.load(delta + row + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, T, BLOCK_N):
        offs_n = n0 + offs_n0
        k = _load_rows(k_base, offs_n, offs_d, T, HEAD_DIM, stride_t, stride_c, DOT_DTYPE)  # (N, D)
        v = _load_rows(v_base, offs_n, offs_d, T, HEAD_DIM, stride_t, stride_c, DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (M, N)
        # keys past T (k = v = 0) get P > 0 but add dZ * k = 0 to dQ: no mask needed
        p = tl.math.exp2(s * scale_log2 - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        dz = p * (dp - dlt[:, None])
        dq += tl.dot(dz.to(DOT_DTYPE), k, input_precision=DOT_PRECISION)
    _store_rows(dq_base, dq * scale, offs_m, offs_d, T, HEAD_DIM)


# GPU tiles: (BLOCK_D bucket, "16" fp16/bf16 | "32" fp32) -> (BLOCK_M, BLOCK_N, num_warps, num_stages),
# used by both the dK/dV and the dQ kernel (BLOCK_N keys x BLOCK_M queries per tile). The dK/dV
# kernel keeps K, V, dK, dV tiles (BLOCK_N x BLOCK_D) live, the dQ kernel Q, dO, dQ: small tiles for
# wide heads. Each entry compiles for sm_80 and sm_90 without register spills
# (tests/test_offline_compile.py); not yet timed on a GPU.
BACKWARD_TILES: dict[tuple[int, str], tuple[int, int, int, int]] = {
    (64, "16"): (64, 32, 4, 2),
    (128, "16"): (64, 32, 8, 2),
    (256, "16"): (32, 32, 8, 1),
    (64, "32"): (32, 32, 4, 1),
    (128, "32"): (32, 16, 8, 1),
    (256, "32"): (16, 16, 8, 1),
}
D_BUCKETS = (64, 128, 256)
# Under TRITON_INTERPRET=1: small tiles, so T = 64 spans several query and key tiles.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32}
# The delta kernel's queries per program: a (BLOCK_M, BLOCK_D) tile of O and of dO in registers, at
# most 4096 elements each (64 x 256 spilled on sm_80)
DELTA_TILE_ELEMENTS = 4096


def backward_tile(head_dim: int, dtype: torch.dtype) -> dict:
    """{BLOCK_M, BLOCK_N, num_warps, num_stages} of the GPU backward kernels (a function of the
    arguments alone: every rank and run computes the same way)."""
    check_head_dim(head_dim)
    d = next(b for b in D_BUCKETS if block_d(head_dim) <= b)
    block_m, block_n, warps, stages = BACKWARD_TILES[(d, "32" if dtype == torch.float32 else "16")]
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


def _launch_backward(grad_out, qkv, out, lse, num_heads: int, legacy: bool) -> torch.Tensor:
    b, channels, head_dim, t = launch_dims(qkv, num_heads)
    with device_guard(qkv):
        grad = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
        if grad.numel() == 0:
            return grad
        grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
        interpret = triton_interpret() or qkv.device.type != "cuda"
        common = dot_constexprs(qkv.dtype, head_dim, interpret)
        tile = dict(INTERPRET_CONFIG) if interpret else backward_tile(head_dim, qkv.dtype)
        delta = torch.empty((b, num_heads, t), device=qkv.device, dtype=torch.float32)
        delta_block = min(64, DELTA_TILE_ELEMENTS // common["BLOCK_D"])
        grid = check_grid("qkv", (triton.cdiv(t, delta_block) * b * num_heads,))
        _attention_bwd_delta[grid](out, grad_out, delta, t, head_dim, channels, BLOCK_M=delta_block,
                                   BLOCK_D=common["BLOCK_D"])
        q_chan, k_chan, v_chan, head_chan = qkv_channels(channels, head_dim, legacy)
        args = (qkv, grad_out, lse, delta, grad, t, num_heads, head_dim, *qkv.stride(), q_chan, k_chan, v_chan,
                head_chan, channels, LOG2E / math.sqrt(head_dim), 1.0 / math.sqrt(head_dim))
        grid = check_grid("qkv", (triton.cdiv(t, tile["BLOCK_N"]) * b * num_heads,))
        _attention_bwd_dkdv[grid](*args, **tile, **common)
        grid = check_grid("qkv", (triton.cdiv(t, tile["BLOCK_M"]) * b * num_heads,))
        _attention_bwd_dq[grid](*args, **tile, **common)
    return grad


@torch.library.custom_op("ddpm_fast::attention_backward_triton", mutates_args=())
def attention_backward_op(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          num_heads: int, legacy: bool) -> torch.Tensor:
    """grad_qkv (B, 3C, T) contiguous in qkv's dtype from grad_out and out (B, C, T) and the
    forward's lse (B, heads, T) fp32; see the module docstring."""
    return _launch_backward(grad_out, qkv, out, lse, num_heads, legacy)


@attention_backward_op.register_fake
def _attention_backward_fake(grad_out, qkv, out, lse, num_heads, legacy):
    check_head_dim(qkv.shape[1] // 3 // num_heads)
    return qkv.new_empty(qkv.shape)


register_attention_autograd(attention_op, attention_lse_op, attention_backward_op)
