"""Autograd through ops.attention (issue 20): the flash-attention backward of every backend against
the reference's autograd, the saved logsumexp, the op registrations.

* the oracle: torch.autograd.gradcheck of reference.attention (float64 inputs; the reference
  computes in fp32, hence gradcheck's fp32-sized step and tolerances);
* the C++ CPU kernels (ddpm_fast::attention_lse + ::attention_backward) over the forward tests'
  shape / layout / dtype matrix, gradients compared with the reference's autograd in float64;
* the Triton kernels under TRITON_INTERPRET=1 on small shapes (the forward tests' Triton matrix);
* the CUDA C++ kernels on the CPU under the SIMT harness (tests/simt: memory, race and barrier
  checks): the forward's lse output (scalar and tensor-core kernels) and the backward kernels;
* torch.library.opcheck of every op, the autograd registration included;
* on a GPU (@pytest.mark.cuda): the CUDA and Triton backward against the reference.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from ddpm_fast import ops, reference
from ddpm_fast._registry import backends, has_kernel

from test_attention import CPU_SHAPES, HALF_DTYPES, LAYOUTS, TRITON_SHAPES, make_qkv, strided_qkv

# Gradients: 1e-4 in fp32; fp16 / bf16 at 2.5x the forward tests' tolerances (test_attention.TOL):
# the backward rounds P and dZ (Triton), O (delta) and its result to the storage dtype.
GRAD_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
}

# The forward tests' Triton shapes, with (4, 8, 8, 64) -- 32 heads, ~40 s per layout for the three
# interpreted backward kernels -- scaled down to 2 samples x 3 heads (the grid decomposition over
# several samples and heads is still exercised).
TRITON_BACKWARD_SHAPES = [s for s in TRITON_SHAPES if s != (4, 8, 8, 64)] + [(2, 3, 8, 64)]
TRITON_HALF_SHAPES = [(1, 1, 8, 1), (1, 2, 64, 64), (1, 2, 32, 50)]

needs_cpu_kernel = pytest.mark.skipif(not has_kernel("attention_backward", "CPU"),
                                      reason="ddpm_fast._C (CPU attention backward) is not built")
needs_triton = pytest.mark.skipif(not backends()["triton"], reason="triton backend unavailable here")


def reference_grad(qkv, heads, layout, grad_out):
    """d(sum(reference.attention(qkv) * grad_out))/d qkv, computed in float64 from the same
    (rounded) inputs, and the float64 output."""
    x = qkv.detach().cpu().double().requires_grad_()
    out = reference_f64(x, heads, layout)
    out.backward(grad_out.detach().cpu().double())
    return x.grad, out.detach()


def reference_f64(qkv, heads, layout):
    """reference.attention's math in float64 (the reference itself computes in fp32)."""
    q, k, v = reference.split_qkv(qkv, heads, layout)
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(q.shape[1]), dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(qkv.shape[0], -1, qkv.shape[2])


def reference_lse(qkv, heads, layout):
    """(B, heads, T) float64 logsumexp of each query's logits q_t . k / sqrt(ch)."""
    q, k, _ = reference.split_qkv(qkv.detach().cpu().double(), heads, layout)
    logits = torch.einsum("bct,bcs->bts", q, k) / math.sqrt(q.shape[1])
    return torch.logsumexp(logits, -1).reshape(qkv.shape[0], heads, qkv.shape[2])


def fused_grad(qkv, heads, layout, backend, grad_out):
    """(grad of qkv, output, grad_fn) through ops.attention(backend=...) under autograd."""
    x = qkv.detach().clone().requires_grad_()
    out = ops.attention(x, heads, layout, backend=backend)
    out.backward(grad_out)
    return x.grad, out, out.grad_fn


