"""Triton flash-attention forward for ADM's qkv tensor, both channel layouts, read in place.

qkv (B, 3*C, T) -> (B, C, T): per head, softmax(q^T k / sqrt(ch)) v with ch = C / heads.
One program computes BLOCK_M queries of one (batch, head): it walks the keys in tiles of BLOCK_N
with an online softmax (running max and sum, exp2 domain) and an fp32 accumulator. q, k and v are
loaded through qkv's strides at the layout's channel offsets (legacy: per head [q, k, v] blocks;
new: [q | k | v]), so neither layout is copied; the output is stored straight into (B, C, T).
fp16/bf16 tiles go to tl.dot as they are (fp32 accumulation; the probabilities are rounded to the
storage dtype for the P V dot, as in flash attention), fp32 tiles use IEEE fp32 dots (no TF32).

Programs: one grid axis of cdiv(T, BLOCK_M) x B x heads programs (B x heads on axis 1 would stop
at 65535); qkv's sample base offset is 64-bit, offsets inside a sample 32-bit (checked). Launches
run under qkv's device guard. Head dims 1..MAX_HEAD_DIM (256); others raise ValueError.

Tile choice, deterministic: on a GPU the tile (BLOCK_M, BLOCK_N, num_warps, num_stages) comes from
TILE_TABLE, keyed by (arch: sm_80 family or sm_90+, T bucket: <= 32, <= 128, longer, head-dim tile
BLOCK_D: <= 64, 128, 256, dtype: fp32 or 16-bit). The online softmax sums keys in BLOCK_N tiles, so
the tile decides the rounding of every output: a table lookup gives the same tile, hence the same
images, on every rank and every run, and costs no tuning time. DDPM_FAST_AUTOTUNE=1 instead times
~50 candidate tiles per (T, head dim, dtype) with triton.autotune on first use and caches the
winner on disk (Triton's cache directory: TRITON_CACHE_DIR, default ~/.triton/cache); timings are
noisy, so ranks may then pick different tiles. Under TRITON_INTERPRET=1 (CPU tensors, the tests)
one fixed small configuration, INTERPRET_CONFIG, runs.

Registered as the torch.library custom op ``ddpm_fast::attention_triton`` with a fake
implementation, so torch.compile and CUDA-graph capture can trace through it. Under autograd
``ddpm_fast::attention_lse_triton`` (the _attention_fwd_lse kernel: the same forward, also storing
each query's logsumexp) runs instead; the backward is in kernels/attention_backward.py.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .._registry import triton_interpret
from ..ops.attention import fake_lse, fake_out
from ..validate import records_grad
from ._launch import check_grid, check_sample_numel, device_guard

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)


def qkv_channels(channels: int, head_dim: int, legacy: bool) -> tuple[int, int, int, int]:
    """Channel offsets (q, k, v) of head 0 and the channel step `head` between heads: dim d of
    head h's q sits at channel q + h * head + d of qkv (as csrc/include/attention_math.h)."""
    if legacy:
        return 0, head_dim, 2 * head_dim, 3 * head_dim
    return 0, channels, 2 * channels, head_dim


