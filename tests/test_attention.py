"""ops.attention: every backend against the reference, the reference against guided-diffusion's
attention math, both qkv layouts, the op registrations and the argument errors.

CPU runs: the C++ kernel (backend "cpu") on shapes up to T = 1024, the Triton kernel under
TRITON_INTERPRET=1 on small shapes (T <= 64). GPU runs (@pytest.mark.cuda): the CUDA C++ and the
Triton kernels on CUDA tensors.
"""
from __future__ import annotations

import math

import pytest
import torch

import ddpm_fast
from ddpm_fast import ops, reference
from ddpm_fast._registry import backends, extension, has_kernel

from conftest import device_of

LAYOUTS = ("legacy", "new")
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
HALF_DTYPES = (torch.float16, torch.bfloat16)


def make_qkv(batch, heads, head_dim, length, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    """qkv (B, 3 * heads * head_dim, T) with N(0, scale^2) entries."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, 3 * heads * head_dim, length, generator=gen) * scale
    return qkv.to(device=device, dtype=dtype)


def strided_qkv(qkv, order, pad=0):
    """qkv (B, 3C, T) in a stride order: "t" T-contiguous (the NCHW conv output: stride_t == 1),
    "c" channel-contiguous (a (B, T, 3C) buffer read as (B, 3C, T): the channels_last view), each
    with `pad` unused elements after every row of the contiguous dim (strides past the sizes)."""
    if order == "t":
        buf = qkv.new_zeros(*qkv.shape[:2], qkv.shape[2] + pad)
        buf[..., :qkv.shape[2]] = qkv
        out = buf[..., :qkv.shape[2]]
    else:
        buf = qkv.new_zeros(qkv.shape[0], qkv.shape[2], qkv.shape[1] + pad)
        buf[..., :qkv.shape[1]] = qkv.transpose(1, 2)
        out = buf[..., :qkv.shape[1]].transpose(1, 2)
    assert torch.equal(out, qkv)
    return out


def check_close(out, qkv, heads, layout):
    expected = reference.attention(qkv, heads, layout)
    assert out.shape == expected.shape
    assert out.dtype == qkv.dtype
    assert out.device == qkv.device
    torch.testing.assert_close(out.float(), expected.float(), **TOL[qkv.dtype])


def available(backend: str) -> bool:
    return bool(backends()[backend]) and (backend in ("torch", "triton") or has_kernel("attention", backend.upper()))


needs_cpu_kernel = pytest.mark.skipif(not has_kernel("attention", "CPU"),
                                      reason="ddpm_fast._C (CPU attention kernel) is not built")
needs_triton = pytest.mark.skipif(not backends()["triton"], reason="triton backend unavailable here")


# ---- the reference itself ---------------------------------------------------------------------

def gd_legacy_attention(qkv, n_heads):
    """guided-diffusion's QKVAttentionLegacy forward, re-derived: per head a [q, k, v] channel
    block; the 1/sqrt(ch) scale split as 1/sqrt(sqrt(ch)) on q and on k; softmax in fp32."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    per_head = qkv.reshape(bs * n_heads, 3 * ch, length)
    q, k, v = per_head[:, :ch], per_head[:, ch:2 * ch], per_head[:, 2 * ch:]
    s = 1 / math.sqrt(math.sqrt(ch))
    logits = torch.einsum("nct,ncs->nts", q * s, k * s)
    probs = torch.softmax(logits.float(), dim=-1).type(logits.dtype)
    return torch.einsum("nts,ncs->nct", probs, v).reshape(bs, -1, length)


def gd_new_attention(qkv, n_heads):
    """guided-diffusion's QKVAttention forward, re-derived: [q of all heads | k | v]."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv[:, :width // 3], qkv[:, width // 3:2 * width // 3], qkv[:, 2 * width // 3:]
    s = 1 / math.sqrt(math.sqrt(ch))
    logits = torch.einsum("nct,ncs->nts", (q * s).reshape(bs * n_heads, ch, length),
                          (k * s).reshape(bs * n_heads, ch, length))
    probs = torch.softmax(logits.float(), dim=-1).type(logits.dtype)
    return torch.einsum("nts,ncs->nct", probs, v.reshape(bs * n_heads, ch, length)).reshape(bs, -1, length)


@pytest.mark.parametrize("layout,gd", [("legacy", gd_legacy_attention), ("new", gd_new_attention)])
@pytest.mark.parametrize("batch,heads,head_dim,length", [(1, 1, 8, 1), (2, 4, 16, 64), (3, 2, 64, 100)])
def test_reference_matches_guided_diffusion_math(layout, gd, batch, heads, head_dim, length):
    qkv = make_qkv(batch, heads, head_dim, length, seed=1)
    torch.testing.assert_close(reference.attention(qkv, heads, layout), gd(qkv, heads), atol=1e-5, rtol=1e-5)


def pack(q, k, v, layout):
    """q, k, v (B, heads, ch, T) -> qkv (B, 3 * heads * ch, T) in `layout`."""
    b, heads, ch, length = q.shape
    if layout == "legacy":
        return torch.cat([q, k, v], dim=2).reshape(b, 3 * heads * ch, length)
    return torch.cat([t.reshape(b, heads * ch, length) for t in (q, k, v)], dim=1)


def per_head_attention(q, k, v):
    """Plain loop over batch and heads: out[b, h] = v softmax(q^T k / sqrt(ch))^T, (B, heads*ch, T)."""
    b, heads, ch, length = q.shape
    out = torch.empty(b, heads, ch, length, dtype=torch.float64)
    for i in range(b):
        for h in range(heads):
            logits = q[i, h].double().T @ k[i, h].double() / math.sqrt(ch)  # (T, T)
            out[i, h] = (torch.softmax(logits, dim=-1) @ v[i, h].double().T).T
    return out.reshape(b, heads * ch, length)


def backends_here():
    """The backends runnable here: torch, the C++ CPU kernel, Triton (on the GPU or the interpreter;
    tensors go on device_of(backend))."""
    names = ["torch"]
    if has_kernel("attention", "CPU"):
        names.append("cpu")
    if backends()["triton"]:
        names.append("triton")
    return names


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", backends_here())
def test_layout_places_heads(layout, backend):
    """Independent of split_qkv: heads packed by hand in each layout give per-head attention."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 8, 20, generator=gen) for _ in range(3))
    out = ops.attention(pack(q, k, v, layout).to(device_of(backend)), 3, layout, backend=backend)
    torch.testing.assert_close(out.cpu().double(), per_head_attention(q, k, v), atol=1e-5, rtol=1e-4)


def test_layouts_differ():
    """The two layouts read different channels: the test data must tell them apart."""
    qkv = make_qkv(1, 2, 8, 16, seed=3)
    assert not torch.allclose(reference.attention(qkv, 2, "legacy"), reference.attention(qkv, 2, "new"))


# ---- the C++ CPU kernel -----------------------------------------------------------------------

# (B, heads, head_dim, T): together every B in {1, 4}, heads in {1, 2, 4, 8}, head dims
# {8, 32, 64, 128} and T in {1, 16, 64, 256, 1024}.
CPU_SHAPES = [
    (1, 1, 8, 1), (4, 2, 32, 16), (1, 4, 64, 64), (4, 8, 8, 256), (1, 2, 128, 1024),
    (4, 1, 64, 1), (1, 8, 32, 256), (4, 4, 128, 64), (1, 1, 64, 1024), (4, 2, 8, 16),
    (1, 3, 48, 37),
]


@needs_cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_matches_reference_fp32(shape, layout):
    qkv = make_qkv(*shape, seed=sum(shape))
    check_close(ops.attention(qkv, shape[1], layout, backend="cpu"), qkv, shape[1], layout)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 1, 8, 1), (4, 2, 32, 16), (1, 4, 64, 256), (1, 8, 128, 64),
                                   (2, 2, 32, 600)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cpu_matches_reference_half(shape, layout, dtype):
    qkv = make_qkv(*shape, dtype=dtype, seed=sum(shape))
    check_close(ops.attention(qkv, shape[1], layout, backend="cpu"), qkv, shape[1], layout)