def check_backward(qkv, heads, layout, backend, seed=0):
    """The backend's gradient of qkv equals the reference's (GRAD_TOL), in qkv's dtype and shape."""
    gen = torch.Generator().manual_seed(seed)
    b, width, t = qkv.shape
    grad_out = torch.randn(b, width // 3, t, generator=gen).to(device=qkv.device, dtype=qkv.dtype)
    grad, out, grad_fn = fused_grad(qkv, heads, layout, backend, grad_out)
    # the fused path ran: the C++ node (csrc/autograd.cpp) or the Triton op's Python one
    assert grad_fn.name().endswith("::Attention>") or "attention_lse" in grad_fn.name(), grad_fn.name()
    want, want_out = reference_grad(qkv, heads, layout, grad_out)
    assert grad.shape == qkv.shape and grad.dtype == qkv.dtype and grad.device == qkv.device
    torch.testing.assert_close(grad.cpu().double(), want, **GRAD_TOL[qkv.dtype])
    return grad


# ---- the oracle -----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 1, 4, 5), (2, 2, 3, 6)], ids=str)
def test_reference_gradcheck(shape, layout):
    """gradcheck of the oracle. reference.attention computes in fp32 whatever the input dtype, so
    the finite differences use a step of 1e-3 (fp32 rounding / eps ~ 1e-4) and tolerances of 1e-3;
    a wrong formula is off by O(1)."""
    qkv = make_qkv(*shape, seed=7).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: reference.attention(x, shape[1], layout), (qkv,),
                                     eps=1e-3, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_f64_matches_reference(layout):
    """The float64 twin used as the gradients' oracle is the reference's math."""
    qkv = make_qkv(2, 2, 8, 12, seed=8)
    torch.testing.assert_close(reference_f64(qkv.double(), 2, layout).float(), reference.attention(qkv, 2, layout),
                               atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda x: reference_f64(x, 2, layout), (qkv[:1, :, :5].double().requires_grad_(),))


# ---- the C++ CPU kernels --------------------------------------------------------------------------

@needs_cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_backward_matches_reference_fp32(shape, layout):
    check_backward(make_qkv(*shape, seed=sum(shape)), shape[1], layout, "cpu")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(1, 1, 8, 1), (4, 2, 32, 16), (1, 4, 64, 256), (1, 8, 128, 64),
                                   (2, 2, 32, 600)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cpu_backward_matches_reference_half(shape, layout, dtype):
    check_backward(make_qkv(*shape, dtype=dtype, seed=sum(shape)), shape[1], layout, "cpu")


@needs_cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("length", [40, 530])  # the GEMM forward (T < 512) and the SDPA forward
def test_cpu_backward_strided_input(layout, length):
    """qkv read through its strides: channel-contiguous, and a slice along T; the gradient is a
    contiguous (B, 3C, T) tensor."""
    base = make_qkv(2, 2, 16, length, seed=12)
    check_backward(strided_qkv(base, "c"), 2, layout, "cpu")
    check_backward(torch.cat([base, base], dim=2)[:, :, 3:3 + length], 2, layout, "cpu")


@needs_cpu_kernel
@pytest.mark.parametrize("length", [40, 530])
def test_cpu_lse_matches_reference(length):
    """The forward under autograd returns the per-query logsumexp (GEMM and SDPA paths) and the
    same output as the plain forward."""
    for layout in LAYOUTS:
        qkv = make_qkv(2, 3, 16, length, seed=13)
        out, lse = torch.ops.ddpm_fast.attention_lse(qkv, 3, layout == "legacy")
        assert lse.shape == (2, 3, length) and lse.dtype == torch.float32
        torch.testing.assert_close(lse.double(), reference_lse(qkv, 3, layout), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, torch.ops.ddpm_fast.attention(qkv, 3, layout == "legacy"), atol=1e-6, rtol=0)


@needs_cpu_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_plain_op_is_differentiable(layout):
    """A direct call of torch.ops.ddpm_fast.attention with qkv requiring grad keeps the gradient
    (its backward recomputes lse)."""
    qkv = make_qkv(2, 2, 8, 24, seed=14)
    grad_out = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(1))
    x = qkv.clone().requires_grad_()
    torch.ops.ddpm_fast.attention(x, 2, layout == "legacy").backward(grad_out)
    torch.testing.assert_close(x.grad.double(), reference_grad(qkv, 2, layout, grad_out)[0], **GRAD_TOL[torch.float32])


@needs_cpu_kernel
def test_cpu_lse_output_is_not_differentiable():
    """The saved lse is not differentiable; the public op under torch.no_grad() keeps the plain
    forward (no lse computed)."""
    qkv = make_qkv(1, 2, 8, 10, seed=15).requires_grad_()
    out, lse = torch.ops.ddpm_fast.attention_lse(qkv, 2, True)
    assert out.requires_grad and not lse.requires_grad
    with torch.no_grad():
        assert ops.attention(qkv, 2, "legacy", backend="cpu").grad_fn is None


@needs_cpu_kernel
def test_cpu_opcheck():
    for legacy, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        qkv = make_qkv(2, 2, 8, 12, dtype=dtype, seed=5).requires_grad_()
        torch.library.opcheck(torch.ops.ddpm_fast.attention.default, (qkv, 2, legacy))
        torch.library.opcheck(torch.ops.ddpm_fast.attention_lse.default, (qkv, 2, legacy))
        out, lse = torch.ops.ddpm_fast.attention_lse(qkv.detach(), 2, legacy)
        torch.library.opcheck(torch.ops.ddpm_fast.attention_backward.default,
                              (torch.randn_like(out), qkv.detach(), out, lse, 2, legacy))


