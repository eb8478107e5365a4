"""Forward + backward of ops.attention (issue 20): the fused path under autograd (the forward that
saves lse, then the flash-attention backward kernel) against the reference's autograd
(ddpm_fast.reference.attention, guided-diffusion's einsum math in fp32), on U-Net-sized shapes.

Each timed call is one training-style step of the op: out = attention(qkv); out.backward(grad)
with qkv a fresh leaf requiring grad. Records speedup = t_ref / t_fused and TFLOP/s (forward 4 and
backward 10 x B * heads * T^2 * ch flops: two matmuls forward; the P recompute and four matmuls
backward).
"""
from __future__ import annotations

import pytest
import torch

from ddpm_fast import ops, reference
from ddpm_fast._registry import backends, has_kernel


def train_flops(batch: int, heads: int, head_dim: int, length: int) -> float:
    return 14.0 * batch * heads * length * length * head_dim


def make_inputs(batch, heads, head_dim, length, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(batch, 3 * heads * head_dim, length, generator=gen, device=device, dtype=dtype)
    grad = torch.randn(batch, heads * head_dim, length, generator=gen, device=device, dtype=dtype)
    return qkv, grad


def forward_backward(fn, qkv, grad):
    """One forward + backward of fn on a fresh leaf copy of qkv; returns qkv's gradient."""
    x = qkv.detach().requires_grad_()
    fn(x).backward(grad)
    return x.grad


# (B, heads, head dim, T): the digits model's attention (16x16 tokens), an ADM-64 block at 16x16
# with a batch of 4, and one at 32x32.
CPU_CASES = [(8, 4, 32, 256), (4, 4, 64, 256), (1, 8, 64, 1024)]


@pytest.mark.skipif(not has_kernel("attention_backward", "CPU"), reason="ddpm_fast._C is not built")
@pytest.mark.parametrize("layout", ("legacy", "new"))
@pytest.mark.parametrize("batch,heads,head_dim,length", CPU_CASES,
                         ids=[f"B{b}-h{h}x{d}-T{t}" for b, h, d, t in CPU_CASES])
def test_bench_attention_backward_cpu(compare, batch, heads, head_dim, length, layout):
    qkv, grad = make_inputs(batch, heads, head_dim, length, torch.float32, "cpu")

    def fused():
        return forward_backward(lambda x: ops.attention(x, heads, layout, backend="cpu"), qkv, grad)

    def ref():
        return forward_backward(lambda x: reference.attention(x, heads, layout), qkv, grad)

    torch.testing.assert_close(fused(), ref(), atol=1e-4, rtol=1e-4)
    compare(fused, ref, device="cpu", dtype=qkv.dtype, shape=qkv.shape,
            flops=train_flops(batch, heads, head_dim, length), rounds=10)


GPU_CASES = [(8, 8, 64, 256), (8, 8, 64, 1024), (1, 4, 64, 4096)]


@pytest.mark.cuda
@pytest.mark.parametrize("batch,heads,head_dim,length", GPU_CASES,
                         ids=[f"B{b}-h{h}x{d}-T{t}" for b, h, d, t in GPU_CASES])
@pytest.mark.parametrize("backend", ("triton", "cuda"))
def test_bench_attention_backward_gpu(compare, backend, batch, heads, head_dim, length):
    status = backends()[backend]
    if not status or (backend == "cuda" and not has_kernel("attention_backward", "CUDA")):
        pytest.skip(f"backend {backend}: {status}")
    qkv, grad = make_inputs(batch, heads, head_dim, length, torch.float16, "cuda")

    def fused():
        return forward_backward(lambda x: ops.attention(x, heads, "new", backend=backend), qkv, grad)

    def ref():
        return forward_backward(lambda x: reference.attention(x, heads, "new"), qkv, grad)

    torch.testing.assert_close(fused().float(), ref().float(), atol=2e-2, rtol=2e-2)
    compare(fused, ref, device="cuda", dtype=qkv.dtype, shape=qkv.shape,
            flops=train_flops(batch, heads, head_dim, length))
