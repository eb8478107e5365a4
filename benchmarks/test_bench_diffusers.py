"""diffusers' DDPM models on ddpm_fast (issue 19): google/ddpm-cifar10-32's configuration at full size
(35.7 M parameters, random weights: the hub is not reachable here) converted by
ddpm_fast.from_diffusers, against diffusers itself on the same weights, CPU fp32.

  - U-Net forward: ddpm_fast's UNet (fused ops, channels_last, prepacked convs) vs diffusers'
    UNet2DModel, batch 1 and 8 (issue target: >= 1.5x);
  - sampling: ddpm_fast.sample(steps=50, method="ddim") vs diffusers' DDIMPipeline (the DDPM
    pipeline's loop with a DDIMScheduler), 50 steps, eta 0, batch 1 (issue target: >= 2x).

Both sides run in this process with the thread count of conftest (DDPM_FAST_BENCH_THREADS; the
README's figures are from DDPM_FAST_BENCH_THREADS=1). make bench-quick (CI): batch 1 and 3 sampling steps,
few rounds (~15 s on an idle 2-core machine).
"""
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import ddpm_fast  # noqa: E402
from ddpm_fast.from_diffusers import PUBLISHED  # noqa: E402

from conftest import add_target, conv_flops  # noqa: E402

QUICK = os.environ.get("DDPM_FAST_BENCH_QUICK") == "1"
UNET_CONFIG, SCHEDULER_CONFIG = PUBLISHED["google/ddpm-cifar10-32"]
SAMPLE_STEPS = 3 if QUICK else 50


@pytest.fixture(scope="module")
def models():
    """(diffusers UNet2DModel, ddpm_fast UNet) with the same random weights, eval mode."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**{k: v for k, v in UNET_CONFIG.items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.02)
    ours, _ = ddpm_fast.from_diffusers(ref, SCHEDULER_CONFIG)
    return ref, ours.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("batch", [1] if QUICK else [1, 8])
def test_diffusers_unet_forward_cpu_fp32(compare, benchmark, models, batch):
    ref, ours = models
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x_cl, t), ref(x, t).sample, rtol=0, atol=1e-4)
        speedup = compare(lambda: ours(x_cl, t), lambda: ref(x, t).sample, device="cpu", dtype=torch.float32,
                          shape=tuple(x.shape), flops=conv_flops(ref, x, t), rounds=3 if QUICK else 6,
                          warmup=1 if QUICK else 3)
    add_target(benchmark, f"U-Net forward vs diffusers UNet2DModel, batch {batch}", speedup, 1.5, "min", 19)
    print(f"\ncifar10-32 U-Net forward, batch {batch}, fp32 CPU ({torch.get_num_threads()} threads): "
          f"{speedup:.2f}x diffusers")


def test_diffusers_ddim_sampling_cpu_fp32(compare, benchmark, models):
    ref, ours = models
    pipe = diffusers.DDIMPipeline(unet=ref, scheduler=diffusers.DDIMScheduler.from_config(SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    diffusion = ours.diffusion

    def run_ours():
        ddpm_fast.sample(ours, steps=SAMPLE_STEPS, method="ddim", eta=0.0, batch_size=1, seed=0, progress=False,
                         **diffusion.sample_options())

    def run_diffusers():
        pipe(batch_size=1, num_inference_steps=SAMPLE_STEPS, eta=0.0, generator=torch.Generator().manual_seed(0),
             output_type="np")

    with torch.inference_mode():
        speedup = compare(run_ours, run_diffusers, device="cpu", dtype=torch.float32, shape=(1, 3, 32, 32),
                          rounds=2 if QUICK else 3, warmup=1)
    add_target(benchmark, f"sample() vs diffusers DDIMPipeline, {SAMPLE_STEPS} DDIM steps, batch 1", speedup,
               2.0, "min", 19)
    print(f"\ncifar10-32 sampling, {SAMPLE_STEPS} DDIM steps, batch 1, fp32 CPU ({torch.get_num_threads()} "
          f"threads): {speedup:.2f}x diffusers' DDIMPipeline")