@needs_cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("length", [40, 530])  # the GEMM path (T < 512) and the SDPA path
def test_cpu_strided_input(layout, length):
    base = make_qkv(2, 2, 16, length, seed=12)
    transposed = base.transpose(1, 2).contiguous().transpose(1, 2)
    check_close(ops.attention(transposed, 2, layout, backend="cpu"), transposed, 2, layout)
    sliced = torch.cat([base, base], dim=2)[:, :, 3:3 + length]
    check_close(ops.attention(sliced, 2, layout, backend="cpu"), sliced, 2, layout)


@needs_cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_auto_backend_is_the_kernel(layout):
    qkv = make_qkv(2, 2, 16, 24, seed=4)
    torch.testing.assert_close(ops.attention(qkv, 2, layout),
                               torch.ops.ddpm_fast.attention(qkv, 2, layout == "legacy"), atol=0, rtol=0)


@needs_cpu_kernel
def test_cpu_opcheck():
    for legacy in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            qkv = make_qkv(2, 2, 8, 12, dtype=dtype, seed=5)
            torch.library.opcheck(torch.ops.ddpm_fast.attention.default, (qkv, 2, legacy))


@needs_cpu_kernel
def test_cpu_direct_call_errors():
    """A direct torch.ops call is checked in C++ too (RuntimeError naming the argument)."""
    with pytest.raises(RuntimeError, match="qkv"):
        torch.ops.ddpm_fast.attention(torch.randn(2, 6), 1, True)
    with pytest.raises(RuntimeError, match="num_heads"):
        torch.ops.ddpm_fast.attention(torch.randn(1, 12, 5), 3, True)
    with pytest.raises(RuntimeError, match="multiple of 3"):
        torch.ops.ddpm_fast.attention(torch.randn(1, 10, 5), 1, True)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.ddpm_fast.attention(torch.randn(1, 12, 5, dtype=torch.float64), 1, True)


