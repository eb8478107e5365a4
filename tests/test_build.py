"""The build: ddpm_fast._C imports, registers its kernels, and ddpm_fast.backends() says truthfully
which backends run here and why the others do not."""
import importlib

import pytest
import torch

import ddpm_fast
from ddpm_fast import _registry

OPS_WITH_KERNELS = ["group_norm_scale_shift"]


def test_extension_imports():
    ext = importlib.import_module("ddpm_fast._C")
    assert isinstance(ext.cuda_compiled(), bool)
    assert isinstance(ext.openmp_enabled(), bool)
    assert isinstance(ext.cuda_archs(), str)
    assert (ext.cuda_archs() != "") == ext.cuda_compiled()


def test_cpu_backend_available():
    status = ddpm_fast.backends()["cpu"]
    assert status.available, status.reason
    assert "C++ kernels" in status.reason
    assert ddpm_fast.backends()["torch"].available


@pytest.mark.parametrize("op", OPS_WITH_KERNELS)
def test_cpu_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ddpm_fast::{op}", "CPU")
    assert _registry.has_kernel(op, "CPU")
    assert _registry.resolve(op, "auto", torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("op", OPS_WITH_KERNELS)
def test_cuda_kernels_registered_when_compiled(op):
    ext = importlib.import_module("ddpm_fast._C")
    registered = torch._C._dispatch_has_kernel_for_dispatch_key(f"ddpm_fast::{op}", "CUDA")
    # nvcc present at build time <=> the CUDA kernels are linked in and registered
    assert registered == ext.cuda_compiled()


def test_cuda_backend_status():
    ext = importlib.import_module("ddpm_fast._C")
    status = ddpm_fast.backends()["cuda"]
    if not ext.cuda_compiled():
        assert not status.available and "without CUDA" in status.reason
    elif not torch.cuda.is_available():
        assert not status.available
        assert "no GPU is visible" in status.reason and ext.cuda_archs() in status.reason
    else:
        assert status.available and torch.cuda.get_device_name() in status.reason


def test_triton_backend_status():
    status = ddpm_fast.backends()["triton"]
    assert status.reason  # always says what it runs on, or why not
    if torch.cuda.is_available():
        assert status.available
    elif _registry.triton_interpret():  # tests/conftest.py sets TRITON_INTERPRET=1 without a GPU
        assert status.available and "interpreter" in status.reason
    else:
        assert not status.available and "no GPU" in status.reason


def test_unavailable_backend_is_a_clear_error():
    x = torch.randn(1, 32, 2, 2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='cuda'"):
            ddpm_fast.ops.group_norm_scale_shift(x, 8, backend="cuda")
