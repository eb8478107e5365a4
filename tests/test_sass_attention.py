"""SASS evidence for the tensor-core attention kernel of csrc/cuda/attention.cu, read offline (no
GPU) with cuobjdump (tests/cuda_sass.py):

* for sm_80 and sm_90, the fp16 and bf16 instantiations of tc::attention_tc_kernel (head dims 32,
  64, 128; both stride orders) run on the tensor cores: HMMA.16816.F32 (mma.sync.m16n8k16; .BF16
  for bf16), LDSM (ldmatrix) and LDGSTS (cp.async) in every one, and no local-memory spills;
* every attention function (tensor-core and scalar) has a zero stack frame (issue 16).

By default the installed extension (ddpm_fast._C); DDPM_FAST_SASS_OBJECT=PATH checks a cubin,
object or fatbin instead (e.g. `nvcc -cubin` of attention.cu for one arch: then only the archs in
it are required).
"""
from __future__ import annotations

import os
import re

import pytest

import cuda_sass
from test_offline_compile import _demangle, needs_ptxas, resource_usage

ARCHS = ("sm_80", "sm_90")
DTYPES = {"c10::Half": "HMMA.16816.F32 ", "c10::BFloat16": "HMMA.16816.F32.BF16 "}
HEAD_DIMS = (32, 64, 128)
TC_KERNEL = "attention_tc_kernel<"


def object_path():
    path = os.environ.get("DDPM_FAST_SASS_OBJECT")
    return (path, True) if path else (cuda_sass.extension_path(), False)


def tensor_core_kernels(sass: dict) -> dict:
    """{(arch, dtype, head dim, cmajor): SASS} of the tc::attention_tc_kernel instantiations."""
    out = {}
    for (arch, name), text in sass.items():
        m = re.search(r"attention_tc_kernel<([\w:]+), (\d+), (true|false)>", name)
        if m:
            out[(arch, m.group(1), int(m.group(2)), m.group(3) == "true")] = text
    return out


def tensor_core_failures(sass: dict, archs) -> list[str]:
    kernels = tensor_core_kernels(sass)
    bad = []
    for arch in archs:
        for dtype, hmma in DTYPES.items():
            for d in HEAD_DIMS:
                for cmajor in (False, True):
                    where = f"{arch} attention_tc_kernel<{dtype}, {d}, {cmajor}>"
                    text = kernels.get((arch, dtype, d, cmajor))
                    if text is None:
                        bad.append(f"{where}: not in the object (built before the tensor-core kernel? rebuild)")
                        continue
                    counts = cuda_sass.instruction_counts(text)
                    missing = [op for op in ("HMMA", "LDSM", "LDGSTS") if counts[op] == 0]
                    if missing:
                        bad.append(f"{where}: no {', '.join(missing)} instructions")
                    if hmma not in text:
                        bad.append(f"{where}: no {hmma.strip()} (wrong mma input type)")
                    if counts["STL"] or counts["LDL"]:
                        bad.append(f"{where}: {counts['STL']} STL / {counts['LDL']} LDL (local-memory spills)")
    return bad


def stack_failures(path) -> list[str]:
    rows = resource_usage(str(path))
    names = _demangle([r["function"] for r in rows])
    return [f"{r['arch'] or 'cubin'} {name}: stack frame {r['STACK']} B, local {r['LOCAL']} B"
            for r, name in zip(rows, names)
            if "attention" in name and (r["STACK"] or r["LOCAL"])]


@needs_ptxas
def test_tensor_core_attention_sass():
    path, override = object_path()
    sass = cuda_sass.require_sass(path, TC_KERNEL)
    all_archs = {arch for arch, _ in cuda_sass.require_sass(path, "attention")}
    archs = sorted(all_archs) if override else ARCHS
    if not all_archs:
        pytest.skip(f"{path}: no attention kernels")
    bad = tensor_core_failures(sass, archs)
    counts = {k: cuda_sass.instruction_counts(v) for k, v in tensor_core_kernels(sass).items()}
    for (arch, dtype, d, cmajor), c in sorted(counts.items()):
        print(f"{arch} {dtype:<14} D={d:<3} {'T-contig ' if cmajor else 'C-contig '} HMMA {c['HMMA']:>4} "
              f"LDSM {c['LDSM']:>3} LDGSTS {c['LDGSTS']:>3}")
    assert not bad, "\n".join(bad)


@needs_ptxas
def test_attention_functions_have_no_stack_frame():
    path, _ = object_path()
    cuda_sass.require_sass(path, "attention")  # skips without cuobjdump or device code
    bad = stack_failures(path)
    assert not bad, "\n".join(bad)
