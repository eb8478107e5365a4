"""What every Triton launcher of ddpm_fast.kernels does around a launch: the device guard and the
checks of index and grid limits (the kernels index a sample with 32-bit offsets; grid axes 1 and 2
hold at most 65535 programs, axis 0 at most 2^31 - 1).

Triton launches on the *current* CUDA device and stream; a tensor on cuda:1 while cuda:0 is current
would be read by a kernel running on the wrong GPU. `device_guard(t)` makes t's device current
for the launch (a no-op for CPU tensors, which only the interpreter runs)."""
from __future__ import annotations

import contextlib

import torch

MAX_GRID_AXIS0 = 2**31 - 1
MAX_GRID_AXIS12 = 65535
MAX_OFFSET = 2**31 - 1  # largest 32-bit element offset inside one sample


def device_guard(t: torch.Tensor):
    """Context manager: `torch.cuda.device(t.device)` for CUDA tensors, else nothing."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def check_sample_numel(what: str, numel: int) -> None:
    """ValueError unless one sample's `numel` elements are addressable with 32-bit offsets (the
    sample's base offset is 64-bit in the kernels, the offsets inside it are not)."""
    if numel > MAX_OFFSET:
        raise ValueError(f"the Triton kernels address one sample of {what} with 32-bit offsets: at "
                         f"most {MAX_OFFSET} elements per sample; got {numel}")


def check_grid(what: str, grid: tuple[int, ...]) -> tuple[int, ...]:
    """`grid` itself, after a ValueError if an axis exceeds CUDA's limit."""
    limits = (MAX_GRID_AXIS0, MAX_GRID_AXIS12, MAX_GRID_AXIS12)
    for axis, (size, limit) in enumerate(zip(grid, limits)):
        if size > limit:
            raise ValueError(f"{what} is too large for one Triton launch: grid axis {axis} would need "
                             f"{size} programs (CUDA allows {limit}); grid {tuple(grid)}")
    return grid
