"""Build helper of the SIMT test harness: runs the real csrc/cuda/*.cu kernels on the CPU.

For each .cu file a rewritten COPY (see `rewrite`) is compiled by g++ against tests/simt/simt.h
into a shared library whose host launchers are registered as torch.ops.<namespace>.<op> and take
CPU tensors; tests/simt/simt_runtime.cpp (torch.ops.simt.*) executes the kernels. Outputs are
cached under build/simt/ by the content hash of every input (sources, headers, patches, flags,
torch version), so a second run loads them without compiling.

    from build import load_kernels
    ns = load_kernels("attention")                  # -> "simt_attention_<hash>"
    out = getattr(torch.ops, ns).attention(qkv, heads, legacy)

Only what the tests need: no GPU, no nvcc; g++ with -fsanitize=kernel-address (its access hooks
are the harness's bounds and race checks).
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
INCLUDE_DIR = ROOT / "csrc" / "include"
BUILD_DIR = ROOT / "build" / "simt"

CXX = os.environ.get("CXX", "g++")
BASE_FLAGS = ["-std=c++20", "-O1", "-g0", "-fPIC", "-shared", "-w",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
# Every load and store of a kernel copy calls __asan_{load,store}N (the harness's checks).
RUNTIME_FLAGS = ["-O2"]  # the runtime is not instrumented: its hooks run on every kernel access
INSTRUMENT_FLAGS = ["-fsanitize=kernel-address", "--param", "asan-instrumentation-with-call-threshold=0",
                    "--param", "asan-stack=0", "--param", "asan-globals=0"]

_loaded: dict[str, str] = {}


def _torch_flags() -> list[str]:
    flags = []
    for path in cpp_extension.include_paths():
        flags += ["-isystem", path]
    for path in cpp_extension.library_paths():
        flags += [f"-L{path}", f"-Wl,-rpath,{path}"]
    return flags + ["-lc10", "-ltorch_cpu"]


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _compile(source: Path, output: Path, flags: list[str]) -> None:
    """g++ source -> output (written atomically)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    cmd = [CXX, *BASE_FLAGS, "-x", "c++", str(source), "-o", str(tmp), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"simt: compiling {source} failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
    os.replace(tmp, output)


def runtime_library() -> Path:
    """The harness runtime (not instrumented), built once per content hash."""
    src = HERE / "simt_runtime.cpp"
    key = _digest(src.read_bytes(), (HERE / "simt_abi.h").read_bytes(), torch.__version__, CXX, *BASE_FLAGS,
                  *RUNTIME_FLAGS)
    out = BUILD_DIR / f"libsimt_runtime_{key}.so"
    if not out.exists():
        _compile(src, out, [*RUNTIME_FLAGS, f"-I{HERE}", *_torch_flags()])
        for stale in BUILD_DIR.glob("libsimt_runtime_*.so"):
            if stale != out:
                stale.unlink(missing_ok=True)
    return out


# ---- the rewrite of a .cu copy ------------------------------------------------------------------

_DROP_INCLUDE = re.compile(r"^#include <(c10/cuda/[^>]*|cuda_runtime[^>]*|cuda_fp16\.h|cuda_bf16\.h|"
                           r"ATen/cuda/[^>]*)>\s*$")
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:<>, ]+?)\s+(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"__shared__\s+([^;]*);")


def _kernel_expression_start(text: str, end: int) -> int:
    """Start of the kernel expression (`name` or `name<args>`) that ends right before `end`."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if text[i - 1] == ">":  # template arguments: back to the matching '<'
        depth = 0
        while True:
            i -= 1
            if text[i] == ">":
                depth += 1
            elif text[i] == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def _rewrite_launches(text: str) -> str:
    """`k<<<cfg>>>(args)` -> `::simt::launcher("k", k, cfg)(args)`, keeping line breaks."""
    out, pos = [], 0
    while (open_at := text.find("<<<", pos)) >= 0:
        close_at = text.find(">>>", open_at)
        start = _kernel_expression_start(text, open_at)
        kernel = text[start:open_at].strip()
        config = text[open_at + 3:close_at]
        name = " ".join(kernel.split())
        between = text[start:open_at]
        newlines = "\n" * between.count("\n")
        out.append(text[pos:start])
        out.append(f'::simt::launcher("{name}", {kernel}, {config}){newlines}')
        pos = close_at + 3
    out.append(text[pos:])
    return "".join(out)


def _rewrite_shared(text: str, origin: str) -> str:
    def dynamic(m: re.Match) -> str:
        return f"{m.group(1)}* {m.group(2)} = static_cast<{m.group(1)}*>(::simt::dynamic_shared());"

    text = _EXTERN_SHARED.sub(dynamic, text)

    def static(m: re.Match) -> str:
        line = text.count("\n", 0, m.start()) + 1
        decl = m.group(1)
        first = re.match(r"(.*?)\s*\b(\w+)\s*((?:\[[^\]]*\]\s*)*)(,|$)", decl)
        if first is None:
            raise ValueError(f"simt: cannot parse the __shared__ declaration on line {line}: {decl}")
        type_name = first.group(1)
        declarators = [first.group(2) + first.group(3)] + [d for d in decl[first.end():].split(",") if d.strip()]
        parts = []
        for d in declarators:
            dm = re.fullmatch(r"\s*(\w+)\s*((?:\[[^\]]*\]\s*)*)", d)
            if dm is None:
                raise ValueError(f"simt: cannot parse the __shared__ declarator {d!r} on line {line}")
            name, dims = dm.group(1), dm.group(2).strip()
            parts.append(f'auto& {name} = ::simt::shared_var<{type_name}{dims}>("{origin}:{line}:{name}");')
        return " ".join(parts)

    return _SHARED.sub(static, text)


def rewrite(source: str, origin: str) -> str:
    """A .cu file's text -> the g++ source the harness builds (same line numbers as `origin`)."""
    lines = source.split("\n")
    first_project = next(i for i, l in enumerate(lines) if l.startswith('#include "'))
    lines = ["" if _DROP_INCLUDE.match(l) else l for l in lines]
    lines[first_project] = f'#include "simt.h"\n#line {first_project + 1} "{origin}"\n' + lines[first_project]
    text = "\n".join(lines)
    text = _rewrite_shared(text, origin)
    text = _rewrite_launches(text)
    text = text.replace(".is_cuda()", ".is_cpu()")
    text = re.sub(r"TORCH_LIBRARY_IMPL\(\s*ddpm_fast\s*,\s*CUDA\s*,\s*(\w+)\s*\)", r"SIMT_LIBRARY(\1)", text)
    for leftover in ("__shared__", "<<<", "TORCH_LIBRARY_IMPL"):
        if leftover in text:
            raise ValueError(f"simt: {origin}: '{leftover}' left after the rewrite")
    return f'#line 1 "{origin}"\n' + text


