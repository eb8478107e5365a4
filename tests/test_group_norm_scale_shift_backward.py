"""Backward of ops.group_norm_scale_shift (ADM's AdaGN) on every backend against the reference.

The oracle: `adagn`, ddpm_fast.reference.group_norm_scale_shift's formula in the input's dtype
(the reference itself computes in float32 whatever the input, so it cannot be differentiated in
float64); test_oracle_is_the_reference ties the two together (forward, and the reference's own
float32 autograd), test_oracle_gradcheck checks the oracle's float64 gradients numerically
(gradcheck), including groups of (nearly) constant values where eps keeps the normalisation
differentiable. Every backend's gradients for x, weight, bias, scale and shift are then compared
with the oracle's float64 autograd on the same (rounded) inputs:

* cpu (C++): shapes, every combination of the optional arguments and SiLU, fp32/fp16/bf16, NCHW /
  channels-last / permuted / strided x, a grad_y laid out differently from x, subsets of the
  inputs requiring grad, empty inputs, a large mean, both decompositions of the NCHW kernel, the
  baseline (no AVX2) path, the plain op under autograd, opcheck with the autograd registration;
* triton: the same on small shapes under TRITON_INTERPRET=1 (the forward's one-launch and split
  paths, several programs per group);
* cuda (C++): its kernels under the SIMT harness on the CPU (marked simt; tests/simt), and on a
  GPU (marked cuda, skipped here).

Tolerance: |got - want| <= atol + rtol |want| with atol = 1e-4 * max(1, max |want|) (the gradients
are sums over up to N * pixels terms, whose fp32 rounding scales with the gradient's size) and
rtol = 1e-4 + 2u for a gradient stored in a half dtype (u its unit roundoff: the kernel and the
float64 oracle round to neighbouring values).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ddpm_fast
from ddpm_fast import ops, reference
from test_group_norm_scale_shift import (GPU_CASES, OPTIONS, UNIT_ROUNDOFF, _gpu_backend_or_skip, layout,
                                        make_inputs)

HAS_CPU_KERNEL = bool(ddpm_fast.backends()["cpu"])
needs_cpu_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="ddpm_fast._C CPU kernels not built")
NAMES = ("x", "weight", "bias", "scale", "shift")
ALL = (True,) * 5


def adagn(x, num_groups, w, b, s, t, eps=1e-5, silu=True):
    """reference.group_norm_scale_shift's formula in the inputs' own dtype (float64 here)."""
    h = F.group_norm(x, num_groups, w, b, eps)
    per_channel = (lambda v: v.reshape(*v.shape, *[1] * (x.dim() - 2)))
    if s is not None:
        h = h * (1 + per_channel(s))
    if t is not None:
        h = h + per_channel(t)
    return F.silu(h) if silu else h


def leaves(inputs, needs=ALL, dtype=None):
    """Fresh leaf copies of (x, w, b, s, t), requiring grad where `needs` says (None stays None)."""
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_(need)
            for t, need in zip(inputs, needs)]


def grads_of(y, ins, dy):
    """d(sum(y * dy))/d(each input), None for absent inputs and those not requiring grad."""
    wanted = [t for t in ins if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(y, wanted, dy.to(y.dtype)))
    return [next(got) if t is not None and t.requires_grad else None for t in ins]


def oracle_grads(inputs, num_groups, dy, eps=1e-5, silu=True, needs=ALL):
    ins = leaves(inputs, needs, torch.float64)
    return grads_of(adagn(ins[0], num_groups, *ins[1:], eps, silu), ins, dy.double())


def fused_grads(backend, inputs, num_groups, dy, eps=1e-5, silu=True, needs=ALL):
    ins = leaves(inputs, needs)
    y = ops.group_norm_scale_shift(ins[0], num_groups, *ins[1:], eps, silu, backend=backend)
    return grads_of(y, ins, dy)


def check_grads(got, want, inputs):
    for name, g, w, t in zip(NAMES, got, want, inputs):
        if w is None:
            assert g is None, f"{name}: expected no gradient"
            continue
        assert g is not None, f"{name}: missing gradient"
        assert g.shape == t.shape and g.dtype == t.dtype and g.device == t.device, (name, g.shape, g.dtype)
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        torch.testing.assert_close(g.double(), w, atol=1e-4 * scale, rtol=1e-4 + 2 * UNIT_ROUNDOFF[g.dtype],
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


def grad_output(x, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g).to(x.dtype).to(x.device)


def run_and_check(backend, x, groups, w, b, s, t, silu=True, eps=1e-5, needs=ALL, dy=None):
    inputs = (x, w, b, s, t)
    dy = grad_output(x) if dy is None else dy
    got = fused_grads(backend, inputs, groups, dy, eps, silu, needs)
    check_grads(got, oracle_grads(inputs, groups, dy, eps, silu, needs), inputs)


# ---- the oracle ------------------------------------------------------------------------------------

@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[5], OPTIONS[-1]],
                         ids=lambda o: "".join(k[0] if v else "-" for k, v in o.items()))
def test_oracle_is_the_reference(opts, silu):
    """adagn in float32 is reference.group_norm_scale_shift, and the reference's own (float32)
    autograd gradients agree with adagn's float64 ones."""
    x, w, b, s, t = make_inputs((2, 32, 5, 6), **opts, seed=3)
    torch.testing.assert_close(adagn(x, 8, w, b, s, t, 1e-5, silu),
                               reference.group_norm_scale_shift(x, 8, w, b, s, t, 1e-5, silu), atol=1e-6, rtol=1e-6)
    dy = grad_output(x)
    ins = leaves((x, w, b, s, t))
    got = grads_of(reference.group_norm_scale_shift(ins[0], 8, *ins[1:], 1e-5, silu), ins, dy)
    check_grads(got, oracle_grads((x, w, b, s, t), 8, dy, 1e-5, silu), (x, w, b, s, t))


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "".join(k[0] if v else "-" for k, v in o.items()))
def test_oracle_gradcheck(opts, silu):
    x, w, b, s, t = (None if v is None else v.double().requires_grad_()
                     for v in make_inputs((2, 4, 3, 2), **opts, seed=5))
    present = [v for v in (x, w, b, s, t) if v is not None]

    def f(*args):
        it = iter(args)
        full = [next(it) if v is not None else None for v in (x, w, b, s, t)]
        return adagn(full[0], 2, *full[1:], 1e-5, silu)
    assert torch.autograd.gradcheck(f, present)


