"""Pure-PyTorch definitions of every fused op: the oracle of the tests and the baseline of the
benchmarks. Each function computes in float32 whatever the input dtype and returns the input's
dtype, as guided-diffusion's GroupNorm32 and softmax-in-fp32 do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(N, C) -> (N, C, 1, ..., 1) broadcasting over `ndim - 2` spatial dims."""
    return t.float().reshape(*t.shape, *([1] * (ndim - 2)))


def group_norm_scale_shift(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                           bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                           shift: torch.Tensor | None = None, eps: float = 1e-5,
                           silu: bool = False) -> torch.Tensor:
    """ADM's AdaGN: GroupNorm(x) * (1 + scale) + shift, then SiLU.

    x (N, C, *spatial); weight, bias (C,) (the GroupNorm affine); scale, shift (N, C).
    Returns a tensor shaped and typed like x.
    """
    h = F.group_norm(x.float(), num_groups,
                     None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if scale is not None:
        h = h * (1 + _per_channel(scale, x.dim()))
    if shift is not None:
        h = h + _per_channel(shift, x.dim())
    if silu:
        h = F.silu(h)
    return h.to(x.dtype)


def split_qkv(qkv: torch.Tensor, num_heads: int, layout: str):
    """Views q, k, v of shape (B * heads, ch, T) of ADM's qkv tensor (B, 3 * heads * ch, T).

    layout "legacy": per head a [q, k, v] block (QKVAttentionLegacy);
    layout "new": [q for all heads | k | v] (QKVAttention).
    """
    b, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if layout == "legacy":
        q, k, v = qkv.reshape(b * num_heads, 3 * ch, length).split(ch, dim=1)
    elif layout == "new":
        q, k, v = (t.reshape(b * num_heads, ch, length) for t in qkv.chunk(3, dim=1))
    else:
        raise ValueError(f"layout must be 'legacy' or 'new', got {layout!r}")
    return q, k, v


def attention(qkv: torch.Tensor, num_heads: int, layout: str = "legacy") -> torch.Tensor:
    """ADM self-attention: qkv (B, 3*C, T) -> (B, C, T), softmax(q^T k / sqrt(ch)) over keys, in fp32."""
    b, width, length = qkv.shape
    q, k, v = (t.float() for t in split_qkv(qkv, num_heads, layout))
    ch = q.shape[1]
    weight = torch.einsum("bct,bcs->bts", q, k) * (1.0 / math.sqrt(ch))
    weight = torch.softmax(weight, dim=-1)
    out = torch.einsum("bts,bcs->bct", weight, v)
    return out.reshape(b, width // 3, length).to(qkv.dtype)
