"""End to end: ddpm_fast.sample (fused ops, static loop; whole-loop CUDA graph on a GPU) vs the
reference Python loop (diffusion.reference_sample_loop) running the same weights on the
pure-PyTorch reference ops."""
import copy
import os

import pytest
import torch

import ddpm_fast
from ddpm_fast.diffusion import reference_sample_loop

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


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "whole-loop-graph"])
def test_sample_gpu_eager_vs_graph(compare, batch, graph):
    fast, ref = _models("cuda")
    process = fast.diffusion.respace(STEPS)
    labels = (torch.arange(batch) % 10).cuda()
    shape = (batch, 3, 32, 32)

    def run_fast():
        ddpm_fast.sample(fast, steps=STEPS, num_samples=batch, batch_size=batch, class_labels=labels,
                         seed=0, progress=False, cuda_graph=graph)

    def run_ref():
        with torch.no_grad():
            reference_sample_loop(ref, process, shape, class_labels=labels)

    run_fast()  # capture (graph) / autotune (triton) outside the timing
    compare(run_fast, run_ref, device="cuda", dtype=torch.float32, shape=shape, rounds=5)
