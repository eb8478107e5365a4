"""Triton flash-attention forward for ADM's qkv tensor, both channel layouts, read in place.

qkv (B, 3*C, T) -> (B, C, T): per head, softmax(q^T k / sqrt(ch)) v with ch = C / heads.
One program computes BLOCK_M queries of one (batch, head): it walks the keys in tiles of BLOCK_N
with an online softmax (running max and sum, exp2 domain) and an fp32 accumulator. q, k and v are
loaded through qkv's strides at the layout's channel offsets (legacy: per head [q, k, v] blocks;
new: [q | k | v]), so neither layout is copied; the output is stored straight into (B, C, T).
fp16/bf16 tiles go to tl.dot as they are (fp32 accumulation; the probabilities are rounded to the
storage dtype for the P V dot, as in flash attention), fp32 tiles use IEEE fp32 dots (no TF32).

On a GPU the tile sizes are autotuned per (T, head dim, dtype); under TRITON_INTERPRET=1 (CPU
tensors, the tests) one fixed small configuration runs, since autotuning there is slow.

Registered as the torch.library custom op ``ddpm_fast::attention_triton`` with a fake
implementation, so torch.compile and CUDA-graph capture can trace through it.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._registry import triton_interpret

LOG2E = 1.4426950408889634


def qkv_channels(channels: int, head_dim: int, legacy: bool) -> tuple[int, int, int, int]:
    """Channel offsets (q, k, v) of head 0 and the channel step `head` between heads: dim d of
    head h's q sits at channel q + h * head + d of qkv (as csrc/include/attention_math.h)."""
    if legacy:
        return 0, head_dim, 2 * head_dim, 3 * head_dim
    return 0, channels, 2 * channels, head_dim


@triton.jit
def _attention_fwd(qkv, out, T, HEADS, HEAD_DIM, stride_b, stride_c, stride_t,
                   q_chan, k_chan, v_chan, head_chan, channels, scale_log2,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HEADS).to(tl.int64)
    h = pid_bh % HEADS

    base = qkv + b * stride_b
    q_base = base + (q_chan + h * head_chan).to(tl.int64) * stride_c
    k_base = base + (k_chan + h * head_chan).to(tl.int64) * stride_c
    v_base = base + (v_chan + h * head_chan).to(tl.int64) * stride_c

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_ok = offs_m < T
    d_ok = offs_d < HEAD_DIM

    # Q (BLOCK_M, BLOCK_D); zero beyond T and beyond the head dim.
    q = tl.load(q_base + offs_m[:, None] * stride_t + offs_d[None, :] * stride_c,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, T, BLOCK_N):
        offs_n = n0 + offs_n0
        n_ok = offs_n < T
        # K^T tile (BLOCK_D, BLOCK_N): contiguous along T, as qkv stores it.
        k = tl.load(k_base + offs_d[:, None] * stride_c + offs_n[None, :] * stride_t,
                    mask=d_ok[:, None] & n_ok[None, :], other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(n_ok[None, :], s, float("-inf"))
        # Key n0 is always valid, so m_new is finite and exp2(-inf - m_new) = 0 on the first tile.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_t + offs_d[None, :] * stride_c,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        # P is rounded to v's storage dtype, as the tensor-core dot takes it.
        p = p.to(v.dtype).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_base = out + (b * channels + h * HEAD_DIM) * T
    tl.store(o_base + offs_d[None, :] * T + offs_m[:, None], acc.to(out.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


def _gpu_configs() -> list[triton.Config]:
    configs = []
    for block_m in (16, 32, 64, 128):
        for block_n in (16, 32, 64, 128):
            for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3)):
                if block_m * block_n < 32 * 32 and warps == 8:
                    continue
                configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n},
                                             num_warps=warps, num_stages=stages))
    return configs


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles much larger than T (T = 16 has no use for 128-query tiles) and tiles whose
    register/shared footprint is excessive for wide heads."""
    t = named_args["T"]
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    cap = max(16, triton.next_power_of_2(t))
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= cap and c.kwargs["BLOCK_N"] <= cap
            and not (block_d >= 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 64)]
    return kept or configs[:1]


_attention_fwd_tuned = triton.autotune(
    configs=_gpu_configs(), key=["T", "HEAD_DIM"],
    prune_configs_by={"early_config_prune": _prune_configs})(_attention_fwd)

# The one configuration used under TRITON_INTERPRET=1: small tiles, so T = 64 spans several key
# tiles and the online softmax is exercised.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16}

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _launch(qkv: torch.Tensor, num_heads: int, legacy: bool) -> torch.Tensor:
    b, width, t = qkv.shape
    channels = width // 3
    head_dim = channels // num_heads
    out = torch.empty((b, channels, t), device=qkv.device, dtype=qkv.dtype)
    if out.numel() == 0:
        return out
    q_chan, k_chan, v_chan, head_chan = qkv_channels(channels, head_dim, legacy)
    args = (qkv, out, t, num_heads, head_dim, *qkv.stride(), q_chan, k_chan, v_chan, head_chan,
            channels, LOG2E / math.sqrt(head_dim))
    interpret = triton_interpret() or qkv.device.type != "cuda"
    # The interpreter's tl.dot mishandles bf16 operands (numpy has no bf16): there the bf16 tiles
    # are widened to fp32 first (exact), which gives the same products as the GPU's bf16 dot.
    widen = interpret and qkv.dtype == torch.bfloat16
    common = {"BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
              "DOT_DTYPE": tl.float32 if widen else _TL_DTYPES[qkv.dtype],
              "DOT_PRECISION": "ieee" if qkv.dtype == torch.float32 else "tf32"}
    if interpret:
        grid = (triton.cdiv(t, INTERPRET_CONFIG["BLOCK_M"]), b * num_heads)
        _attention_fwd[grid](*args, **INTERPRET_CONFIG, **common)
    else:
        def grid(meta):
            return (triton.cdiv(t, meta["BLOCK_M"]), b * num_heads)
        with torch.cuda.device(qkv.device):
            _attention_fwd_tuned[grid](*args, **common)
    return out


@torch.library.custom_op("ddpm_fast::attention_triton", mutates_args=())
def attention_op(qkv: torch.Tensor, num_heads: int, legacy: bool) -> torch.Tensor:
    """The Triton kernel as a torch.library op; see `attention`."""
    return _launch(qkv, num_heads, legacy)


@attention_op.register_fake
def _attention_fake(qkv, num_heads, legacy):
    b, width, t = qkv.shape
    return qkv.new_empty((b, width // 3, t))


def attention(qkv: torch.Tensor, num_heads: int, legacy: bool) -> torch.Tensor:
    """ADM self-attention with the Triton kernel.

    qkv (B, 3*C, T) float32/float16/bfloat16, any strides; num_heads divides C; legacy selects
    QKVAttentionLegacy's per-head [q, k, v] layout, else QKVAttention's [q | k | v].
    Returns (B, C, T) in qkv's dtype. Arguments are checked by ddpm_fast.ops.attention.
    """
    return attention_op(qkv, num_heads, legacy)