def test_oracle_gradcheck_constant_groups():
    """Groups of one repeated value (zero variance) and of nearly equal values: eps keeps the
    normalisation differentiable (rstd = 1 / sqrt(eps)); both gradients are finite and checked."""
    x = torch.full((2, 4, 3, 3), 2.0, dtype=torch.float64)
    x[1] += 1e-4 * torch.randn(4, 3, 3, dtype=torch.float64)
    w, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    s, t = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    args = [v.requires_grad_() for v in (x, w, b, s, t)]
    assert torch.autograd.gradcheck(lambda x, w, b, s, t: adagn(x, 2, w, b, s, t, 0.1, True), args)


# ---- CPU C++ kernel -------------------------------------------------------------------------------

SPATIAL = [(1, 1), (4, 4), (9, 7), (32, 32), (17,)]


@needs_cpu_kernel
@pytest.mark.parametrize("spatial", SPATIAL, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("c", [32, 320])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("num_groups", [1, 32])
def test_cpu_shape_grid(n, c, spatial, num_groups):
    shape = (n, c, *spatial)
    if n * c * torch.Size(spatial).numel() // num_groups == 1:
        pytest.skip("F.group_norm rejects a single value per group and batch")
    x, w, b, s, t = make_inputs(shape, seed=n * 1000 + c)
    run_and_check("cpu", x, num_groups, w, b, s, t)


@needs_cpu_kernel
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "".join(k[0] if v else "-" for k, v in o.items()))
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_cpu_optional_arguments(opts, silu, kind):
    # (3, 64) G=32: one task per (n, group); (1, 48) G=2: the plane-parallel passes (N * G small)
    for shape, groups in (((3, 64, 8, 8), 32), ((1, 48, 5, 3), 2)):
        x, w, b, s, t = make_inputs(shape, **opts, seed=len(shape))
        run_and_check("cpu", layout(x, kind), groups, w, b, s, t, silu)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["nchw", "channels_last", "permuted", "strided"])
