"""Shared benchmark machinery: every fused path is timed by pytest-benchmark and its reference is
timed in the same run, so `extra_info` holds the speedup t_ref / t_fused (a ratio, comparable
across machines), the device, dtype and shape, and GB/s or TFLOP/s where meaningful."""
from __future__ import annotations

import copy
import functools
import os
import statistics
import time

import pytest
import torch

import ddpm_fast

HAS_CUDA = torch.cuda.is_available()
# `make bench-quick` (CI): few rounds and the small shapes only (benchmarks read QUICK).
QUICK = os.environ.get("DDPM_FAST_BENCH_QUICK") == "1"
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Pin the CPU thread count so runs are comparable.
torch.set_num_threads(int(os.environ.get("DDPM_FAST_BENCH_THREADS", os.cpu_count() or 1)))


def pytest_addoption(parser):
    parser.addoption("--compile", action="store_true",
                     help="also benchmark torch.compile of the reference model (tens of seconds)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "compile: runs torch.compile (needs --compile)")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    skip_compile = pytest.mark.skip(reason="torch.compile benchmarks need --compile")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "compile" in item.keywords and not config.getoption("--compile"):
            item.add_marker(skip_compile)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timings(fn, device: str = "cpu", *, warmup: int = 3, reps: int = 20) -> list[float]:
    """Wall times of `reps` calls of fn() in seconds (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def best_time(fn, device: str = "cpu", *, warmup: int = 3, reps: int = 20) -> float:
    """Best (minimum) wall time of fn() in seconds (synchronised on CUDA): the same statistic as
    the t_fused_s / t_ref_s that `compare` records, so ratios against it are like for like."""
    return min(timings(fn, device, warmup=warmup, reps=reps))


@functools.lru_cache(maxsize=None)
def peak_copy_gbs(device: str = "cuda") -> float:
    """The memory-bandwidth ceiling the GPU benchmarks' "% of peak bandwidth" is measured against:
    the best GB/s (bytes read + bytes written) of a 2 GiB device-to-device copy on `device`,
    measured once per session (METHOD: a measured ceiling, not the datasheet's)."""
    src = torch.randn(2**29, device=device)
    dst = torch.empty_like(src)
    seconds = best_time(lambda: dst.copy_(src), device, warmup=2, reps=10)
    del src, dst
    return 2 * 2**29 * 4 / seconds / 1e9


def add_target(benchmark, what: str, value: float, limit: float, kind: str = "max",
               issue: int | None = None) -> None:
    """Record a goal of a kernel's issue in extra_info["targets"] (benchreport reports it as met or
    missed; it is not gated): `value` <= `limit` (kind "max") or >= `limit` (kind "min")."""
    if kind not in ("max", "min"):
        raise ValueError(f"kind must be 'max' or 'min'; got {kind!r}")
    benchmark.extra_info.setdefault("targets", []).append(
        {"what": what, "value": float(value), "limit": float(limit), "kind": kind, "issue": issue})


@pytest.fixture
def compare(benchmark):
    """compare(fused, reference, device=..., dtype=..., shape=..., nbytes=None, flops=None,
    rounds=20, warmup=3, baseline=None) -> speedup.

    Times `fused` with pytest-benchmark and `reference` with the same timer in the same run and
    records both in benchmark.extra_info (on a GPU, with nbytes, also the % of the measured copy
    bandwidth, peak_copy_gbs). `speedup` compares the best (minimum) times: on a shared
    machine interference only ever adds time, so the minimum is the stable estimate; the ratio of
    medians is recorded too (speedup_median). With `baseline` (the name of a stock fast path, e.g.
    F.scaled_dot_product_attention, timed as `reference`) the ratio is recorded as
    speedup_vs_baseline instead: reported, not under the speed gate, which holds each fused path
    to its pure-PyTorch reference."""

    def run(fused, ref, *, device: str, dtype, shape, nbytes: int | None = None,
            flops: float | None = None, rounds: int = 20, warmup: int = 3,
            baseline: str | None = None) -> float:
        if QUICK:
            rounds = min(rounds, 10)
        ref_times = timings(ref, device, warmup=warmup, reps=rounds)
        t_ref, t_ref_min = statistics.median(ref_times), min(ref_times)

        def timed():
            fused()
            _sync(device)

        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1 if QUICK else warmup, iterations=1)
        t_fused, t_fused_min = benchmark.stats.stats.median, benchmark.stats.stats.min
        info = benchmark.extra_info
        info.update(device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                    threads=torch.get_num_threads(), dtype=str(dtype).replace("torch.", ""),
                    shape=list(shape), t_ref_s=t_ref_min, t_fused_s=t_fused_min,
                    t_ref_median_s=t_ref, t_fused_median_s=t_fused,
                    speedup=t_ref_min / t_fused_min, speedup_median=t_ref / t_fused)
        if baseline is not None:  # a stock fast path, not the reference: reported, not gated
            info.update(baseline=baseline, speedup_vs_baseline=info.pop("speedup"))
        if nbytes is not None:
            info["GB/s"] = nbytes / t_fused_min / 1e9
            if device.startswith("cuda"):
                info["peak_copy_GB/s"] = peak_copy_gbs(device)
                info["%peak_bw"] = 100 * info["GB/s"] / info["peak_copy_GB/s"]
        if flops is not None:
            info["TFLOP/s"] = flops / t_fused_min / 1e12
        return t_ref_min / t_fused_min

    return run


def conv_flops(model: torch.nn.Module, *inputs) -> float:
    """Multiply-adds x 2 of every convolution in one forward of model(*inputs) (the bulk of a
    U-Net's work; attention and normalisation are not counted)."""
    total = 0.0

    def count(module, args, output):
        nonlocal total
        total += 2.0 * output.numel() * module.in_channels * module.weight[0, 0].numel() / module.groups

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return total


# guided-diffusion's ImageNet 64x64 model (README "Using it"), ~296 M parameters, fp16 torso.
ADM64_FLAGS = ("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 64 "
               "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 "
               "--num_res_blocks 3 --resblock_updown True --use_new_attention_order True --use_fp16 True "
               "--use_scale_shift_norm True")


@pytest.fixture(scope="session")
def adm64():
    """(ours, reference): an ADM-64-like model with random weights on the GPU (the zero-initialised
    output convolutions randomised too: a fresh ADM model outputs exactly 0), and the same weights
    as the plain reference model (backend "torch", no fast paths): guided-diffusion's eager U-Net."""
    torch.manual_seed(0)
    fast, _ = ddpm_fast.from_flags(ADM64_FLAGS, device="cuda")
    with torch.no_grad():
        for p in fast.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    ref = copy.deepcopy(fast)
    ref.backend, ref.fast = "torch", False
    return fast.eval(), ref.eval()