@needs_cpu_kernel
def test_cpu_backward_direct_call_errors():
    qkv = make_qkv(1, 2, 8, 10, seed=16)
    out, lse = torch.ops.ddpm_fast.attention_lse(qkv, 2, True)
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.ddpm_fast.attention_backward(out[:, :, :5], qkv, out, lse, 2, True)
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.ddpm_fast.attention_backward(out, qkv, out, lse[:, :1], 2, True)
    with pytest.raises(RuntimeError, match="lse must be float32"):
        torch.ops.ddpm_fast.attention_backward(out, qkv, out, lse.double(), 2, True)


def test_torch_backend_is_the_reference_autograd():
    qkv = make_qkv(1, 2, 8, 10, seed=17).requires_grad_()
    out = ops.attention(qkv, 2, "new", backend="torch")
    assert "attention" not in type(out.grad_fn).__name__.lower()


# ---- the Triton kernels (interpreter here) -----------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", TRITON_BACKWARD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_backward_matches_reference_fp32(shape, layout, triton_device):
    check_backward(make_qkv(*shape, seed=sum(shape), device=triton_device), shape[1], layout, "triton")


@needs_triton
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", TRITON_HALF_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_backward_matches_reference_half(shape, layout, dtype, triton_device):
    check_backward(make_qkv(*shape, dtype=dtype, seed=sum(shape), device=triton_device), shape[1], layout,
                   "triton")


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_backward_strided_input(layout, triton_device):
    base = make_qkv(2, 2, 16, 37, seed=18, device=triton_device)
    check_backward(strided_qkv(base, "c"), 2, layout, "triton")


@needs_triton
def test_triton_lse_and_plain_op(triton_device):
    from ddpm_fast.kernels import attention as tk

    qkv = make_qkv(2, 2, 16, 40, seed=19, device=triton_device)
    out, lse = tk.attention_lse_op(qkv, 2, False)
    torch.testing.assert_close(lse.cpu().double(), reference_lse(qkv, 2, "new"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, tk.attention_op(qkv, 2, False), atol=0, rtol=0)
    grad_out = torch.randn_like(out)
    x = qkv.clone().requires_grad_()
    tk.attention_op(x, 2, False).backward(grad_out)  # the plain op's backward recomputes lse
    torch.testing.assert_close(x.grad.cpu().double(), reference_grad(qkv, 2, "new", grad_out)[0],
                               **GRAD_TOL[torch.float32])


@needs_triton
def test_triton_opcheck(triton_device):
    from ddpm_fast.kernels import attention as tk
    from ddpm_fast.kernels import attention_backward as tkb

    qkv = make_qkv(1, 2, 16, 20, seed=6, device=triton_device)
    torch.library.opcheck(tk.attention_op, (qkv.clone().requires_grad_(), 2, False))
    torch.library.opcheck(tk.attention_lse_op, (qkv.clone().requires_grad_(), 2, True))
    out, lse = tk.attention_lse_op(qkv, 2, True)
    torch.library.opcheck(tkb.attention_backward_op, (torch.randn_like(out), qkv, out, lse, 2, True))


# ---- the CUDA C++ kernels under the SIMT harness (CPU) ------------------------------------------------

_spec = importlib.util.spec_from_file_location("simt_build", Path(__file__).parent / "simt" / "build.py")
simt_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(simt_build)


@pytest.fixture(scope="module")
def simt_ops():
    """The SIMT builds of csrc/cuda/attention.cu (forward, lse) and attention_backward.cu."""
    simt_build.load_runtime()
    jobs = [("attention", (), ""), ("attention_backward", (), "")]
    simt_build.build_kernels(jobs)  # compiles what is not cached, in parallel
    names = {stem: getattr(torch.ops, simt_build.load_kernels(stem)) for stem, *_ in jobs}
    torch.ops.simt.enable()
    torch.ops.simt.configure(2**31 - 1, 65535, 65535, 4, 0)
    yield names
    torch.ops.simt.disable()


def simt_backward(simt_ops, qkv, heads, layout, seed=0):
    """The SIMT forward-with-lse and backward vs the reference: lse, output and grad_qkv; returns
    the threads per block of the forward kernel that ran (256 scalar, 128 tensor cores)."""
    legacy = layout == "legacy"
    before = torch.ops.simt.stats()
    out, lse = simt_ops["attention"].attention_lse(qkv, heads, legacy)
    after = torch.ops.simt.stats()
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen).to(qkv.dtype)
    grad = simt_ops["attention_backward"].attention_backward(grad_out, qkv, out, lse, heads, legacy)
    want, want_out = reference_grad(qkv, heads, layout, grad_out)
    torch.testing.assert_close(lse.double(), reference_lse(qkv, heads, layout), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), want_out, **GRAD_TOL[qkv.dtype])
    assert grad.shape == qkv.shape and grad.dtype == qkv.dtype and grad.is_contiguous()
    torch.testing.assert_close(grad.double(), want, **GRAD_TOL[qkv.dtype])
    return (after[2] - before[2]) // (after[1] - before[1])


