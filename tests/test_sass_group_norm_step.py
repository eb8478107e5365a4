"""Machine code of the GroupNorm and diffusion-step CUDA kernels (issue 17), read offline from SASS.

* GroupNorm: every vectorised instantiation (kVec = 16 / sizeof(T): 4 fp32, 8 fp16/bf16) of the
  statistics kernels (moments_nchw_kernel, moments_channels_last_kernel) and of the apply kernel
  (both layouts) loads x with 128-bit loads (LDG.E.128), and the apply kernel stores y with 128-bit
  stores. Before issue 17 the channels-last statistics loaded one element at a time (LDG.E.U16 for
  fp16) and had no vector instantiation.
* diffusion step: the apply pass of the sample projection (step_kernel<2>) no longer reduces
  its sample's partial sums in every block (two block reductions, 4 barriers beside the one of the
  coefficient load); factor_kernel does it once per sample.

By default the installed extension (ddpm_fast/_C*.so) is read; DDPM_FAST_SASS_OBJECT=PATH reads a
cubin / object / fatbin nvcc wrote instead (e.g. one .cu compiled standalone: `nvcc -c -gencode
arch=compute_90,code=sm_90 ...`); a file without diffusion_step.cu's kernels skips the step test.
Needs cuobjdump (triton ships one); skipped without it or without device code (a CPU-only build).
"""
from __future__ import annotations

import os
import re

import pytest

from cuda_sass import instruction_counts, require_sass

OBJECT_ENV = "DDPM_FAST_SASS_OBJECT"

VECTOR = {"float": 4, "c10::Half": 8, "c10::BFloat16": 8}  # elements per 16 bytes

# (kernel, template arguments after T and kVec: the layout flag of apply_kernel, then index_t)
GN_NAME = re.compile(r"::(moments_nchw_kernel|moments_channels_last_kernel|apply_kernel)"
                     r"<([^,<>]+), (\d+), (?:(true|false), )?(int|long)>\(")


def sass_path():
    return os.environ.get(OBJECT_ENV) or None


def opcodes(sass: str) -> set[str]:
    """Opcodes with their modifiers (LDG.E.128.CONSTANT, ...) of one function's SASS."""
    return set(re.findall(r"\b((?:LDG|STG)(?:\.[A-Z0-9_]+)+)", sass))


def group_norm_vector_kernels() -> dict[tuple, str]:
    """{(arch, kernel, layout, dtype): SASS} of the vectorised GroupNorm instantiations with 32-bit
    indices (the int64 ones load the same way). Only these are disassembled (cuobjdump -sass -fun
    costs ~1 s per function here)."""
    found = {}
    for dtype, vec in VECTOR.items():
        for contains in (f"kernel<{dtype}, {vec}, int>", f"apply_kernel<{dtype}, {vec}, true, int>",
                         f"apply_kernel<{dtype}, {vec}, false, int>"):
            for (arch, name), sass in require_sass(sass_path(), contains).items():
                m = GN_NAME.search(name)
                if m is None:
                    continue
                kernel, _dtype, _vec, channels_last, _index = m.groups()
                layout = {"moments_nchw_kernel": "nchw", "moments_channels_last_kernel": "channels_last",
                          "apply_kernel": "channels_last" if channels_last == "true" else "nchw"}[kernel]
                kind = "apply" if kernel == "apply_kernel" else "moments"
                found[(arch, kind, layout, dtype)] = sass
    return found


def test_group_norm_vector_kernels_use_128_bit_loads():
    kernels = group_norm_vector_kernels()
    archs = sorted({key[0] for key in kernels})
    if not archs:
        pytest.fail("no vectorised GroupNorm kernel (apply_kernel<T, 16 / sizeof(T), ...>) in the SASS")
    wanted = [(arch, kind, layout, dtype) for arch in archs for kind in ("moments", "apply")
              for layout in ("nchw", "channels_last") for dtype in VECTOR]
    missing = [key for key in wanted if key not in kernels]
    assert not missing, f"vectorised instantiations missing: {missing}"
    for key in wanted:
        ops = opcodes(kernels[key])
        assert any(op.startswith("LDG.E.128") for op in ops), f"{key}: no 128-bit load of x ({sorted(ops)})"
        if key[1] == "apply":
            assert any(op.startswith("STG.E.128") for op in ops), f"{key}: no 128-bit store ({sorted(ops)})"


def test_step_sample_projection_reduces_partials_once_per_sample():
    apply = require_sass(sass_path(), "step_kernel<2>")
    if not apply:
        pytest.skip("no diffusion_step.cu kernels in this object")
    factor = require_sass(sass_path(), "factor_kernel")
    for (arch, name), sass in apply.items():
        barriers = instruction_counts(sass)["BAR"]
        assert barriers == 1, f"{arch} {name}: {barriers} barriers (the coefficient load's 1 expected)"
        assert any(a == arch for a, _ in factor), f"{arch}: no factor_kernel"
