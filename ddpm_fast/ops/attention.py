"""ops.attention: ADM self-attention read straight from the qkv conv's output, on every backend."""
from __future__ import annotations

import torch

from .. import reference
from .._registry import extension, resolve, triton_module
from ..validate import records_grad
from ._checks import check_tensor

OP = "attention"
LAYOUTS = ("legacy", "new")
CUDA_MAX_HEAD_DIM = 256  # the largest head-dim tile of csrc/cuda/attention.cu


def attention(qkv: torch.Tensor, num_heads: int, layout: str = "legacy",
              backend: str = "auto") -> torch.Tensor:
    """Multi-head self-attention over the T tokens of ADM's qkv tensor.

    Args:
        qkv: (B, 3*C, T) float32/float16/bfloat16, as ADM's 1x1 qkv conv produces it.
        num_heads: heads; must divide C. Head dim ch = C // num_heads.
        layout: "legacy" (per head [q, k, v] blocks, QKVAttentionLegacy) or "new"
            ([q | k | v], QKVAttention).
        backend: "auto", "torch", "cpu", "cuda" or "triton". The kernels are forward-only:
            when autograd records (grad mode on and qkv requires grad) the differentiable
            reference (ddpm_fast.reference.attention) runs instead, whatever the backend.
    Returns:
        (B, C, T) in qkv's dtype: softmax(q^T k / sqrt(ch)) v per head, softmax in fp32.
    """
    check_tensor("qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"qkv must have shape (B, 3*C, T); got {qkv.dim()} dims, shape {tuple(qkv.shape)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'legacy' or 'new'; got {layout!r}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"num_heads must be an int; got {type(num_heads).__name__}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be a positive int; got {num_heads!r}")
    width = qkv.shape[1]
    if width % 3:
        raise ValueError(f"qkv's channel count {width} must be a multiple of 3 (q, k and v)")
    if (width // 3) % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide C={width // 3} (qkv has 3*C={width} channels)")

    chosen = resolve(OP, backend, qkv.device)
    if chosen == "cuda" and width // 3 // num_heads > CUDA_MAX_HEAD_DIM:
        raise ValueError(f"backend='cuda' supports head dims C/num_heads up to {CUDA_MAX_HEAD_DIM}; "
                         f"got {width // 3 // num_heads} (use backend='triton' or 'torch')")
    if chosen == "torch" or records_grad(qkv):
        return reference.attention(qkv, num_heads, layout)
    if chosen == "triton":
        return triton_module(OP).attention(qkv, num_heads, layout == "legacy")
    return torch.ops.ddpm_fast.attention(qkv, num_heads, layout == "legacy")


if extension()[0] is not None:
    @torch.library.register_fake("ddpm_fast::attention")
    def _fake(qkv, num_heads, legacy):
        b, width, t = qkv.shape
        return qkv.new_empty((b, width // 3, t))