def apply_patches(source: str, patches, origin: str) -> str:
    """Exact-text replacements (old, new): each old must occur exactly once in the file."""
    for old, new in patches:
        if source.count(old) != 1:
            raise ValueError(f"simt: patch target found {source.count(old)} times in {origin}: {old!r}")
        source = source.replace(old, new)
    return source


# ---- building and loading -----------------------------------------------------------------------

def _kernel_job(stem: str, patches=(), tag: str = ""):
    """(namespace, output path, rewritten source path, compile flags) of one kernel build."""
    cu = CUDA_DIR / f"{stem}.cu"
    if not cu.exists():  # the harness's own self-test kernels
        cu = HERE / f"{stem}.cu"
    origin = str(cu.relative_to(ROOT))
    text = rewrite(apply_patches(cu.read_text(), patches, origin), origin)
    runtime = runtime_library()
    headers = [p.read_bytes() for p in (*sorted(HERE.glob("*.h")), *sorted(INCLUDE_DIR.glob("*.h")))]
    key = _digest(text, *headers, torch.__version__, CXX, *BASE_FLAGS, *INSTRUMENT_FLAGS, runtime.name)
    namespace = f"simt_{stem}{'_' + tag if tag else ''}_{key}"
    src = BUILD_DIR / f"{namespace}.cpp"
    out = BUILD_DIR / f"lib{namespace}.so"
    flags = [f"-DSIMT_NAMESPACE={namespace}", f"-I{HERE}", f"-I{INCLUDE_DIR}", *INSTRUMENT_FLAGS,
             *_torch_flags(), "-x", "none", str(runtime), f"-Wl,-rpath,{runtime.parent}"]
    return namespace, out, src, text, flags


def build_kernels(jobs) -> list[tuple[str, Path]]:
    """Builds (stem, patches, tag) jobs that are not cached yet, in parallel; -> (namespace, .so)."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    planned = [_kernel_job(*job) for job in jobs]
    procs = []
    for namespace, out, src, text, flags in planned:
        if out.exists():
            continue
        src.write_text(text)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        cmd = [CXX, *BASE_FLAGS, "-x", "c++", str(src), "-o", str(tmp), *flags]
        procs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace"),
                      tmp, out, cmd))
    for proc, tmp, out, cmd in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"simt: build failed:\n{' '.join(cmd)}\n{err[-6000:]}")
        os.replace(tmp, out)
    for namespace, out, src, *_ in planned:  # drop older builds of the same file and tag
        prefix = namespace[:namespace.rindex("_") + 1]
        for old in BUILD_DIR.glob(f"*{prefix}*"):
            if old.name not in (out.name, src.name) and old.name.split(prefix)[0] in ("lib", "") \
                    and old.suffix in (".so", ".cpp") and len(old.stem.split(prefix)[1]) == 16:
                old.unlink(missing_ok=True)
    return [(namespace, out) for namespace, out, *_ in planned]


def load_runtime() -> None:
    """Loads torch.ops.simt (once)."""
    if "runtime" not in _loaded:
        torch.ops.load_library(str(runtime_library()))
        _loaded["runtime"] = "simt"


def load_kernels(stem: str, patches=(), tag: str = "") -> str:
    """Builds (or takes from the cache) and loads one kernel file; returns its op namespace."""
    load_runtime()
    [(namespace, out)] = build_kernels([(stem, tuple(patches), tag)])
    if namespace not in _loaded:
        torch.ops.load_library(str(out))
        _loaded[namespace] = namespace
    return namespace


if __name__ == "__main__":  # python tests/simt/build.py [stem ...]: build (warm the cache)
    stems = sys.argv[1:] or [p.stem for p in sorted(CUDA_DIR.glob("*.cu"))]
    for namespace, out in build_kernels([(s, (), "") for s in stems]):
        print(namespace, out)
