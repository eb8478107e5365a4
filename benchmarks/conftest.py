"""Shared benchmark machinery: every fused path is timed by pytest-benchmark and its reference is
timed in the same run, so `extra_info` holds the speedup t_ref / t_fused (a ratio, comparable
across machines), the device, dtype and shape, and GB/s or TFLOP/s where meaningful."""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

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


@pytest.fixture
def compare(benchmark):
    """compare(fused, reference, device=..., dtype=..., shape=..., nbytes=None, flops=None) -> speedup.

    Times `fused` with pytest-benchmark and `reference` with the same timer in the same run and
    records both in benchmark.extra_info. `speedup` compares the best (minimum) times: on a shared
    machine interference only ever adds time, so the minimum is the stable estimate; the ratio of
    medians is recorded too (speedup_median)."""

    def run(fused, ref, *, device: str, dtype, shape, nbytes: int | None = None,
            flops: float | None = None, rounds: int = 20) -> float:
        if QUICK:
            rounds = min(rounds, 10)
        ref_times = timings(ref, device, reps=rounds)
        t_ref, t_ref_min = statistics.median(ref_times), min(ref_times)

        def timed():
            fused()
            _sync(device)

        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1 if QUICK else 3, iterations=1)
        t_fused, t_fused_min = benchmark.stats.stats.median, benchmark.stats.stats.min
        info = benchmark.extra_info
        info.update(device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                    threads=torch.get_num_threads(), dtype=str(dtype).replace("torch.", ""),
                    shape=list(shape), t_ref_s=t_ref_min, t_fused_s=t_fused_min,
                    t_ref_median_s=t_ref, t_fused_median_s=t_fused,
                    speedup=t_ref_min / t_fused_min, speedup_median=t_ref / t_fused)
        if nbytes is not None:
            info["GB/s"] = nbytes / t_fused_min / 1e9
        if flops is not None:
            info["TFLOP/s"] = flops / t_fused_min / 1e12
        return t_ref_min / t_fused_min

    return run