@pytest.mark.parametrize("shape,groups", [((2, 64, 16, 16), 32), ((3, 32, 7, 9), 8), ((2, 320, 5), 32),
                                          ((1, 96, 1, 1), 8), ((2, 32, 3, 4, 5), 4), ((4, 6, 33, 2), 3)],
                         ids=str)
def test_cpu_dtypes_and_layouts(dtype, kind, shape, groups):
    x, w, b, s, t = make_inputs(shape, dtype, seed=7)
    run_and_check("cpu", layout(x, kind), groups, w, b, s, t)


@needs_cpu_kernel
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_parameter_dtypes_and_strided_views(param_dtype):
    """AdaGN's scale, shift = emb_out.chunk(2, 1) in the model's dtype and strided weight/bias:
    their gradients come back in their own dtype and shape."""
    x, *_ = make_inputs((3, 32, 5, 4), torch.float16, seed=6)
    g = torch.Generator().manual_seed(7)
    emb = (0.5 * torch.randn(3, 64, generator=g)).to(param_dtype)
    affine = torch.randn(2, 64, generator=g).to(param_dtype)
    w, b = affine[0, ::2], affine[1, 1::2]
    s, t = emb.chunk(2, 1)
    run_and_check("cpu", layout(x, "channels_last"), 8, w, b, s, t)


@needs_cpu_kernel
@pytest.mark.parametrize("x_kind,dy_kind", [("channels_last", "nchw"), ("nchw", "channels_last"),
                                            ("channels_last", "strided"), ("nchw", "permuted")])
def test_cpu_grad_output_in_another_layout(x_kind, dy_kind):
    x, w, b, s, t = make_inputs((2, 32, 6, 5), seed=8)
    x = layout(x, x_kind)
    run_and_check("cpu", x, 8, w, b, s, t, dy=layout(grad_output(x), dy_kind))


@needs_cpu_kernel
@pytest.mark.parametrize("needs", [(True, False, False, False, False), (False, True, True, False, False),
                                   (False, False, False, True, True), (True, False, True, True, False)],
                         ids=lambda n: "".join(name[0] if v else "-" for name, v in zip(NAMES, n)))
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_cpu_needs_input_grad(needs, kind):
    """Only the inputs that require grad get one; the backward op computes only those asked for
    (output_mask from ctx.needs_input_grad), and their values do not depend on the others."""
    x, w, b, s, t = make_inputs((2, 32, 4, 6), seed=9)
    run_and_check("cpu", layout(x, kind), 8, w, b, s, t, needs=needs)


@needs_cpu_kernel
def test_cpu_backward_op_output_mask():
    x, w, b, s, t = make_inputs((2, 32, 4, 6), seed=10)
    dy = grad_output(x)
    _, mean, rstd = torch.ops.ddpm_fast.group_norm_scale_shift_stats(x, 8, w, b, s, t, 1e-5, True)
    full = torch.ops.ddpm_fast.group_norm_scale_shift_backward(dy, x, 8, w, b, s, t, mean, rstd, True, [True] * 5)
    for i in range(5):
        mask = [j == i for j in range(5)]
        part = torch.ops.ddpm_fast.group_norm_scale_shift_backward(dy, x, 8, w, b, s, t, mean, rstd, True, mask)
        for j, g in enumerate(part):
            if j == i:
                assert torch.equal(g, full[j])
            else:
                assert g.numel() == 0
    none = torch.ops.ddpm_fast.group_norm_scale_shift_backward(dy, x, 8, None, None, None, None, mean, rstd,
                                                                True, [True] * 5)
    assert none[0].shape == x.shape and all(g.numel() == 0 for g in none[1:])


