"""Which backends exist, why the others do not, and which one runs a given call.

Backends:
  torch   the pure-PyTorch reference (ddpm_fast.reference): always available
  cpu     C++ kernels of ddpm_fast._C for CPU tensors
  cuda    CUDA C++ kernels of ddpm_fast._C for CUDA tensors
  triton  Triton kernels (ddpm_fast.kernels) for CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")
LIBRARY = "ddpm_fast"


@dataclass(frozen=True)
class BackendStatus:
    """Availability of one backend; `reason` says why not (or what it runs on)."""

    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available

    def __str__(self) -> str:
        return ("available" if self.available else "unavailable") + f" ({self.reason})"


@functools.lru_cache(maxsize=None)
def extension() -> tuple[ModuleType | None, str]:
    """Import ddpm_fast._C once; returns (module or None, error text)."""
    try:
        return importlib.import_module("ddpm_fast._C"), ""
    except ImportError as exc:  # not built, or built against another torch
        return None, f"ddpm_fast._C could not be imported: {exc}"


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ddpm_fast::<op> has a kernel registered for `dispatch_key` ("CPU" or "CUDA").
    Cached: the kernels register when ddpm_fast._C loads (once per process); the dispatcher query
    cost a few microseconds per op call."""
    if extension()[0] is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{LIBRARY}::{op}", dispatch_key)
    except RuntimeError:  # op not defined
        return False


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return ""


def triton_status() -> BackendStatus:
    err = _triton_import()
    if err:
        return BackendStatus(False, err)
    import triton

    if torch.cuda.is_available():
        return BackendStatus(True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")
    if triton_interpret():
        return BackendStatus(True, f"triton {triton.__version__} interpreter on the CPU (TRITON_INTERPRET=1)")
    return BackendStatus(
        False, f"triton {triton.__version__} is installed but no GPU is visible "
        "(set TRITON_INTERPRET=1 before importing ddpm_fast to run the kernels on the CPU interpreter)")


def backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is usable here and why (not)."""
    ext, err = extension()
    out = {"torch": BackendStatus(True, f"pure PyTorch reference, torch {torch.__version__}")}
    if ext is None:
        out["cpu"] = BackendStatus(False, err)
        out["cuda"] = BackendStatus(False, err)
    else:
        omp = "OpenMP" if ext.openmp_enabled() else "no OpenMP"
        out["cpu"] = BackendStatus(True, f"C++ kernels, {omp}, {torch.get_num_threads()} threads")
        if not ext.cuda_compiled():
            out["cuda"] = BackendStatus(False, "the extension was built without CUDA "
                                        "(DDPM_FAST_CPU_ONLY=1, no nvcc, or a CPU build of torch)")
        elif not torch.cuda.is_available():
            out["cuda"] = BackendStatus(False, f"compiled for TORCH_CUDA_ARCH_LIST={ext.cuda_archs()!r} "
                                        "but no GPU is visible")
        else:
            out["cuda"] = BackendStatus(True, f"CUDA C++ kernels ({ext.cuda_archs()}) on "
                                        f"{torch.cuda.get_device_name()}")
    out["triton"] = triton_status()
    return out


def triton_module(op: str) -> ModuleType:
    """The Triton implementation of `op` (ddpm_fast.kernels.<op>), imported on first use."""
    return importlib.import_module(f"ddpm_fast.kernels.{op}")


def resolve(op: str, backend: str, device: torch.device, *, triton_ok: bool = True) -> str:
    """The concrete backend that runs `op` on tensors of `device`.

    auto: triton for CUDA tensors when usable (and `triton_ok`), else the CUDA C++ kernel; the C++
    CPU kernel for CPU tensors; the reference when no kernel fits. An explicit backend that cannot
    run here raises ValueError saying why. The choice depends only on the arguments and on this
    process (extension, GPU, TRITON_INTERPRET), so torch.compile treats it as a constant.
    """
    return _resolve(op, backend, device.type, triton_ok)


@torch.compiler.assume_constant_result
def _resolve(op: str, backend: str, dev: str, triton_ok: bool) -> str:
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "auto":
        if dev == "cuda":
            if triton_ok and triton_status().available:
                return "triton"
            if has_kernel(op, "CUDA"):
                return "cuda"
            return "torch"
        if dev == "cpu" and has_kernel(op, "CPU"):
            return "cpu"
        return "torch"
    if backend == "torch":
        return backend
    if backend == "cpu":
        if dev != "cpu":
            raise ValueError(f"backend='cpu' runs on CPU tensors; the input is on {dev}")
        if not has_kernel(op, "CPU"):
            raise ValueError(f"backend='cpu' is unavailable for {op}: {backends()['cpu'].reason}")
        return backend
    if backend == "cuda":
        if dev != "cuda":
            raise ValueError(f"backend='cuda' runs on CUDA tensors; the input is on {dev}")
        if not has_kernel(op, "CUDA"):
            raise ValueError(f"backend='cuda' is unavailable for {op}: {backends()['cuda'].reason}")
        return backend
    # triton
    status = triton_status()
    if not status.available or not triton_ok:
        raise ValueError(f"backend='triton' is unavailable for {op}: {status.reason}")
    if dev == "cpu" and not triton_interpret():
        raise ValueError("backend='triton' runs CPU tensors only under TRITON_INTERPRET=1")
    return backend
