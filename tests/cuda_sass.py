"""SASS of the CUDA C++ objects, read offline (no GPU): which machine instructions a kernel was
compiled to, per arch, from `cuobjdump -sass`.

    extension_path()            -> the built ddpm_fast._C*.so (None when not built)
    sass_functions(path, contains=None)
                                -> {(arch, demangled name): SASS text} of every device function in
                                   `path` (the extension, or a cubin / object / fatbin nvcc wrote),
                                   or of those whose demangled name contains `contains`
    instruction_counts(sass)    -> {opcode: count} of one function's SASS (HMMA, LDSM, LDGSTS, ...)

A path with no device code (a CPU-only build) raises NoDeviceCode; `require_sass(path)` turns that
and a missing cuobjdump into pytest skips. `cuobjdump -sass` of the whole extension takes 1-3 minutes
on the 2-core machine: with `contains` only the matching functions are disassembled (names from the
fast --dump-resource-usage, then `cuobjdump -sass -fun NAMES`: seconds). Dumps are cached per
(path, mtime, size, contains).
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
from collections import Counter
from pathlib import Path

from test_offline_compile import _demangle, _extension_path, nvidia_tool, resource_usage


class NoDeviceCode(RuntimeError):
    """The file holds no CUDA device code (e.g. the extension was built without CUDA)."""


def extension_path() -> Path | None:
    """The installed ddpm_fast._C shared object, None when it is not built."""
    return _extension_path()


_ARCH = re.compile(r"^\s*code for (sm_\d+a?)\s*$", re.M)
_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$", re.M)
# one SASS line: /*0040*/  [@P0 ]OPCODE[.MODS] operands ;  /* encoding */
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")


def _dump(path: str, functions: tuple[str, ...] = ()) -> str:
    tool = nvidia_tool("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump is not installed (triton's NVIDIA backend ships one)")
    only = ["-fun", ",".join(functions)] if functions else []
    proc = subprocess.run([tool, "-sass", *only, path], capture_output=True, text=True)
    text = proc.stdout
    if proc.returncode or not _FUNCTION.search(text):
        msg = (proc.stderr.strip() or text.strip())[:500]
        if proc.returncode == 0 or "does not contain device code" in msg or "no device code" in msg.lower():
            raise NoDeviceCode(f"{path}: no CUDA device code ({msg or 'cuobjdump printed no functions'})")
        raise RuntimeError(f"cuobjdump -sass {path}: {msg}")
    return text


def _mangled_names(path: str, contains: str) -> tuple[str, ...]:
    """The mangled names of the device functions in `path` whose demangled name contains `contains`."""
    try:
        rows = resource_usage(path)
    except RuntimeError as exc:
        if "does not contain device code" in str(exc) or "no device code" in str(exc).lower():
            raise NoDeviceCode(str(exc)) from None
        raise
    names = sorted({r["function"] for r in rows})
    return tuple(n for n, d in zip(names, _demangle(names)) if contains in d)


@functools.lru_cache(maxsize=16)
def _sass_functions_cached(path: str, _mtime_ns: int, _size: int, contains: str | None) -> dict[tuple[str, str], str]:
    functions = ()
    if contains is not None:
        functions = _mangled_names(path, contains)
        if not functions:
            return {}
    text = _dump(path, functions)
    arch_at = [(m.start(), m.group(1)) for m in _ARCH.finditer(text)]
    matches = list(_FUNCTION.finditer(text))
    names = _demangle([m.group(1) for m in matches])
    out: dict[tuple[str, str], str] = {}
    for i, (m, name) in enumerate(zip(matches, names)):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        # an arch line between two functions starts the next cubin: cut the body there
        body_end = next((pos for pos, _a in arch_at if m.end() < pos < end), end)
        arch = next((a for pos, a in reversed(arch_at) if pos < m.start()), "unknown")
        key = (arch, name)
        if key in out:  # the same function in another cubin of the same arch (several objects)
            key = (arch, f"{name} #{sum(k[0] == arch and k[1].startswith(name) for k in out)}")
        out[key] = text[m.end():body_end]
    return out


def sass_functions(path: str | os.PathLike, contains: str | None = None) -> dict[tuple[str, str], str]:
    """{(arch like "sm_80", demangled function name): SASS text} of every device function in `path`
    (with `contains`: of those whose demangled name contains it). Raises NoDeviceCode when `path`
    has no device code, FileNotFoundError without cuobjdump or `path`."""
    p = Path(path)
    st = p.stat()
    return _sass_functions_cached(str(p.resolve()), st.st_mtime_ns, st.st_size, contains)


def instruction_counts(sass: str) -> Counter:
    """{opcode without modifiers: count} of one function's SASS text (e.g. HMMA, LDSM, LDGSTS)."""
    return Counter(m.group(1) for m in _INSTRUCTION.finditer(sass))


def require_sass(path: str | os.PathLike | None = None, contains: str | None = None) -> dict[tuple[str, str], str]:
    """sass_functions(path, contains) (default path: the extension), or a pytest skip saying why
    there is none."""
    import pytest

    if nvidia_tool("cuobjdump") is None:
        pytest.skip("cuobjdump is not installed (triton's NVIDIA backend ships one)")
    path = path if path is not None else extension_path()
    if path is None:
        pytest.skip("ddpm_fast._C is not built")
    try:
        return sass_functions(path, contains)
    except NoDeviceCode as exc:
        pytest.skip(str(exc))
