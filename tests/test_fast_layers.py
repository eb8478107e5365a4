"""ddpm_fast.fast_layers: prepacked oneDNN convs/linears and the phase form of upsample + conv equal
the plain computations, follow weight changes, and step aside for autograd."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm_fast.fast_layers import FastConv, FastLinear, interleave_phases, upsample_phase_weights

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
