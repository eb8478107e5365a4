"""ops.attention timed against ddpm_fast.reference.attention (guided-diffusion's einsum math in
fp32) and, on a GPU, against F.scaled_dot_product_attention on the same q, k, v.

Records speedup = t_ref / t_fused and TFLOP/s (4 * B * heads * T^2 * ch flops: two matmuls). On a
GPU, at issue 17's shapes (B 8, 8 heads of 64, T 256 / 1024 / 4096, fp16) the target >= 0.9x SDPA
is recorded (reported by benchreport, not gated).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import ops, reference
from ddpm_fast._registry import backends, has_kernel

from conftest import add_target


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

# (batch, heads, T), head dim 64: batch 1 and 64 as a sampler runs them, and issue 17's target shapes
GPU_CASES = [(1, 4, 1024), (1, 4, 4096), (8, 8, 256), (8, 8, 1024), (8, 8, 4096), (64, 4, 1024)]
TARGET_VS_SDPA = 0.9   # issue 17, at batch 8 with 8 heads


def _sdpa(qkv, heads, layout):
    """torch's fused SDPA on q, k, v views of qkv in (B, heads, T, ch): the baseline a user would
    write; the views are strided like our kernels' inputs (SDPA copies as it needs)."""
    q, k, v = (t.reshape(qkv.shape[0], heads, -1, qkv.shape[2]).transpose(2, 3)
               for t in reference.split_qkv(qkv, heads, layout))
    out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, ch)
    return out.transpose(2, 3).reshape(qkv.shape[0], -1, qkv.shape[2])


@pytest.mark.cuda
@pytest.mark.parametrize("baseline", ("sdpa", "reference"))
@pytest.mark.parametrize("batch,heads,length", GPU_CASES, ids=[f"B{b}-h{h}-T{t}" for b, h, t in GPU_CASES])
@pytest.mark.parametrize("backend", ("triton", "cuda"))
def test_bench_attention_gpu(compare, benchmark, backend, batch, heads, length, baseline):
    status = backends()[backend]
    if not status or (backend == "cuda" and not has_kernel("attention", "CUDA")):
        pytest.skip(f"backend {backend}: {status}")
    head_dim, layout = 64, "new"
    weights_bytes = batch * heads * length * length * 4
    if baseline == "reference" and 3 * weights_bytes > torch.cuda.get_device_properties(0).total_memory:
        pytest.skip("the reference's fp32 (B*heads, T, T) weights do not fit this GPU")
    qkv = make_qkv(batch, heads, head_dim, length, torch.float16, "cuda")
    ref = (lambda: _sdpa(qkv, heads, layout)) if baseline == "sdpa" else (
        lambda: reference.attention(qkv, heads, layout))
    # first call outside the timing (autotuning), and a correctness check at fp16 tolerance
    torch.testing.assert_close(ops.attention(qkv, heads, layout, backend=backend), _sdpa(qkv, heads, layout),
                               atol=2e-3, rtol=2e-3)
    speedup = compare(lambda: ops.attention(qkv, heads, layout, backend=backend), ref,
                      device="cuda", dtype=qkv.dtype, shape=qkv.shape,
                      flops=attention_flops(batch, heads, head_dim, length),
                      baseline="F.scaled_dot_product_attention" if baseline == "sdpa" else None)
    if baseline == "sdpa" and (batch, heads) == (8, 8):
        add_target(benchmark, "speed vs F.scaled_dot_product_attention", speedup, TARGET_VS_SDPA,
                   kind="min", issue=17)