# ---- the Triton kernel under the interpreter ----------------------------------------------------

TRITON_SHAPES = [(1, 1, 8, 1), (4, 2, 32, 16), (1, 4, 64, 64), (1, 2, 128, 33), (4, 8, 8, 64)]


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference_fp32(shape, layout, triton_device):
    qkv = make_qkv(*shape, seed=sum(shape), device=triton_device)
    check_close(ops.attention(qkv, shape[1], layout, backend="triton"), qkv, shape[1], layout)


@needs_triton
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 1, 8, 1), (2, 2, 64, 64), (1, 2, 32, 50)],
                         ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference_half(shape, layout, dtype, triton_device):
    qkv = make_qkv(*shape, dtype=dtype, seed=sum(shape), device=triton_device)
    check_close(ops.attention(qkv, shape[1], layout, backend="triton"), qkv, shape[1], layout)


@needs_triton
def test_triton_opcheck(triton_device):
    qkv = make_qkv(1, 2, 16, 20, seed=6, device=triton_device)
    from ddpm_fast.kernels import attention as triton_attention

    torch.library.opcheck(triton_attention.attention_op, (qkv, 2, False))


# Compiles the Triton kernel for sm_90 in a child process: the interpreter (TRITON_INTERPRET=1,
# set for this process) replaces triton's code generator, so the GPU lowering needs a clean one.
SM90_COMPILE_SCRIPT = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ddpm_fast.kernels import attention as A
fn = A._attention_fwd
scalars = {"T": "i32", "HEADS": "i32", "HEAD_DIM": "i32", "stride_b": "i32", "stride_c": "i32",
           "stride_t": "i32", "q_chan": "i32", "k_chan": "i32", "v_chan": "i32", "head_chan": "i32",
           "channels": "i32", "scale_log2": "fp32"}