class _BackwardMasks(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the output_mask of every group_norm_scale_shift_backward call."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.ddpm_fast.group_norm_scale_shift_backward.default:
            self.masks.append(list(args[10]))
        return func(*args, **(kwargs or {}))


@needs_cpu_kernel
@pytest.mark.parametrize("wanted", [(0,), (3,), (1, 4), (0, 2)], ids=lambda w: "+".join(NAMES[i] for i in w))
def test_cpu_grad_of_some_inputs_computes_only_those(wanted):
    """torch.autograd.grad(y, some inputs) with every input requiring grad (classifier guidance
    differentiates for x alone through a classifier whose parameters require grad): the values
    equal the oracle's and the C++ autograd node (csrc/autograd.cpp) asks the backward op for
    those gradients only (Node::task_should_compute_output), absent optionals not counted."""
    x, w, b, s, t = make_inputs((2, 32, 4, 6), seed=21)
    dy = grad_output(x)
    for inputs in ((x, w, b, s, t), (x, None, b, s, None)):
        ins = leaves(inputs)
        present = [i for i in wanted if ins[i] is not None]
        if not present:
            continue
        y = ops.group_norm_scale_shift(ins[0], 8, *ins[1:], 1e-5, True, backend="cpu")
        with _BackwardMasks() as mode:
            got = torch.autograd.grad(y, [ins[i] for i in present], dy)
        assert mode.masks == [[i in present for i in range(5)]], mode.masks
        want = oracle_grads(inputs, 8, dy)
        for i, g in zip(present, got):
            torch.testing.assert_close(g.double(), want[i], atol=1e-4 * max(1.0, want[i].abs().max().item()),
                                       rtol=1e-4)


@needs_cpu_kernel
@pytest.mark.parametrize("shape", [(0, 32, 4, 4), (2, 32, 0, 4)], ids=str)
def test_cpu_empty_inputs(shape):
    """Empty x: empty dx, zero parameter gradients (no element contributes), statistics of
    empty groups (mean 0, rstd 1/sqrt(eps))."""
    x, w, b, s, t = (v.requires_grad_() for v in make_inputs(shape, seed=11))
    y, mean, rstd = torch.ops.ddpm_fast.group_norm_scale_shift_stats(x, 8, w, b, s, t, 1e-5, True)
    assert mean.shape == rstd.shape == (shape[0], 8)
    assert torch.all(mean == 0) and torch.allclose(rstd, torch.full_like(rstd, 1e-5 ** -0.5))
    y = ops.group_norm_scale_shift(x, 8, w, b, s, t, 1e-5, True, backend="cpu")
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in (w, b, s, t):
        assert p.grad.shape == p.shape and not p.grad.any()


@needs_cpu_kernel
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_cpu_large_mean(kind):
    """GroupNorm ignores a constant offset, and so do its gradients: the kernel on x + 100 must give
    the oracle's gradients on x. The kernels use x - mean (not x with a folded constant); what
    remains is the fp32 rounding of the mean (ulp(100) / 2 = 4e-6, times rstd ~ 0.25)."""
    x, w, b, s, t = make_inputs((2, 64, 12, 12), seed=12)
    x = x * 4
    shifted = layout(x + 100.0, kind)
    dy = grad_output(x)
    got = fused_grads("cpu", (shifted, w, b, s, t), 32, dy)
    want = oracle_grads((x, w, b, s, t), 32, dy)
    check_grads(got, want, (shifted, w, b, s, t))


@needs_cpu_kernel
def test_cpu_plain_op_and_wrapper_paths():
    """The public wrapper runs the forward with statistics under autograd (and the plain op
    otherwise); the plain C++ op called directly under autograd differentiates too (its autograd
    kernel, csrc/autograd.cpp, runs the forward with statistics), and records nothing where no
    input requires grad."""
    x, w, b, s, t = make_inputs((2, 32, 5, 6), seed=13)
    ins = leaves((x, w, b, s, t))
    y = ops.group_norm_scale_shift(ins[0], 8, *ins[1:], 1e-5, True, backend="cpu")
    assert y.grad_fn.name().endswith("::GroupNormScaleShift>"), y.grad_fn.name()
    with torch.no_grad():
        assert ops.group_norm_scale_shift(ins[0], 8, *ins[1:], 1e-5, True, backend="cpu").grad_fn is None
    dy = grad_output(x)
    y = torch.ops.ddpm_fast.group_norm_scale_shift(ins[0], 8, *ins[1:], 1e-5, True)
    assert y.grad_fn.name().endswith("::GroupNormScaleShift>"), y.grad_fn.name()
    check_grads(grads_of(y, ins, dy), oracle_grads((x, w, b, s, t), 8, dy), (x, w, b, s, t))
    plain = torch.ops.ddpm_fast.group_norm_scale_shift(x, 8, w, b, s, t, 1e-5, True)
    assert plain.grad_fn is None and not plain.requires_grad
    torch.testing.assert_close(plain, y.detach(), rtol=0, atol=0)


@needs_cpu_kernel
@pytest.mark.parametrize("case", ["nchw_fp32", "channels_last_fp16", "no_params_bf16"])
def test_cpu_opcheck(case):
    """opcheck of the three ops (schema, fake, dispatch; the autograd registration of the forward
    ops with inputs that require grad)."""
    x, w, b, s, t = make_inputs((2, 32, 5, 6), seed=14)
    if case == "channels_last_fp16":
        x = x.half().contiguous(memory_format=torch.channels_last)
    if case == "no_params_bf16":
        x, w, b, s, t = x.bfloat16(), None, None, None, None
    ins = leaves((x, w, b, s, t))
    for op in (torch.ops.ddpm_fast.group_norm_scale_shift_stats.default,
               torch.ops.ddpm_fast.group_norm_scale_shift.default):
        torch.library.opcheck(op, (ins[0], 8, *ins[1:], 1e-5, True))
    _, mean, rstd = torch.ops.ddpm_fast.group_norm_scale_shift_stats(x, 8, w, b, s, t, 1e-5, True)
    for mask in ([True] * 5, [False, True, False, True, False]):
        torch.library.opcheck(torch.ops.ddpm_fast.group_norm_scale_shift_backward.default,
                              (grad_output(x), x, 8, w, b, s, t, mean, rstd, True, mask))


@needs_cpu_kernel
def test_cpu_under_torch_compile():
    """The fused forward and backward inside a compiled training step (aot_eager: the graph holds
    the ops, their fakes give the shapes)."""
    x, w, b, s, t = make_inputs((2, 32, 6, 6), seed=15)
    dy = grad_output(x)

    def step(x, w, b, s, t):
        y = ops.group_norm_scale_shift(x, 8, w, b, s, t, 1e-5, True, backend="cpu")
        return torch.autograd.grad((y * dy).sum(), (x, w, b, s, t))

    got = torch.compile(step, backend="aot_eager", fullgraph=False)(*leaves((x, w, b, s, t)))
    check_grads(list(got), oracle_grads((x, w, b, s, t), 8, dy), (x, w, b, s, t))


@needs_cpu_kernel
def test_cpu_baseline_isa():
    """DDPM_FAST_CPU_ISA=baseline: the composite ATen path (CPUs without AVX2), forward statistics
    and backward, against the oracle."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, %r)
        import ddpm_fast._C
        from test_group_norm_scale_shift import make_inputs, layout
        from test_group_norm_scale_shift_backward import run_and_check, OPTIONS
        assert ddpm_fast._C.cpu_isa() == "baseline"
        for (shape, groups), kind in ((((3, 64, 7, 9), 8), "nchw"), (((2, 40, 5), 8), "channels_last")):
            for opts, silu in ((OPTIONS[0], False), (OPTIONS[-1], True), (OPTIONS[10], True)):
                x, w, b, s, t = make_inputs(shape, **opts, seed=3)
                run_and_check("cpu", layout(x, kind), groups, w, b, s, t, silu)
        x, w, b, s, t = make_inputs((2, 32, 4, 4), torch.bfloat16, seed=4)
        run_and_check("cpu", x, 8, w, b, s, t, needs=(True, False, True, True, False))
        print("ok")
    """ % os.path.dirname(__file__))
    env = {**os.environ, "DDPM_FAST_CPU_ISA": "baseline"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["ok"], result.stderr[-3000:]


# ---- Triton (interpreter on the CPU, or a GPU) ------------------------------------------------------

def _triton_or_skip():
    status = ddpm_fast.backends()["triton"]
    if not status:
        pytest.skip(f"triton backend unavailable: {status.reason}")
    from ddpm_fast.kernels import group_norm_scale_shift as kernel
    return kernel


# (shape, groups, layout, split): the forward's one-launch path (small groups) and its two-kernel
# path (1, 64, 33, 20); split: several programs per group in the backward's sums (and the
# forward's moments). The interpreter is slow: strided x and splits on the largest case only.
TRITON_RUNS = ([(shape, groups, kind, False) for shape, groups in
                (((2, 32, 4, 4), 4), ((1, 48, 5, 3), 4), ((1, 32, 17), 4)) for kind in ("nchw", "channels_last")]
               + [((1, 64, 33, 20), 2, kind, split) for kind in ("nchw", "channels_last", "strided")
                  for split in (False, True)])


@pytest.mark.parametrize("shape,groups,kind,split", TRITON_RUNS, ids=str)
def test_triton_matches_reference(shape, groups, kind, split, monkeypatch, triton_device):
    kernel = _triton_or_skip()
    if split:  # several programs per group (on the interpreter there is normally one)
        monkeypatch.setattr(kernel, "_target_programs", lambda device: 64)
    x, w, b, s, t = make_inputs(shape, seed=sum(shape), device=triton_device)
    run_and_check("triton", layout(x, kind), groups, w, b, s, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts,silu", [(OPTIONS[0], False), (OPTIONS[9], True), (OPTIONS[-1], True)],
                         ids=["----", "w--t", "wbst"])
def test_triton_dtypes_and_options(dtype, opts, silu, triton_device):
    _triton_or_skip()
    x, w, b, s, t = make_inputs((2, 32, 5, 6), dtype, **opts, seed=2, device=triton_device)
    run_and_check("triton", layout(x, "channels_last"), 8, w, b, s, t, silu,
                  needs=(True, True, False, True, True))


def test_triton_empty_and_opcheck(triton_device):
    _triton_or_skip()
    x, w, b, s, t = make_inputs((0, 32, 4, 4), device=triton_device)
    ins = leaves((x, w, b, s, t))
    ops.group_norm_scale_shift(ins[0], 8, *ins[1:], 1e-5, True, backend="triton").sum().backward()
    assert ins[0].grad.shape == x.shape and not ins[3].grad.any()
    x, w, b, s, t = make_inputs((1, 8, 3, 2), device=triton_device)
    ins = leaves((x, w, b, s, None))
    for op in (torch.ops.ddpm_fast.group_norm_scale_shift_stats_triton.default,
               torch.ops.ddpm_fast.group_norm_scale_shift_triton.default):
        torch.library.opcheck(op, (ins[0], 4, *ins[1:], 1e-5, True))
    _, mean, rstd = torch.ops.ddpm_fast.group_norm_scale_shift_stats_triton(x, 4, w, b, s, None, 1e-5, True)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_scale_shift_backward_triton.default,
                          (grad_output(x), x, 4, w, b, s, None, mean, rstd, True, [True, False, True, True, True]))


