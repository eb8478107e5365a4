"""End to end: ddpm_fast.sample (fused ops, static loop; whole-loop CUDA graph on a GPU) vs the
reference Python loop (diffusion.reference_sample_loop, guided-diffusion's p_sample_loop) running
the same weights on the pure-PyTorch reference ops. CPU: a small 32x32 model, fp32. GPU: an
ADM-64-like model, fp16, batch 1 and 64, graph and eager."""
import copy
import os

import pytest
import torch

import ddpm_fast
from ddpm_fast.diffusion import reference_sample_loop

from conftest import conv_flops

QUICK = os.environ.get("DDPM_FAST_BENCH_QUICK") == "1"  # make bench-quick

FLAGS = ("--image_size 32 --num_channels 64 --num_res_blocks 1 --attention_resolutions 16,8 "
         "--channel_mult 1,2,2 --num_head_channels 32 --class_cond True --learn_sigma True "
         "--diffusion_steps 1000 --noise_schedule cosine --use_scale_shift_norm True "
         "--resblock_updown True")
STEPS = "5" if QUICK else "20"


def _models(device):
    torch.manual_seed(0)
    fast, _ = ddpm_fast.from_flags(FLAGS)
    fast = fast.to(device).eval()
    ref = copy.deepcopy(fast)
    ref.backend = "torch"
    ref.fast = False
    return fast, ref


@pytest.mark.parametrize("batch", [1] if QUICK else [1, 4])
def test_sample_vs_reference_loop_cpu(compare, batch):
    fast, ref = _models("cpu")
    process = fast.diffusion.respace(STEPS)
    labels = torch.arange(batch) % 10
    shape = (batch, 3, 32, 32)

    def run_fast():
        ddpm_fast.sample(fast, steps=STEPS, num_samples=batch, batch_size=batch, class_labels=labels,
                         seed=0, progress=False)

    def run_ref():
        with torch.no_grad():
            reference_sample_loop(ref, process, shape, class_labels=labels)

    compare(run_fast, run_ref, device="cpu", dtype=torch.float32, shape=shape,
            rounds=3 if QUICK else 5)


# GPU: the ADM-64-like model (conftest.adm64, fp16 torso) sampled with 250-step DDPM as a user would,
# timed over GPU_STEPS of them (every step costs the same model call and step, so the 250-step times
# recorded are the measured ones x 250 / GPU_STEPS: an extrapolation, marked as such).
GPU_STEPS = 10
FULL_STEPS = 250


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("mode", ["whole-loop-graph", "eager"])
def test_sample_gpu_adm64_fp16(compare, benchmark, adm64, batch, mode):
    """sample() with the whole loop in one CUDA graph, and eagerly, against guided-diffusion's way:
    a Python loop over the eager reference model (diffusion.reference_sample_loop)."""
    fast, ref = adm64
    process = fast.diffusion.respace(GPU_STEPS)
    labels = torch.arange(batch, device="cuda") % 1000
    shape = (batch, 3, 64, 64)

    def run_fast():
        ddpm_fast.sample(fast, steps=GPU_STEPS, num_samples=batch, batch_size=batch, class_labels=labels,
                         seed=0, progress=False, cuda_graph=mode == "whole-loop-graph")

    def run_ref():
        with torch.no_grad():
            reference_sample_loop(ref, process, shape, class_labels=labels)

    run_fast()  # capture (graph) / first-use compilation outside the timing
    x = torch.randn(shape, device="cuda")
    t = torch.zeros(batch, dtype=torch.long, device="cuda")
    flops = GPU_STEPS * conv_flops(fast, x, t, labels)
    compare(run_fast, run_ref, device="cuda", dtype=torch.float16, shape=shape, flops=flops,
            rounds=3, warmup=1)
    info = benchmark.extra_info
    scale = FULL_STEPS / GPU_STEPS
    info.update(steps_timed=GPU_STEPS, extrapolated_to_steps=FULL_STEPS,
                t_fused_250_steps_s_extrapolated=info["t_fused_s"] * scale,
                t_ref_250_steps_s_extrapolated=info["t_ref_s"] * scale)
