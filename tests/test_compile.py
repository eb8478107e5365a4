"""torch.compile(fullgraph=True) over the public API: the op wrappers (argument checks, backend
choice, the registered op with its fake implementation) and the fast U-Net trace into one graph
and compute what eager mode computes. The "aot_eager" backend traces through the fake kernels
and runs the real ones, without code generation (fast, and no C++ toolchain needed)."""
import pytest
import torch
from conftest import randomize_weights

from ddpm_fast import UNet, ops
from ddpm_fast._registry import has_kernel
from ddpm_fast.step_layout import NUM_COEFS

needs_cpu_kernels = pytest.mark.skipif(not has_kernel("group_norm_scale_shift", "CPU"),
                                       reason="ddpm_fast._C is not built")


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@needs_cpu_kernels
def test_group_norm_scale_shift_compiles():
    g = torch.Generator().manual_seed(0)
    x, scale, shift = torch.randn(2, 32, 4, 4, generator=g), torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g)

    def f(x, scale, shift):
        return ops.group_norm_scale_shift(x, 8, scale=scale, shift=shift, silu=True) * 2

    torch.testing.assert_close(compiled(f)(x, scale, shift), f(x, scale, shift), rtol=0, atol=0)


@needs_cpu_kernels
@pytest.mark.parametrize("layout", ["legacy", "new"])
def test_attention_compiles(layout):
    qkv = torch.randn(2, 3 * 64, 16, generator=torch.Generator().manual_seed(1))

    def f(qkv):
        return ops.attention(qkv, 2, layout=layout)

    torch.testing.assert_close(compiled(f)(qkv), f(qkv), rtol=0, atol=0)


@needs_cpu_kernels
def test_diffusion_step_with_in_kernel_noise_compiles():
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    coef = torch.rand(2, NUM_COEFS, generator=g)
    seed, step = torch.tensor([5, 9]), torch.tensor(3)

    def f(x, eps, coef, seed, step):
        return ops.diffusion_step(x, eps, coef, seed=seed, step=step, method="ddim", project_noise="sample")

    got, want = compiled(f)(x, eps, coef, seed, step), f(x, eps, coef, seed, step)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_cpu_kernels
def test_fast_unet_compiles_fullgraph():
    model = randomize_weights(UNet(image_size=16, in_channels=1, model_channels=32, out_channels=2,
                                   num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2),
                                   num_heads=2, num_classes=3, use_scale_shift_norm=True,
                                   resblock_updown=True)).eval()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 1, 16, 16, generator=g), torch.tensor([3, 700]), torch.tensor([0, 2])
    with torch.no_grad():
        want = model(x, t, y)
        fn = compiled(model)
        got = fn(x, t, y)
        other_labels = fn(x, t, torch.tensor([1, 0]))
    assert want.abs().max() > 0.05  # random weights: a fresh U-Net would output exactly 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (other_labels - want).abs().max() > 1e-3  # the labels reach the output


@needs_cpu_kernels
def test_an_unusable_backend_still_fails_under_compile():
    f = compiled(lambda x: ops.group_norm_scale_shift(x, 8, backend="cuda"))
    with pytest.raises(Exception, match="backend='cuda' runs on CUDA tensors"):
        f(torch.randn(2, 32, 4, 4))