# ---- CUDA C++ kernels on the CPU: the SIMT harness (tests/simt) -----------------------------------

_spec = importlib.util.spec_from_file_location("simt_build", Path(__file__).parent / "simt" / "build.py")
simt_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(simt_build)
STEMS = ("group_norm_scale_shift", "group_norm_scale_shift_backward")


@pytest.fixture(scope="module")
def simt_ops():
    """Op namespaces of the forward and backward .cu builds (the forward gives the statistics);
    tracked allocations on while the tests run."""
    simt_build.load_runtime()
    jobs = [(stem, (), "") for stem in STEMS]
    simt_build.build_kernels(jobs)
    names = {stem: getattr(torch.ops, simt_build.load_kernels(stem)) for stem in STEMS}
    torch.ops.simt.enable()
    yield names
    torch.ops.simt.disable()


def simt_configure(sms=4):
    torch.ops.simt.configure(2**31 - 1, 65535, 65535, sms, 0)


def simt_grads(simt_ops, x, groups, w, b, s, t, dy, silu=True, mask=(True,) * 5):
    """Forward statistics and backward of the CUDA kernels (SIMT), checking that kernels ran."""
    before = torch.ops.simt.stats()
    _, mean, rstd = simt_ops["group_norm_scale_shift"].group_norm_scale_shift_stats(x, groups, w, b, s, t, 1e-5, silu)
    grads = simt_ops["group_norm_scale_shift_backward"].group_norm_scale_shift_backward(
        dy, x, groups, w, b, s, t, mean, rstd, silu, list(mask))
    after = torch.ops.simt.stats()
    assert after[0] > before[0] and after[3] > before[3], (before, after)
    xd = x.double().reshape(x.shape[0], groups, -1)
    torch.testing.assert_close(mean.double(), xd.mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd.double(), (xd.var(-1, unbiased=False) + 1e-5).rsqrt(), atol=0, rtol=1e-5)
    return [g if want and v is not None else None for g, want, v in zip(grads, mask, (x, w, b, s, t))]


