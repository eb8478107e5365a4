"""U-Net forward: ddpm_fast's model (fused ops, channels_last, prepacked oneDNN convs on the CPU,
fused timestep projections and residual adds) against the same weights run as the plain reference
model (backend="torch": the pure-PyTorch ops, NCHW, one Linear per ResBlock).

CPU, fp32: 32x32 images, 64 base channels, channel_mult (1, 2, 2), 2 ResBlocks per level,
attention at 16x16 and 8x8 with 4 heads, AdaGN (use_scale_shift_norm), 10 classes, learn_sigma.
GPU, fp16 torso: the ADM-64-like model of conftest.adm64 at batch 1 and 64.
"""
import copy

import pytest
import torch

from ddpm_fast import UNet

from conftest import conv_flops

CONFIG = dict(image_size=32, in_channels=3, model_channels=64, out_channels=6, num_res_blocks=2,
              attention_resolutions=(2, 4), channel_mult=(1, 2, 2), num_heads=4, use_scale_shift_norm=True,
              num_classes=10)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    reference = UNet(**CONFIG, backend="torch").eval()
    with torch.no_grad():
        for p in reference.parameters():  # every weight nonzero (ADM zero-initialises some convs)
            p.normal_(0.0, 0.05)
    fast = copy.deepcopy(reference)
    fast.backend, fast.fast = "auto", True
    fast = fast.to(memory_format=torch.channels_last)
    return reference, fast


def _inputs(batch: int):
    """(x, t, y, x in channels_last) of one seeded batch."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return x, t, y, x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("batch", [1, 4])
def test_unet_forward_cpu_fp32(compare, models, batch):
    reference, fast = models
    x, t, y, x_cl = _inputs(batch)
    with torch.inference_mode():
        want = reference(x, t, y)
        torch.testing.assert_close(fast(x_cl, t, y), want, rtol=1e-4, atol=1e-4)
        flops = conv_flops(reference, x, t, y)
        speedup = compare(lambda: fast(x_cl, t, y), lambda: reference(x, t, y), device="cpu",
                          dtype=torch.float32, shape=tuple(x.shape), flops=flops, rounds=15)
    print(f"\nU-Net forward, batch {batch}, fp32 CPU ({torch.get_num_threads()} threads): "
          f"speedup {speedup:.2f}x over the reference model")


@pytest.mark.compile
@pytest.mark.parametrize("batch", [1, 4])
def test_unet_forward_vs_compiled_reference(compare, models, batch):
    """ddpm_fast's model against torch.compile of the reference model (inductor), fp32 CPU."""
    reference, fast = models
    compiled = torch.compile(copy.deepcopy(reference))
    x, t, y, x_cl = _inputs(batch)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x, t, y), reference(x, t, y), rtol=1e-4, atol=1e-4)
        compare(lambda: fast(x_cl, t, y), lambda: compiled(x, t, y), device="cpu",
                dtype=torch.float32, shape=tuple(x.shape), rounds=15)


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 64])
def test_unet_forward_gpu_adm64_fp16(compare, adm64, batch):
    """An ADM-64-like model (fp16 torso) on the GPU: ours (fused ops) against the same weights run
    eagerly as the reference model (guided-diffusion's U-Net); TFLOP/s counts the convolutions."""
    fast, reference = adm64
    gen = torch.Generator(device="cuda").manual_seed(batch)
    x = torch.randn(batch, 3, 64, 64, device="cuda", generator=gen)
    t = torch.randint(0, 1000, (batch,), device="cuda", generator=gen)
    y = torch.randint(0, 1000, (batch,), device="cuda", generator=gen)
    with torch.inference_mode():
        want, got = reference(x, t, y).float(), fast(x, t, y).float()
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 2e-2, f"ours vs the reference model: relative error {rel:.3g} (fp16)"
        compare(lambda: fast(x, t, y), lambda: reference(x, t, y), device="cuda", dtype=torch.float16,
                shape=tuple(x.shape), flops=conv_flops(reference, x, t, y), rounds=10)