@triton.jit
def _attention_fwd_rows(qkv, T, HEADS, HEAD_DIM, stride_b, stride_c, stride_t,
                        q_chan, k_chan, v_chan, head_chan, scale_log2,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The flash forward of this program's BLOCK_M queries: (acc, m_i, l_i, b, h, offs_m, offs_d)
    with acc (BLOCK_M, BLOCK_D) the unnormalised output, m_i / l_i the rows' running max and
    sum (log2 domain), b (int64) and h the program's sample and head."""
    # program pid_m + (b * HEADS + h) * n_m on one grid axis: B x heads may pass axis 1's limit
    n_m = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    pid_bh = pid // n_m
    pid_m = pid - pid_bh * n_m
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
    return acc, m_i, l_i, b, h, offs_m, offs_d


@triton.jit
def _store_out(out, acc, l_i, b, h, offs_m, offs_d, T, HEAD_DIM, channels):
    """out[b, h * HEAD_DIM + d, t] = acc / l for this program's queries t = offs_m."""
    acc = acc / l_i[:, None]
    o_base = out + (b * channels + h * HEAD_DIM) * T
    tl.store(o_base + offs_d[None, :] * T + offs_m[:, None], acc.to(out.dtype.element_ty),
             mask=(offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _attention_fwd(qkv, out, T, HEADS, HEAD_DIM, stride_b, stride_c, stride_t,
                   q_chan, k_chan, v_chan, head_chan, channels, scale_log2,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    acc, m_i, l_i, b, h, offs_m, offs_d = _attention_fwd_rows(
        qkv, T, HEADS, HEAD_DIM, stride_b, stride_c, stride_t, q_chan, k_chan, v_chan, head_chan,
        scale_log2, BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, DOT_PRECISION)
    _store_out(out, acc, l_i, b, h, offs_m, offs_d, T, HEAD_DIM, channels)


@triton.jit
def _attention_fwd_lse(qkv, out, lse, T, HEADS, HEAD_DIM, stride_b, stride_c, stride_t,
                       q_chan, k_chan, v_chan, head_chan, channels, scale_log2,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """_attention_fwd, also storing lse[b, h, t] = ln(2) * (m + log2(l)) (B, heads, T) fp32: the
    natural-log logsumexp of the row's logits q_t . k / sqrt(ch), for the backward."""
    acc, m_i, l_i, b, h, offs_m, offs_d = _attention_fwd_rows(
        qkv, T, HEADS, HEAD_DIM, stride_b, stride_c, stride_t, q_chan, k_chan, v_chan, head_chan,
        scale_log2, BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, DOT_PRECISION)
    _store_out(out, acc, l_i, b, h, offs_m, offs_d, T, HEAD_DIM, channels)
    row_lse = (m_i + tl.math.log2(l_i)) * LN2
    tl.store(lse + (b * HEADS + h) * T + offs_m, row_lse, mask=offs_m < T)


MAX_HEAD_DIM = 256  # the largest head dim the tile table covers (BLOCK_D 256)
T_BUCKETS = (32, 128)  # T <= 32, T <= 128, longer
D_BUCKETS = (64, 128, 256)  # BLOCK_D = next power of 2 of the head dim (>= 16), up to 64, 128, 256
ARCHS = (80, 90)  # sm_80..sm_89 (<= 99 KiB shared memory per block on sm_86/89), sm_90 and newer

# The tile of every launch: (arch, T bucket, BLOCK_D bucket, dtype) -> (BLOCK_M, BLOCK_N, num_warps,
# num_stages); T bucket 0 is T > 128. "16" is fp16/bf16 (tensor-core dots), "32" fp32 (IEEE fp32
# dots on CUDA cores, whose operand layouts take many more registers: small tiles). Each entry is
# the largest tile of the candidates tried that compiles for sm_80 and sm_90 without register spills
# in the costliest layout (legacy qkv, T contiguous, bf16) -- tests/test_offline_compile.py checks
# that every entry still does. Not yet timed on a GPU: the two archs share their entries until
# someone measures; DDPM_FAST_AUTOTUNE=1 times the candidates instead.
TILE_TABLE: dict[tuple[int, int, int, str], tuple[int, int, int, int]] = {
    (80, 32, 64, "16"): (32, 32, 4, 2),
    (80, 32, 128, "16"): (32, 32, 8, 2),
    (80, 32, 256, "16"): (32, 32, 8, 1),
    (80, 128, 64, "16"): (64, 32, 4, 2),
    (80, 128, 128, "16"): (32, 32, 8, 2),
    (80, 128, 256, "16"): (32, 32, 8, 1),
    (80, 0, 64, "16"): (128, 32, 8, 2),
    (80, 0, 128, "16"): (64, 32, 8, 2),
    (80, 0, 256, "16"): (32, 32, 8, 1),
    (80, 32, 64, "32"): (32, 32, 4, 2),
    (80, 32, 128, "32"): (16, 16, 4, 1),
    (80, 32, 256, "32"): (16, 16, 4, 1),
    (80, 128, 64, "32"): (32, 32, 4, 2),
    (80, 128, 128, "32"): (16, 16, 4, 1),
    (80, 128, 256, "32"): (16, 16, 4, 1),
    (80, 0, 64, "32"): (32, 32, 4, 2),
    (80, 0, 128, "32"): (16, 16, 4, 1),
    (80, 0, 256, "32"): (16, 16, 4, 1),
    (90, 32, 64, "16"): (32, 32, 4, 2),
    (90, 32, 128, "16"): (32, 32, 8, 2),
    (90, 32, 256, "16"): (32, 32, 8, 1),
    (90, 128, 64, "16"): (64, 32, 4, 2),
    (90, 128, 128, "16"): (32, 32, 8, 2),
    (90, 128, 256, "16"): (32, 32, 8, 1),
    (90, 0, 64, "16"): (128, 32, 8, 2),
    (90, 0, 128, "16"): (64, 32, 8, 2),
    (90, 0, 256, "16"): (32, 32, 8, 1),
    (90, 32, 64, "32"): (32, 32, 4, 2),
    (90, 32, 128, "32"): (16, 16, 4, 1),
    (90, 32, 256, "32"): (16, 16, 4, 1),
    (90, 128, 64, "32"): (32, 32, 4, 2),
    (90, 128, 128, "32"): (16, 16, 4, 1),
    (90, 128, 256, "32"): (16, 16, 4, 1),
    (90, 0, 64, "32"): (32, 32, 4, 2),
    (90, 0, 128, "32"): (16, 16, 4, 1),
    (90, 0, 256, "32"): (16, 16, 4, 1),
}


def block_d(head_dim: int) -> int:
    """The head-dim tile: the next power of 2 of head_dim, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def check_head_dim(head_dim: int) -> None:
    """ValueError for a head dim the kernel has no tile for (rather than a resource failure)."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' attention supports head dims C/num_heads from 1 to "
                         f"{MAX_HEAD_DIM}; got {head_dim} (use backend='torch', or more heads)")


def table_key(capability: int, t: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, str]:
    """The TILE_TABLE key of a launch: capability 80, 86, 90, ... (major * 10 + minor), the
    sequence length T, the head dim and qkv's dtype."""
    check_head_dim(head_dim)
    arch = 90 if capability >= 90 else 80
    bucket = next((b for b in T_BUCKETS if t <= b), 0)
    d = next(b for b in D_BUCKETS if block_d(head_dim) <= b)
    return arch, bucket, d, "32" if dtype == torch.float32 else "16"


def tile_config(capability: int, t: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Launch parameters {BLOCK_M, BLOCK_N, num_warps, num_stages} from TILE_TABLE: a function of
    its arguments alone, so every rank and every run of one GPU model computes the same way."""
    block_m, block_n, warps, stages = TILE_TABLE[table_key(capability, t, head_dim, dtype)]
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


def autotune_requested() -> bool:
    """DDPM_FAST_AUTOTUNE=1: time the candidate tiles on first use of each (T, head dim, dtype)."""
    return os.environ.get("DDPM_FAST_AUTOTUNE", "0") == "1"


def _candidate_configs() -> list[triton.Config]:
    """What DDPM_FAST_AUTOTUNE=1 times: tile sizes x (warps, stages), pruned per launch."""
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
    width = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    cap = max(16, triton.next_power_of_2(t))
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= cap and c.kwargs["BLOCK_N"] <= cap
            and not (width >= 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 64)]
    return kept or configs[:1]


# Only with DDPM_FAST_AUTOTUNE=1. cache_results: the timings are stored in Triton's cache directory
# (TRITON_CACHE_DIR, default ~/.triton/cache) and reused by later processes.
_attention_fwd_tuned, _attention_fwd_lse_tuned = (
    triton.autotune(configs=_candidate_configs(), key=["T", "HEAD_DIM"], cache_results=True,
                    prune_configs_by={"early_config_prune": _prune_configs})(kernel)
    for kernel in (_attention_fwd, _attention_fwd_lse))

# The one configuration used under TRITON_INTERPRET=1: small tiles, so T = 64 spans several key
# tiles and the online softmax is exercised.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16}

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_constexprs(dtype: torch.dtype, head_dim: int, interpret: bool) -> dict:
    """The kernel's non-tile constexprs for qkv of `dtype`: BLOCK_D, DOT_DTYPE, DOT_PRECISION."""
    # The interpreter's tl.dot mishandles bf16 operands (numpy has no bf16): there the bf16 tiles
    # are widened to fp32 first (exact), which gives the same products as the GPU's bf16 dot.
    widen = interpret and dtype == torch.bfloat16
    return {"BLOCK_D": block_d(head_dim),
            "DOT_DTYPE": tl.float32 if widen else _TL_DTYPES[dtype],
            "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def launch_dims(qkv: torch.Tensor, num_heads: int) -> tuple[int, int, int, int]:
    """(B, C, head dim, T) of a launch on qkv (B, 3C, T), after the head-dim and 32-bit offset checks."""
    b, width, t = qkv.shape
    check_head_dim(width // 3 // num_heads)
    check_sample_numel("qkv", width * t)
    return b, width // 3, width // 3 // num_heads, t


def _launch(qkv: torch.Tensor, num_heads: int, legacy: bool, with_lse: bool):
    """out (B, C, T); with_lse: (out, lse) with lse (B, heads, T) fp32 (the _attention_fwd_lse kernel)."""
    b, channels, head_dim, t = launch_dims(qkv, num_heads)
    with device_guard(qkv):
        out = torch.empty((b, channels, t), device=qkv.device, dtype=qkv.dtype)
        lse = torch.empty((b, num_heads, t), device=qkv.device, dtype=torch.float32)
        result = (out, lse) if with_lse else out
        if out.numel() == 0:
            return result
        q_chan, k_chan, v_chan, head_chan = qkv_channels(channels, head_dim, legacy)
        args = (qkv, out, *((lse,) if with_lse else ()), t, num_heads, head_dim, *qkv.stride(),
                q_chan, k_chan, v_chan, head_chan, channels, LOG2E / math.sqrt(head_dim))
        kernel, tuned = (_attention_fwd_lse, _attention_fwd_lse_tuned) if with_lse else (
            _attention_fwd, _attention_fwd_tuned)
        interpret = triton_interpret() or qkv.device.type != "cuda"
        common = dot_constexprs(qkv.dtype, head_dim, interpret)
        if interpret:
            tile = INTERPRET_CONFIG
        elif autotune_requested():
            def grid(meta):
                return check_grid("qkv", (triton.cdiv(t, meta["BLOCK_M"]) * b * num_heads,))
            tuned[grid](*args, **common)
            return result
        else:
            major, minor = torch.cuda.get_device_capability(qkv.device)
            tile = tile_config(10 * major + minor, t, head_dim, qkv.dtype)
        grid = check_grid("qkv", (triton.cdiv(t, tile["BLOCK_M"]) * b * num_heads,))
        kernel[grid](*args, **tile, **common)
    return result


@torch.library.custom_op("ddpm_fast::attention_triton", mutates_args=())
def attention_op(qkv: torch.Tensor, num_heads: int, legacy: bool) -> torch.Tensor:
    """The Triton kernel as a torch.library op; see `attention`."""
    return _launch(qkv, num_heads, legacy, with_lse=False)


@torch.library.custom_op("ddpm_fast::attention_lse_triton", mutates_args=())
def attention_lse_op(qkv: torch.Tensor, num_heads: int, legacy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward under autograd: (out, lse), lse (B, heads, T) fp32 the per-query logsumexp of
    the logits q_t . k / sqrt(ch) (natural log), saved for the backward
    (kernels/attention_backward.py)."""
    return _launch(qkv, num_heads, legacy, with_lse=True)


@attention_op.register_fake
def _attention_fake(qkv, num_heads, legacy):
    check_head_dim(qkv.shape[1] // 3 // num_heads)
    return fake_out(qkv)


@attention_lse_op.register_fake
def _attention_lse_fake(qkv, num_heads, legacy):
    check_head_dim(qkv.shape[1] // 3 // num_heads)
    return fake_out(qkv), fake_lse(qkv, num_heads)


def attention(qkv: torch.Tensor, num_heads: int, legacy: bool) -> torch.Tensor:
    """ADM self-attention with the Triton kernel.

    qkv (B, 3*C, T) float32/float16/bfloat16, any strides; num_heads divides C; legacy selects
    QKVAttentionLegacy's per-head [q, k, v] layout, else QKVAttention's [q | k | v].
    Returns (B, C, T) in qkv's dtype. Arguments are checked by ddpm_fast.ops.attention.
    Differentiable: when autograd records, the forward that keeps lse runs and the backward is
    the Triton flash-attention backward of kernels/attention_backward.py.
    """
    if records_grad(qkv):
        return attention_lse_op(qkv, num_heads, legacy)[0]
    return attention_op(qkv, num_heads, legacy)


# The backward kernels and op, and the autograd registration of both forward ops (at the end: that
# module imports this one's helpers).
from . import attention_backward  # noqa: E402,F401