def simt_check(simt_ops, x, groups, w, b, s, t, silu=True, mask=(True,) * 5, dy=None):
    dy = grad_output(x) if dy is None else dy
    got = simt_grads(simt_ops, x, groups, w, b, s, t, dy, silu, mask)
    check_grads(got, oracle_grads((x, w, b, s, t), groups, dy, 1e-5, silu, mask), (x, w, b, s, t))


# vector and scalar paths of NCHW (pixels % kVec) and channels-last (C % kVec), partial channel
# tiles, 1-D / 3-D spatial, groups larger than one coefficient block (C/G = 160 > 128 threads)
SIMT_SHAPES = [((2, 64, 4, 4), 32), ((3, 32, 7, 9), 8), ((2, 40, 5), 4), ((2, 16, 2, 3, 4), 4),
               ((2, 12, 5, 7), 3), ((1, 320, 3, 2), 2), ((1, 32, 32, 32), 2)]
SIMT_LAYOUTS = [(torch.float32, "nchw"), (torch.float32, "channels_last"), (torch.float32, "strided"),
                (torch.float16, "nchw"), (torch.float16, "channels_last"), (torch.bfloat16, "channels_last")]


@pytest.mark.simt
@pytest.mark.parametrize("dtype,kind", SIMT_LAYOUTS, ids=str)
@pytest.mark.parametrize("shape,groups", SIMT_SHAPES, ids=str)
def test_simt_cuda_matches_reference(simt_ops, shape, groups, dtype, kind):
    simt_configure()
    x, w, b, s, t = make_inputs(shape, dtype, seed=len(shape) + groups)
    simt_check(simt_ops, layout(x, kind), groups, w, b, s, t)


