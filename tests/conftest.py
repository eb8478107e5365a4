"""Test setup shared by every test file.

Devices: GPU-only tests are marked `cuda` and skip without a GPU. Without a GPU the Triton kernels
run on the CPU interpreter (TRITON_INTERPRET=1 must be set before triton is imported); with one,
Triton runs on the GPU, so every Triton test builds its tensors on `device_of("triton")` (or the
`triton_device` fixture) and is marked `cuda` at collection time: `pytest -m cuda` on a GPU host
runs every Triton and CUDA test.

Models: a fresh ADM U-Net outputs exactly 0 (guided-diffusion zero-initialises its output
convolutions), so a test comparing a model's outputs first gives it random weights with
`randomize_weights` (or the `randomized` fixture).
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Under pytest-xdist (`make test` runs two workers) each worker gets its share of the cores for
# torch's intra-op threads: two workers with two OpenMP threads each on a 2-core machine spin
# against each other (a tiny forward went from milliseconds to seconds). Tests that need a given
# thread count (tests/test_contexts.py: 1 and 2) set it themselves.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))   # the subprocesses tests start (CLI)
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

GOLDEN = Path(__file__).parent / "golden"
GPU_BACKENDS = ("cuda", "triton")  # the backends whose tensors live on the GPU when there is one


def device_of(backend: str) -> str:
    """The device of the tensors a test hands to `backend`: "cuda" for the CUDA C++ kernels and
    for Triton when a GPU is visible; "cpu" otherwise (Triton then runs on its interpreter)."""
    if backend == "cuda" or (backend == "triton" and HAS_CUDA):
        return "cuda"
    return "cpu"


@pytest.fixture
def triton_device() -> str:
    """The device of a Triton test's tensors: "cuda" on a GPU host, "cpu" (interpreter) otherwise."""
    return device_of("triton")


def randomize_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Overwrite every parameter of `model` (the zero-initialised output convolutions included)
    with N(0, std^2) draws from a generator seeded with `seed`; returns the model. Buffers are
    left alone."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)
    return model


@pytest.fixture
def randomized():
    """randomize_weights, for tests that prefer a fixture to an import."""
    return randomize_weights


TINY_UNET = dict(image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                 attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16, num_classes=5,
                 use_scale_shift_norm=True, resblock_updown=True)


def tiny_unet(seed: int = 0, diffusion_steps: int = 20, **overrides):
    """A small class-conditional ADM U-Net (8x8 RGB, learned variance, attention at 4x4, classes
    0..3 and the null label 4 for classifier-free guidance) with random weights
    (randomize_weights), in eval mode, carrying `model.diffusion` (cosine, learned_range)."""
    from ddpm_fast import Diffusion, UNet

    model = randomize_weights(UNet(**{**TINY_UNET, **overrides}), seed=seed).eval()
    model.null_label = None if model.num_classes is None else model.num_classes - 1
    model.diffusion = Diffusion("cosine", diffusion_steps, variance="learned_range")
    return model


# x86-64 microarchitecture levels as /proc/cpuinfo spells their flags (lzcnt is "abm")
_X86_64_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_X86_64_V4 = _X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def expected_cpu_isa(cap: str | None = None) -> str | None:
    """The instruction set ddpm_fast._C.cpu_isa() must report under DDPM_FAST_CPU_ISA=cap on this
    machine, from /proc/cpuinfo's flags (independently of the kernels' own detection): the widest
    of "avx512" (x86-64-v4), "avx2" (x86-64-v3), "baseline" that the CPU has and the cap allows.
    None where /proc/cpuinfo is unreadable or the CPU is not x86-64."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    if line is None:
        return None
    flags = set(line.split(":", 1)[1].split())
    if "lm" not in flags:
        return None
    if cap not in ("baseline", "avx2") and _X86_64_V4 <= flags:
        return "avx512"
    if cap != "baseline" and _X86_64_V3 <= flags:
        return "avx2"
    return "baseline"

def run_under_cpu_isa(isa: str, body: str) -> None:
    """Runs `body` (Python, dedented; the tests folder is on sys.path) in a fresh interpreter with
    DDPM_FAST_CPU_ISA=isa (the kernels read it once per process), then asserts it finished and that
    ddpm_fast._C ran the instruction set /proc/cpuinfo says it should under that cap."""
    script = "import sys\nsys.path.insert(0, %r)\n" % os.path.dirname(__file__) + textwrap.dedent(body) + \
        "\nimport ddpm_fast._C\nprint('ok', ddpm_fast._C.cpu_isa())\n"
    env = {**os.environ, "DDPM_FAST_CPU_ISA": isa}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    status, ran = result.stdout.split()[-2:]
    assert status == "ok" and ran == (expected_cpu_isa(isa) or ran), (isa, ran)



def _runs_on_gpu(item) -> bool:
    """A test that runs a GPU backend: a `backend` parameter of cuda/triton, the triton_device
    fixture, or "triton" in its name (the Triton tests of each op)."""
    callspec = getattr(item, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    return (backend in GPU_BACKENDS or "triton_device" in getattr(item, "fixturenames", ())
            or "triton" in item.name.lower())


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the marks added here count for `-m cuda`
def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        for item in items:
            if _runs_on_gpu(item) and "cuda" not in item.keywords:
                item.add_marker(pytest.mark.cuda)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def golden_unet():
    return torch.load(GOLDEN / "adm_unet_a.pt", weights_only=True)


@pytest.fixture(scope="session")
def golden_diffusion():
    return torch.load(GOLDEN / "adm_diffusion_a.pt", weights_only=True)