# head dims: the backward's tiles 16 (8), 32 (24, 32), 64, 128 (100) and 256 (200, 2 rows per thread);
# T: one token, partial tiles, several row blocks and column tiles.
SIMT_CASES = [(1, 1, 32, 1), (2, 2, 64, 17), (1, 2, 8, 70), (1, 2, 24, 40), (1, 1, 100, 20), (1, 1, 200, 9)]


@pytest.mark.simt
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case,dtype", [(c, d) for c in SIMT_CASES for d in (torch.float32, torch.float16, torch.bfloat16)
                                        if d == torch.float32 or c[2] in (32, 64, 24)], ids=str)
def test_simt_cuda_backward_matches_reference(simt_ops, case, dtype, layout):
    batch, heads, head_dim, length = case
    simt_backward(simt_ops, make_qkv(batch, heads, head_dim, length, dtype, seed=head_dim + length), heads, layout)


@pytest.mark.simt
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,order", [(torch.float16, "t"), (torch.bfloat16, "c")], ids=str)
def test_simt_cuda_tensor_core_lse(simt_ops, dtype, order, layout):
    """The tensor-core forward's lse (fp16 / bf16, head dim 32, both stride orders, T past one tile,
    two samples) and the backward on the same strided qkv."""
    qkv = strided_qkv(make_qkv(2, 1, 32, 80, dtype, seed=21), order)
    assert simt_backward(simt_ops, qkv, 1, layout) == 128


@pytest.mark.simt
@pytest.mark.parametrize("layout", LAYOUTS)
def test_simt_cuda_backward_strided_qkv(simt_ops, layout):
    base = make_qkv(3, 2, 32, 24)
    qkv = base.transpose(1, 2).contiguous().transpose(1, 2)[1:]
    assert not qkv.is_contiguous()
    simt_backward(simt_ops, qkv, 2, layout)


# ---- GPU ----------------------------------------------------------------------------------------------

GPU_SHAPES = [(2, 4, 64, 256), (1, 2, 128, 1000), (3, 1, 32, 77), (1, 2, 200, 64), (2, 8, 16, 1024)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float32, *HALF_DTYPES), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_gpu_backward_matches_reference(backend, shape, layout, dtype):
    if not backends()[backend] or (backend == "cuda" and not has_kernel("attention_backward", "CUDA")):
        pytest.skip(f"backend {backend}: {backends()[backend]}")
    qkv = make_qkv(*shape, dtype=dtype, seed=sum(shape), device="cuda")
    check_backward(qkv, shape[1], layout, backend)
    check_backward(strided_qkv(qkv, "c"), shape[1], layout, backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_gpu_lse_and_opcheck(backend):
    if not backends()[backend] or (backend == "cuda" and not has_kernel("attention_backward", "CUDA")):
        pytest.skip(f"backend {backend}: {backends()[backend]}")
    qkv = make_qkv(2, 2, 64, 130, dtype=torch.float16, seed=22, device="cuda")
    if backend == "cuda":
        fwd, lse_op, bwd = (torch.ops.ddpm_fast.attention.default, torch.ops.ddpm_fast.attention_lse.default,
                            torch.ops.ddpm_fast.attention_backward.default)
    else:
        from ddpm_fast.kernels import attention as tk
        from ddpm_fast.kernels import attention_backward as tkb
        fwd, lse_op, bwd = tk.attention_op, tk.attention_lse_op, tkb.attention_backward_op
    out, lse = lse_op(qkv, 2, False)
    torch.testing.assert_close(lse.cpu().double(), reference_lse(qkv, 2, "new"), atol=1e-4, rtol=1e-4)
    torch.library.opcheck(fwd, (qkv.clone().requires_grad_(), 2, False))
    torch.library.opcheck(lse_op, (qkv.clone().requires_grad_(), 2, False))
    torch.library.opcheck(bwd, (torch.randn_like(out), qkv, out, lse, 2, False))