@pytest.mark.simt
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "".join(k[0] if v else "-" for k, v in o.items()))
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_simt_cuda_optional_arguments(simt_ops, opts, silu, kind):
    simt_configure()
    x, w, b, s, t = make_inputs((2, 32, 3, 5), **opts)
    simt_check(simt_ops, layout(x, kind), 8, w, b, s, t, silu)


@pytest.mark.simt
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("sms", [1, 132])
def test_simt_cuda_splits_masks_and_grad_layout(simt_ops, kind, sms):
    """The SM count sets how many blocks share a plane / pixel range (1: one; 132: many);
    a grad_y in the other layout; output masks; a large mean."""
    simt_configure(sms=sms)
    x, w, b, s, t = make_inputs((2, 64, 16, 16), seed=16)
    x = layout(x * 4 + 100.0, kind)
    other = "nchw" if kind == "channels_last" else "channels_last"
    simt_check(simt_ops, x, 4, w, b, s, t, dy=layout(grad_output(x), other))
    simt_check(simt_ops, x, 4, w, b, s, t, mask=(False, True, False, False, True))
    simt_check(simt_ops, x, 4, w, b, s, t, mask=(True, False, False, False, False))


@pytest.mark.simt
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_simt_cuda_misaligned_and_strided_parameters(simt_ops, kind, dtype):
    """x one element past a 16-byte boundary (the kVec = 1 kernels); AdaGN's chunked scale/shift
    and strided weight/bias in half precision, read where they lie."""
    simt_configure()
    shape = (2, 32, 6, 8)
    x, *_ = make_inputs(shape, dtype, seed=17)
    dims = (0, 2, 3, 1) if kind == "channels_last" else (0, 1, 2, 3)
    storage = torch.empty(x.numel() + 1, dtype=dtype)
    x = storage[1:].view(*[shape[d] for d in dims]).copy_(x.permute(*dims)).permute(*[dims.index(d) for d in range(4)])
    assert x.data_ptr() % 16 != 0
    g = torch.Generator().manual_seed(18)
    emb = (0.5 * torch.randn(2, 64, generator=g)).half()
    affine = torch.randn(2, 64, generator=g).bfloat16()
    s, t = emb.chunk(2, 1)
    simt_check(simt_ops, x, 8, affine[0, ::2], affine[1, 1::2], s, t)


