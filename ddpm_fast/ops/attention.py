"""ops.attention: ADM self-attention read straight from the qkv conv's output, on every backend,
differentiable on every backend.

Autograd (issue 20): each kernel backend has three ops -- the plain forward, the forward that also
returns the per-query logsumexp lse (B, heads, T) fp32, and the flash-attention backward
(grad_out, qkv, out, lse) -> grad_qkv (B, 3C, T) written in qkv's layout:
    C++ (CPU, CUDA):  ddpm_fast::attention, ::attention_lse, ::attention_backward
    Triton:           ddpm_fast::attention_triton, ::attention_lse_triton, ::attention_backward_triton
The lse op saves (qkv, out, lse) for its backward. The C++ family's autograd is C++
(csrc/autograd.cpp: no Python per call; a plain op called under autograd runs the lse forward);
`register_attention_autograd` registers the same formula on the Triton family, whose plain op
saves (qkv, out) and recomputes lse in its backward. Under autograd the public `attention` below
calls the lse op; otherwise the plain forward, which stays as fast as before.
"""
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
        backend: "auto", "torch", "cpu", "cuda" or "triton". Every backend is differentiable:
            when autograd records (grad mode on and qkv requires grad) the kernel's forward also
            saves the per-query logsumexp and the backward is the backend's fused
            flash-attention backward kernel; "torch" is the reference, differentiated by autograd.
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
    if chosen == "torch":
        return reference.attention(qkv, num_heads, layout)
    legacy = layout == "legacy"
    if chosen == "triton":
        return triton_module(OP).attention(qkv, num_heads, legacy)
    if records_grad(qkv):
        return torch.ops.ddpm_fast.attention_lse(qkv, num_heads, legacy)[0]
    return torch.ops.ddpm_fast.attention(qkv, num_heads, legacy)


def fake_out(qkv: torch.Tensor) -> torch.Tensor:
    """The forward's output (B, C, T) for qkv (B, 3C, T), as a fake implementation returns it."""
    b, width, t = qkv.shape
    return qkv.new_empty((b, width // 3, t))


def fake_lse(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The forward's logsumexp (B, heads, T) float32."""
    return qkv.new_empty((qkv.shape[0], num_heads, qkv.shape[2]), dtype=torch.float32)


def register_attention_autograd(plain, with_lse, backward) -> None:
    """Registers autograd on one backend family's forward ops (torch.library.register_autograd).

    plain(qkv, num_heads, legacy) -> out; with_lse(qkv, num_heads, legacy) -> (out, lse);
    backward(grad_out, qkv, out, lse, num_heads, legacy) -> grad_qkv (B, 3C, T). lse is not
    differentiable (its gradient is ignored); num_heads and legacy get None.
    """
    def setup_with_lse(ctx, inputs, output):
        qkv, ctx.num_heads, ctx.legacy = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(qkv, out, lse)

    def backward_with_lse(ctx, grad_out, _grad_lse):
        qkv, out, lse = ctx.saved_tensors
        return backward(grad_out, qkv, out, lse, ctx.num_heads, ctx.legacy), None, None

    def setup_plain(ctx, inputs, output):
        qkv, ctx.num_heads, ctx.legacy = inputs
        ctx.save_for_backward(qkv, output)

    def backward_plain(ctx, grad_out):
        # The plain forward kept no statistics: one more forward pass gives lse (and, unused, out).
        qkv, out = ctx.saved_tensors
        lse = with_lse(qkv, ctx.num_heads, ctx.legacy)[1]
        return backward(grad_out, qkv, out, lse, ctx.num_heads, ctx.legacy), None, None

    torch.library.register_autograd(with_lse, backward_with_lse, setup_context=setup_with_lse)
    torch.library.register_autograd(plain, backward_plain, setup_context=setup_plain)


if extension()[0] is not None:
    @torch.library.register_fake("ddpm_fast::attention")
    def _fake(qkv, num_heads, legacy):
        return fake_out(qkv)

    @torch.library.register_fake("ddpm_fast::attention_lse")
    def _fake_lse(qkv, num_heads, legacy):
        return fake_out(qkv), fake_lse(qkv, num_heads)

    @torch.library.register_fake("ddpm_fast::attention_backward")
    def _fake_backward(grad_out, qkv, out, lse, num_heads, legacy):
        return qkv.new_empty(qkv.shape)

    # The C++ ops' autograd is registered in C++ (csrc/autograd.cpp): no Python on their path.
