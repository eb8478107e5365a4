"""ddpm_fast.fast_layers: prepacked oneDNN convs/linears, the Winograd F(4x4, 3x3) convolution and
the phase form of upsample + conv equal the plain computations, follow weight changes, and step
aside for autograd."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ddpm_fast._C
from ddpm_fast import fast_layers
from ddpm_fast.fast_layers import (FastConv, FastLinear, interleave_phases, upsample_phase_weights, winograd_panels,
                                   winograd_weight)
from conftest import run_under_cpu_isa

CL = torch.channels_last


def upsampled_conv(conv, x):
    return conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def test_phase_weights_are_exact_in_float64():
    torch.manual_seed(0)
    w, b = torch.randn(5, 3, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    want = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1)
    w4, b4 = upsample_phase_weights(w, b)
    assert w4.shape == (20, 3, 2, 2) and w4.dtype == torch.float64
    got = interleave_phases(F.conv2d(x, w4, b4, padding=1), 4, 6)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_up2_equals_upsample_then_conv(layout, dtype, bias):
    torch.manual_seed(1)
    conv = nn.Conv2d(32, 16, 3, padding=1, bias=bias).to(dtype)
    x = torch.randn(2, 32, 5, 7, dtype=dtype)
    if layout == "channels_last":
        conv, x = conv.to(memory_format=CL), x.contiguous(memory_format=CL)
    runner = FastConv()
    with torch.no_grad():
        want = F.conv2d(F.interpolate(x.float(), scale_factor=2, mode="nearest"), conv.weight.float(),
                        None if conv.bias is None else conv.bias.float(), padding=1)
        got = runner.up2(conv, x)
    assert got.shape == (2, 16, 10, 14) and got.dtype == dtype
    assert got.is_contiguous(memory_format=CL if layout == "channels_last" else torch.contiguous_format)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv_with_fused_add(layout):
    torch.manual_seed(2)
    conv = nn.Conv2d(32, 32, 3, padding=1)
    down = nn.Conv2d(32, 32, 3, stride=2, padding=1)
    x, add = torch.randn(3, 32, 8, 8), torch.randn(3, 32, 8, 8)
    if layout == "channels_last":
        conv, down = conv.to(memory_format=CL), down.to(memory_format=CL)
        x, add = x.contiguous(memory_format=CL), add.contiguous(memory_format=CL)
    runner, runner_down = FastConv(), FastConv()
    with torch.no_grad():
        torch.testing.assert_close(runner.conv(conv, x), conv(x), rtol=0, atol=1e-4)
        torch.testing.assert_close(runner.conv(conv, x, add=add), conv(x) + add, rtol=0, atol=1e-4)
        torch.testing.assert_close(runner_down.conv(down, x), down(x), rtol=0, atol=1e-4)
        # another batch size: another packed weight, same results
        torch.testing.assert_close(runner.conv(conv, x[:1]), conv(x[:1]), rtol=0, atol=1e-4)


def test_caches_follow_weight_changes_and_copies_start_empty():
    torch.manual_seed(3)
    conv = nn.Conv2d(32, 32, 3, padding=1).to(memory_format=CL)
    lin = nn.Linear(32, 48)
    x = torch.randn(2, 32, 6, 6).contiguous(memory_format=CL)
    x2 = torch.randn(10, 32)
    fc, fl = FastConv(), FastLinear()
    with torch.no_grad():
        fc.conv(conv, x), fc.up2(conv, x), fl.linear(x2, lin.weight, lin.bias)
        conv.weight.mul_(-2.0)
        lin.weight.add_(1.0)
        torch.testing.assert_close(fc.conv(conv, x), conv(x), rtol=0, atol=1e-4)
        torch.testing.assert_close(fc.up2(conv, x), upsampled_conv(conv, x), rtol=0, atol=1e-4)
        torch.testing.assert_close(fl.linear(x2, lin.weight, lin.bias), lin(x2), rtol=0, atol=1e-4)
        conv.weight.data = conv.weight.data.clone() * 0.5  # a new tensor behind the parameter
        torch.testing.assert_close(fc.conv(conv, x), conv(x), rtol=0, atol=1e-4)
    clone = copy.deepcopy(fc)
    assert clone._packed == {} and clone._phase is None and copy.deepcopy(fl)._packed is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear(dtype):
    torch.manual_seed(4)
    qkv = nn.Conv1d(32, 96, 1).to(dtype)  # ADM's 1x1 Conv1d weights (N, K, 1)
    x, add = torch.randn(20, 32, dtype=dtype), torch.randn(20, 96, dtype=dtype)
    runner = FastLinear()
    want = F.linear(x.float(), qkv.weight[:, :, 0].float(), qkv.bias.float())
    with torch.no_grad():
        got = runner.linear(x, qkv.weight, qkv.bias)
        got_add = runner.linear(x, qkv.weight, qkv.bias, add=add)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    assert got.dtype == dtype and got.shape == (20, 96)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=tol)
    torch.testing.assert_close(got_add.float(), want + add.float(), rtol=0, atol=tol)


def test_autograd_takes_the_plain_path():
    torch.manual_seed(5)
    conv = nn.Conv2d(32, 32, 3, padding=1).to(memory_format=CL)
    lin = nn.Linear(32, 16)
    x = torch.randn(2, 32, 4, 4).contiguous(memory_format=CL).requires_grad_(True)
    out = FastConv().up2(conv, x).sum() + FastConv().conv(conv, x, add=x).sum() + \
        FastLinear().linear(x.permute(0, 2, 3, 1).reshape(-1, 32), lin.weight, lin.bias).sum()
    out.backward()
    grads = (x.grad, conv.weight.grad.clone(), lin.weight.grad.clone())
    conv.zero_grad(), lin.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    ref = upsampled_conv(conv, x2).sum() + (conv(x2) + x2).sum() + lin(x2.permute(0, 2, 3, 1).reshape(-1, 32)).sum()
    ref.backward()
    for got, want in zip(grads, (x2.grad, conv.weight.grad, lin.weight.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


# ---- Winograd F(4x4, 3x3) ---------------------------------------------------------------------
def winograd_case(batch, cin, cout, height, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, height, width, generator=gen).contiguous(memory_format=CL)
    w = torch.randn(cout, cin, 3, 3, generator=gen) / (3 * cin ** 0.5)
    b = torch.randn(cout, generator=gen)
    add = torch.randn(batch, cout, height, width, generator=gen).contiguous(memory_format=CL)
    return x, w, b, add


def assert_winograd_close(got, want):
    """Winograd's fp32 rounding: a few 1e-6 of the output's scale (a direct fp32 conv: ~5e-8)."""
    scale = want.abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-5 * scale, (err, scale)


def test_winograd_weight_is_g_g_gt():
    """U[a * 6 + b, i, o] = (G g G^T)[a, b]: with g the 3x3 kernel, the 1-D identity
    A^T ((G g) * (B^T d)) = correlation(d, g) holds for every 6-sample d (float64)."""
    torch.manual_seed(0)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    u = winograd_weight(w)
    assert u.shape == (36, 3, 2) and u.dtype == torch.float32 and u.is_contiguous()
    g = fast_layers._WINOGRAD_G
    torch.testing.assert_close(u.double()[:, 1, 0].reshape(6, 6), g @ w[0, 1] @ g.T, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("batch,cin,cout,height,width", [
    (1, 32, 16, 16, 16),    # whole tiles, lanes of 16
    (2, 40, 24, 13, 18),    # partial tiles at the bottom and right; a scalar channel tail after the vectors
    (3, 17, 5, 9, 7),       # a one-channel tail, fewer outputs than a vector
    (1, 64, 48, 4, 4),      # one tile per image
    (4, 128, 64, 32, 32),   # several chunks (> 2 MB of transformed input)
])
@pytest.mark.parametrize("threads", [1, 2])
def test_winograd_conv_matches_direct_conv(batch, cin, cout, height, width, threads):
    x, w, b, add = winograd_case(batch, cin, cout, height, width)
    want = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        u = winograd_weight(w)
        plain = torch.ops.ddpm_fast.winograd_conv3x3(x, u, None, None)
        biased = torch.ops.ddpm_fast.winograd_conv3x3(x, u, b, None)
        added = torch.ops.ddpm_fast.winograd_conv3x3(x, u, b, add)
    finally:
        torch.set_num_threads(old)
    for got in (plain, biased, added):
        assert got.shape == (batch, cout, height, width) and got.dtype == torch.float32
        assert got.is_contiguous(memory_format=CL)
    assert_winograd_close(plain, want - b.double()[:, None, None])
    assert_winograd_close(biased, want)
    assert_winograd_close(added, want + add.double())


@pytest.mark.parametrize("cout", [16, 48, 64])
def test_winograd_column_panels_give_the_same_result(cout):
    """The (36, Cout / 16, Cin, 16) panel layout of the AVX-512 GEMM: bitwise the row-major
    layout's result (the same products in the same order), Cout with and without a 16-column tail."""
    x, w, b, add = winograd_case(2, 24, cout, 9, 14, seed=2)
    u = winograd_weight(w)
    panels = winograd_panels(u)
    assert panels.shape == (36, cout // 16, 24, 16)
    torch.testing.assert_close(panels[5, -1, 3], u[5, 3, cout - 16:], rtol=0, atol=0)
    if ddpm_fast._C.cpu_isa() != "avx512":
        with pytest.raises(RuntimeError, match="column-panel weight layout needs AVX-512"):
            torch.ops.ddpm_fast.winograd_conv3x3(x, panels, b, add)
        return
    got = torch.ops.ddpm_fast.winograd_conv3x3(x, panels, b, add)
    assert got.shape == (2, cout, 9, 14)
    assert torch.equal(got, torch.ops.ddpm_fast.winograd_conv3x3(x, u, b, add))
    assert_winograd_close(got, F.conv2d(x.double(), w.double(), b.double(), padding=1) + add.double())


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_winograd_conv_isa_variants(isa):
    """The AVX2 and baseline builds of the transforms (chosen at run time; this process runs the
    widest the CPU has) give the same results."""
    run_under_cpu_isa(isa, """
        import torch, torch.nn.functional as F
        import ddpm_fast
        from ddpm_fast.fast_layers import winograd_weight
        from test_fast_layers import (winograd_case, assert_winograd_close,
                                      test_winograd_column_panels_give_the_same_result)
        x, w, b, add = winograd_case(2, 40, 24, 13, 18)
        got = torch.ops.ddpm_fast.winograd_conv3x3(x, winograd_weight(w), b, add)
        assert_winograd_close(got, F.conv2d(x.double(), w.double(), b.double(), padding=1) + add.double())
        test_winograd_column_panels_give_the_same_result(48)  # refused below AVX-512
    """)


def test_winograd_conv_bad_input_names_the_argument():
    x, w, b, add = winograd_case(1, 16, 16, 8, 8)
    u = winograd_weight(w)
    op = torch.ops.ddpm_fast.winograd_conv3x3
    cases = [
        ((x.contiguous(), u, b, None), "x must be a 4-D channels_last"),
        ((x[:, :0].contiguous(memory_format=CL), u[:, :0].contiguous(), b, None), "x must have at least one channel"),
        ((x.double().contiguous(memory_format=CL), u, b, None), "x must be float32"),
        ((x, u[:, :8].contiguous(), b, None), "weight must be the contiguous float32 (36, Cin, Cout)"),
        ((x, u.double(), b, None), "weight must be"),
        ((x, u.reshape(36, 2, 16, 8), b, None), "panels of 16 columns"),
        ((x, u, b[:3], None), "bias must be a contiguous float32 (16,)"),
        ((x, u, b, add[:, :, :4]), "add must have the output's shape"),
        ((x, u, b, add.contiguous()), "add must be a 4-D channels_last"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            op(*args)


def test_winograd_conv_opcheck():
    x, w, b, add = winograd_case(2, 16, 16, 8, 8)
    u = winograd_weight(w)
    for args in ((x, u, b, add), (x, u, None, None)):
        torch.library.opcheck(torch.ops.ddpm_fast.winograd_conv3x3, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def dispatched(fn) -> tuple[object, list]:
    """fn()'s result and the ops (OpOverloads) it dispatched, in order."""
    seen = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Record():
        out = fn()
    return out, seen


def winograd_calls(fn) -> tuple[object, int]:
    """fn()'s result and how many ddpm_fast::winograd_conv3x3 calls it made."""
    out, seen = dispatched(fn)
    return out, seen.count(torch.ops.ddpm_fast.winograd_conv3x3.default)


def test_fast_conv_takes_winograd_where_it_pays():
    """FastConv runs eligible float32 3x3 convs (stride 1, padding 1, >= 16 channels, >= 16 output
    tiles) through Winograd with the add fused, the rest on oneDNN, and none after
    set_winograd(False)."""
    torch.manual_seed(6)
    conv = nn.Conv2d(32, 32, 3, padding=1).to(memory_format=CL)
    down = nn.Conv2d(32, 32, 3, stride=2, padding=1).to(memory_format=CL)
    thin = nn.Conv2d(32, 8, 3, padding=1).to(memory_format=CL)
    x = torch.randn(1, 32, 16, 16).contiguous(memory_format=CL)   # 16 tiles
    small = torch.randn(1, 32, 12, 12).contiguous(memory_format=CL)  # 9 tiles
    add = torch.randn(1, 32, 16, 16).contiguous(memory_format=CL)
    runner = FastConv()
    with torch.no_grad():
        want = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1) + add.double()
        got, calls = winograd_calls(lambda: runner.conv(conv, x, add=add))
        assert calls == 1
        assert_winograd_close(got, want)
        # the AVX-512 GEMM's column panels where the kernel runs AVX-512
        assert runner._packed["winograd"].dim() == (4 if ddpm_fast._C.cpu_isa() == "avx512" else 3)
        half = copy.deepcopy(conv).bfloat16()
        for module, inp in ((down, x), (thin, x), (conv, small), (half, x.bfloat16())):
            out, calls = winograd_calls(lambda: FastConv().conv(module, inp))
            assert calls == 0
            tol = 0.1 if inp.dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(out.float(), module(inp).float(), rtol=0, atol=tol)
        previous = fast_layers.set_winograd(False)
        try:
            off, calls = winograd_calls(lambda: FastConv().conv(conv, x, add=add))
        finally:
            fast_layers.set_winograd(previous)
        assert calls == 0
        torch.testing.assert_close(off.double(), want, rtol=0, atol=1e-4)
        # a weight change reaches the cached transformed weight
        conv.weight.mul_(-0.5)
        want = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        again, calls = winograd_calls(lambda: runner.conv(conv, x))
        assert calls == 1
        assert_winograd_close(again, want)


def test_winograd_under_autograd_matches_plain_gradients():
    """Under autograd an eligible conv runs WinogradConv: values and the gradients of x, weight,
    bias and add equal the plain conv's (float64 oracle); torch.autograd.grad for x alone (the
    classifier-guidance call) computes no weight gradient; double backward is refused."""
    torch.manual_seed(7)
    conv = nn.Conv2d(24, 32, 3, padding=1).to(memory_format=CL)
    x = torch.randn(2, 24, 13, 18).contiguous(memory_format=CL).requires_grad_(True)
    add = torch.randn(2, 32, 13, 18).contiguous(memory_format=CL).requires_grad_(True)
    grad_y = torch.randn(2, 32, 13, 18)
    runner = FastConv()
    out, calls = winograd_calls(lambda: runner.conv(conv, x, add=add))
    assert calls == 1 and out.grad_fn is not None and "WinogradConv" in type(out.grad_fn).__name__
    grads = torch.autograd.grad(out, (x, conv.weight, conv.bias, add), grad_y)

    x64, add64 = x.detach().double().requires_grad_(True), add.detach().double().requires_grad_(True)
    w64, b64 = conv.weight.detach().double().requires_grad_(True), conv.bias.detach().double().requires_grad_(True)
    want = F.conv2d(x64, w64, b64, padding=1) + add64
    wants = torch.autograd.grad(want, (x64, w64, b64, add64), grad_y.double())
    assert_winograd_close(out.detach(), want.detach())
    for got, expect in zip(grads, wants):
        assert got.shape == expect.shape
        assert_winograd_close(got, expect)

    out = runner.conv(conv, x)
    (gx,), seen = dispatched(lambda: torch.autograd.grad(out.square().sum(), x))
    assert torch.ops.aten.convolution_backward.default not in seen
    assert seen.count(torch.ops.ddpm_fast.winograd_conv3x3.default) == 1
    x64 = x.detach().double().requires_grad_(True)
    (want_gx,) = torch.autograd.grad(F.conv2d(x64, w64, b64, padding=1).square().sum(), x64)
    assert_winograd_close(gx, want_gx)

    out = runner.conv(conv, x)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|differentiable"):
        gx.sum().backward()