# ---- GPU (skipped without one) ------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape,groups", GPU_CASES, ids=str)
def test_gpu_matches_reference(backend, dtype, kind, shape, groups):
    _gpu_backend_or_skip(backend)
    x, w, b, s, t = make_inputs(shape, dtype, device="cuda", seed=sum(shape))
    run_and_check(backend, layout(x, kind), groups, w, b, s, t)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "".join(k[0] if v else "-" for k, v in o.items()))
def test_gpu_optional_arguments_and_masks(backend, opts):
    _gpu_backend_or_skip(backend)
    x, w, b, s, t = make_inputs((3, 64, 8, 8), **opts, device="cuda")
    for silu in (False, True):
        run_and_check(backend, x, 32, w, b, s, t, silu)
    run_and_check(backend, x, 32, w, b, s, t, needs=(False, True, True, False, False))


@pytest.mark.cuda
def test_gpu_opcheck_and_graph_capture():
    _gpu_backend_or_skip("cuda")
    x, w, b, s, t = make_inputs((2, 32, 5, 6), torch.float16, device="cuda")
    x = x.contiguous(memory_format=torch.channels_last)
    ins = leaves((x, w, b, s, t))
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_scale_shift_stats.default, (ins[0], 8, *ins[1:], 1e-5, True))
    _, mean, rstd = torch.ops.ddpm_fast.group_norm_scale_shift_stats(x, 8, w, b, s, t, 1e-5, True)
    torch.library.opcheck(torch.ops.ddpm_fast.group_norm_scale_shift_backward.default,
                          (grad_output(x), x, 8, w, b, s, t, mean, rstd, True, [True] * 5))
    dy = torch.zeros_like(x)
    args = (dy, x, 8, w, b, s, t, mean, rstd, True, [True] * 5)
    torch.ops.ddpm_fast.group_norm_scale_shift_backward(*args)  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.ddpm_fast.group_norm_scale_shift_backward(*args)
    dy.copy_(grad_output(x))
    graph.replay()
    torch.cuda.synchronize()
    check_grads(list(out), oracle_grads((x, w, b, s, t), 8, dy), (x, w, b, s, t))
