"""ops.attention timed against ddpm_fast.reference.attention (guided-diffusion's einsum math in
fp32) and, on a GPU, against F.scaled_dot_product_attention on the same q, k, v.

Records speedup = t_ref / t_fused and TFLOP/s (4 * B * heads * T^2 * ch flops: two matmuls).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import ops, reference
from ddpm_fast._registry import backends, has_kernel


def attention_flops(batch: int, heads: int, head_dim: int, length: int) -> float:
    return 4.0 * batch * heads * length * length * head_dim


def make_qkv(batch, heads, head_dim, length, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    return torch.randn(batch, 3 * heads * head_dim, length, generator=gen, device=device, dtype=dtype)


# ---- CPU: the C++ kernel (SDPA on a packed view) vs the reference -------------------------------

@pytest.mark.skipif(not has_kernel("attention", "CPU"), reason="ddpm_fast._C is not built")
@pytest.mark.parametrize("layout", ("legacy", "new"))
@pytest.mark.parametrize("batch,heads,head_dim,length", [(4, 4, 64, 256), (1, 8, 64, 1024)],
                         ids=["qkv4x768x256-h4", "qkv1x1536x1024-h8"])
def test_bench_attention_cpu(compare, batch, heads, head_dim, length, layout):
    qkv = make_qkv(batch, heads, head_dim, length, torch.float32, "cpu")
    torch.testing.assert_close(ops.attention(qkv, heads, layout, backend="cpu"),
                               reference.attention(qkv, heads, layout), atol=1e-5, rtol=1e-4)
    compare(lambda: ops.attention(qkv, heads, layout, backend="cpu"),
                      lambda: reference.attention(qkv, heads, layout),
                      device="cpu", dtype=qkv.dtype, shape=qkv.shape,
                      flops=attention_flops(batch, heads, head_dim, length), rounds=10)


# ---- GPU: Triton and CUDA C++ vs SDPA and vs the reference ---------------------------------------

GPU_CASES = [(b, t) for b in (1, 16, 64) for t in (256, 1024, 4096)]


def _sdpa(qkv, heads, layout):
    """torch's fused SDPA on q, k, v views of qkv in (B, heads, T, ch): the baseline a user would
    write; the views are strided like our kernels' inputs (SDPA copies as it needs)."""
    q, k, v = (t.reshape(qkv.shape[0], heads, -1, qkv.shape[2]).transpose(2, 3)
               for t in reference.split_qkv(qkv, heads, layout))
    out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, ch)
    return out.transpose(2, 3).reshape(qkv.shape[0], -1, qkv.shape[2])


@pytest.mark.cuda
@pytest.mark.parametrize("baseline", ("sdpa", "reference"))
@pytest.mark.parametrize("batch,length", GPU_CASES, ids=[f"B{b}-T{t}" for b, t in GPU_CASES])
@pytest.mark.parametrize("backend", ("triton", "cuda"))
def test_bench_attention_gpu(compare, backend, batch, length, baseline):
    status = backends()[backend]
    if not status or (backend == "cuda" and not has_kernel("attention", "CUDA")):
        pytest.skip(f"backend {backend}: {status}")
    heads, head_dim, layout = 4, 64, "new"
    weights_bytes = batch * heads * length * length * 4
    if baseline == "reference" and 3 * weights_bytes > torch.cuda.get_device_properties(0).total_memory:
        pytest.skip("the reference's fp32 (B*heads, T, T) weights do not fit this GPU")
    qkv = make_qkv(batch, heads, head_dim, length, torch.float16, "cuda")
    ref = (lambda: _sdpa(qkv, heads, layout)) if baseline == "sdpa" else (
        lambda: reference.attention(qkv, heads, layout))
    # first call outside the timing (autotuning), and a correctness check at fp16 tolerance
    torch.testing.assert_close(ops.attention(qkv, heads, layout, backend=backend), _sdpa(qkv, heads, layout),
                               atol=2e-3, rtol=2e-3)
    compare(lambda: ops.attention(qkv, heads, layout, backend=backend), ref,
                      device="cuda", dtype=qkv.dtype, shape=qkv.shape,
                      flops=attention_flops(batch, heads, head_dim, length))