results = []
for spec in sys.argv[1:]:
    dtype, bm, bn, bd, warps, stages = spec.split(",")
    consts = {"BLOCK_M": int(bm), "BLOCK_N": int(bn), "BLOCK_D": int(bd),
              "DOT_DTYPE": {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}[dtype],
              "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    sig = {"qkv": "*" + dtype, "out": "*" + dtype, **scalars, **{k: "constexpr" for k in consts}}
    assert list(sig) == fn.arg_names, fn.arg_names
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": int(warps), "num_stages": int(stages)})
    results.append({"spec": spec, "cubin_bytes": len(kernel.asm["cubin"]), "mma": "mma" in kernel.asm["ptx"]})
print(json.dumps(results))
"""


@needs_triton
def test_triton_kernel_compiles_for_sm90():
    """Lower the kernel to sm_90 cubins without a GPU: catches what the interpreter does not check
    (dot shapes and dtypes, layouts, shared memory); the half dtypes must use tensor-core MMA."""
    import json
    import os
    import subprocess
    import sys

    specs = ["fp16,64,64,64,4,2", "bf16,128,64,128,8,3", "fp32,64,32,64,4,2", "fp16,16,16,16,4,2"]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", SM90_COMPILE_SCRIPT, *specs], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["spec"] for r in results] == specs
    for r in results:
        assert r["cubin_bytes"] > 0
        assert r["mma"] == (not r["spec"].startswith("fp32")), r


# ---- properties every CPU-runnable backend must have ------------------------------------------

@pytest.mark.parametrize("backend", [b for b in backends_here() if b != "torch"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_input(backend, layout):
    """qkv need not be contiguous: a (B, T, 3C) tensor transposed, and a channel slice."""
    base = make_qkv(2, 2, 16, 40, seed=7, device=device_of(backend))
    transposed = base.transpose(1, 2).contiguous().transpose(1, 2)
    assert not transposed.is_contiguous()
    check_close(ops.attention(transposed, 2, layout, backend=backend), transposed, 2, layout)
    wide = make_qkv(2, 2, 16, 40, seed=8, device=device_of(backend))
    sliced = torch.cat([wide, wide], dim=2)[:, :, 5:45]
    assert not sliced.is_contiguous()
    check_close(ops.attention(sliced, 2, layout, backend=backend), sliced, 2, layout)


@pytest.mark.parametrize("backend", [b for b in backends_here() if b != "torch"])
def test_large_logits_are_stable(backend):
    """Logits of size ~1e3: a softmax without max subtraction overflows; the online one must not."""
    qkv = make_qkv(1, 2, 32, 48, seed=9, scale=6.0, device=device_of(backend))
    out = ops.attention(qkv, 2, "new", backend=backend)
    assert torch.isfinite(out).all()
    # fp32 logits of size ~1e2 carry rounding ~1e-5 that exp() turns into relative errors of the
    # same size on outputs of size ~6: the tolerance scales with the data.
    torch.testing.assert_close(out, reference.attention(qkv, 2, "new"), atol=3e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", [b for b in backends_here() if b != "torch"])
def test_empty_batch(backend):
    qkv = make_qkv(0, 2, 8, 16, device=device_of(backend))
    out = ops.attention(qkv, 2, "legacy", backend=backend)
    assert out.shape == (0, 16, 16)


# ---- argument errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends_here())
def test_errors(backend):
    device = device_of(backend)
    good = make_qkv(1, 2, 8, 4, device=device)
    with pytest.raises(ValueError, match="qkv must have shape"):
        ops.attention(good[0], 2, backend=backend)
    with pytest.raises(ValueError, match="qkv must have shape"):
        ops.attention(good[None], 2, backend=backend)
    with pytest.raises(ValueError, match="multiple of 3"):
        ops.attention(torch.randn(1, 47, 4, device=device), 1, backend=backend)
    with pytest.raises(ValueError, match="num_heads=3 must divide C=16"):
        ops.attention(good, 3, backend=backend)
    with pytest.raises(ValueError, match="qkv must have dtype"):
        ops.attention(good.double(), 2, backend=backend)
    with pytest.raises(ValueError, match="qkv must have dtype"):
        ops.attention(good.to(torch.int32), 2, backend=backend)
    with pytest.raises(TypeError, match="qkv must be a torch.Tensor"):
        ops.attention(good.cpu().numpy(), 2, backend=backend)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        ops.attention(good, 0, backend=backend)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        ops.attention(good, 2.0, backend=backend)
    with pytest.raises(ValueError, match="layout must be 'legacy' or 'new'"):
        ops.attention(good, 2, "newest", backend=backend)


def test_backend_errors():
    qkv = make_qkv(1, 2, 8, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.attention(qkv, 2, backend="flash")
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors"):
        ops.attention(qkv, 2, backend="cuda")


# ---- registrations ------------------------------------------------------------------------------

def test_cuda_kernel_registered_when_compiled():
    ext = extension()[0]
    if ext is None or not ext.cuda_compiled():
        pytest.skip("ddpm_fast._C was built without CUDA")
    assert has_kernel("attention", "CUDA")
    assert has_kernel("attention", "CPU")


def test_fake_impl_shapes():
    if extension()[0] is None:
        pytest.skip("ddpm_fast._C is not built")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qkv = torch.empty(3, 3 * 64, 17, dtype=torch.float16)
        out = torch.ops.ddpm_fast.attention(qkv, 4, False)
    assert out.shape == (3, 64, 17) and out.dtype == torch.float16


# ---- GPU ----------------------------------------------------------------------------------------

GPU_SHAPES = [
    (1, 1, 8, 1), (4, 2, 32, 16), (1, 4, 64, 64), (4, 8, 8, 256), (1, 2, 128, 1024),
    (4, 4, 64, 1024), (2, 1, 48, 300), (1, 4, 64, 4096), (2, 2, 16, 77), (1, 1, 256, 64),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_gpu_matches_reference(backend, shape, layout, dtype):
    if not available(backend):
        pytest.skip(f"backend {backend}: {backends()[backend]}")
    qkv = make_qkv(*shape, dtype=dtype, device="cuda", seed=sum(shape))
    check_close(ops.attention(qkv, shape[1], layout, backend=backend), qkv, shape[1], layout)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ("cuda", "triton"))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_strided_and_stable(backend, layout):
    if not available(backend):
        pytest.skip(f"backend {backend}: {backends()[backend]}")
    base = make_qkv(2, 4, 64, 200, device="cuda", seed=10, scale=4.0)
    transposed = base.transpose(1, 2).contiguous().transpose(1, 2)
    out = ops.attention(transposed, 4, layout, backend=backend)
    assert torch.isfinite(out).all()
    check_close(out, transposed, 4, layout)


@pytest.mark.cuda
def test_gpu_cuda_opcheck():
    if not has_kernel("attention", "CUDA"):
        pytest.skip("no CUDA kernel registered")
    qkv = make_qkv(2, 2, 32, 40, dtype=torch.float16, device="cuda", seed=11)
    torch.library.opcheck(torch.ops.ddpm_fast.attention.default, (qkv, 2, True))


# ---- GPU: the tensor-core kernel (fp16 / bf16, head dims 32, 64, 128) and its fallbacks ---------

def cuda_kernels_run(fn):
    """fn()'s result and the names of the CUDA kernels it launched (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, {e.key for e in prof.key_averages()}


def ran_tensor_cores(names) -> bool:
    return any("attention_tc_kernel" in n for n in names)


@pytest.mark.cuda
@pytest.mark.parametrize("order", ["t", "c"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", (32, 64, 128))
@pytest.mark.parametrize("batch,heads,length", [(2, 3, 80), (1, 2, 200), (2, 4, 1000), (1, 1, 4096)], ids=str)
def test_gpu_tensor_cores_match_reference(batch, heads, length, head_dim, dtype, layout, order):
    """The mma.sync kernel reads both layouts in both stride orders in place (T-contiguous: the
    NCHW conv output; channel-contiguous: the channels_last view), T not a multiple of the tiles."""
    if not has_kernel("attention", "CUDA"):
        pytest.skip("no CUDA kernel registered")
    qkv = strided_qkv(make_qkv(batch, heads, head_dim, length, dtype, device="cuda", seed=length + head_dim), order)
    out, names = cuda_kernels_run(lambda: ops.attention(qkv, heads, layout, backend="cuda"))
    assert ran_tensor_cores(names), names
    check_close(out, qkv, heads, layout)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("order,pad,length", [("t", 4, 84), ("t", 8, 130), ("c", 8, 70), ("c", 24, 333)], ids=str)
def test_gpu_tensor_cores_padded_strides_and_large_logits(order, pad, length, dtype):
    """Strides past the sizes (views of padded buffers; T = 84, 130: a 16-byte chunk of tokens
    straddles T) and logits of scale 16 (the online softmax's rescaling)."""
    if not has_kernel("attention", "CUDA"):
        pytest.skip("no CUDA kernel registered")
    qkv = strided_qkv(make_qkv(2, 2, 64, length, dtype, device="cuda", seed=7, scale=4.0), order, pad)
    out, names = cuda_kernels_run(lambda: ops.attention(qkv, 2, "new", backend="cuda"))
    assert ran_tensor_cores(names), names
    assert torch.isfinite(out).all()
    check_close(out, qkv, 2, "new")


def gpu_fallback_qkv(kind, dtype):
    qkv = make_qkv(2, 2, 64, 96, dtype, device="cuda", seed=5)
    if kind == "misaligned":  # base 2 bytes past a 16-byte boundary
        return torch.cat([qkv.new_zeros(1), qkv.flatten()])[1:].view(qkv.shape)
    if kind == "no unit stride":  # every other token: stride_t == 2
        return torch.repeat_interleave(qkv, 2, dim=2)[..., ::2]
    if kind == "stride_c not 8-aligned":  # T-contiguous rows of T + 1 elements
        return strided_qkv(qkv, "t", pad=1)
    if kind == "stride_t not 8-aligned":  # channel-contiguous rows of 3C + 1 elements
        return strided_qkv(qkv, "c", pad=1)
    if kind == "head dim 48":
        return make_qkv(2, 2, 48, 96, dtype, device="cuda", seed=6)
    return qkv.float()  # fp32 keeps the scalar kernel


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["misaligned", "no unit stride", "stride_c not 8-aligned", "stride_t not 8-aligned",
                                  "head dim 48", "fp32"])
def test_gpu_tensor_core_fallbacks(kind, dtype):
    """What the tensor-core kernel cannot read with 16-byte cp.async (or computes in fp32) runs the
    scalar kernel, correctly."""
    if not has_kernel("attention", "CUDA"):
        pytest.skip("no CUDA kernel registered")
    qkv = gpu_fallback_qkv(kind, dtype)
    heads = 2
    out, names = cuda_kernels_run(lambda: ops.attention(qkv, heads, "legacy", backend="cuda"))
    assert not ran_tensor_cores(names) and any("attention_fwd_kernel" in n for n in names), names
    check_close(out, qkv, heads, "legacy")


@pytest.mark.cuda
def test_gpu_tensor_cores_current_stream_and_device_guard():
    """The launch goes to the current stream (results correct when read after that stream's work)."""
    if not has_kernel("attention", "CUDA"):
        pytest.skip("no CUDA kernel registered")
    qkv = make_qkv(2, 2, 64, 256, torch.float16, device="cuda", seed=12)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = ops.attention(qkv, 2, "legacy", backend="cuda")
    stream.synchronize()
    check_close(out, qkv, 2, "legacy")
