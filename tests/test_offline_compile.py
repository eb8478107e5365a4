"""Offline GPU compile of every Triton kernel the public ops launch, and the resource usage of the
CUDA C++ objects -- on a machine without a GPU.

Why: the CPU tests run the Triton kernels on the interpreter (TRITON_INTERPRET=1), which never runs
Triton's code generator or ptxas; a kernel the GPU compiler rejects (e.g. a `NAME: tl.constexpr = v`
global) passes every CPU test and fails on a GPU's first call. Here Triton's own compiler builds the
kernels for sm_80 and sm_90 (`triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`
runs the code generator and ptxas; no GPU needed).

How, in two subprocesses of this file (`python tests/test_offline_compile.py record|compile ...`):

1. record (TRITON_INTERPRET=1, no visible GPU): the public ops -- ops.group_norm_scale_shift,
   ops.attention, ops.diffusion_step, philox.initial_noise with backend="triton" -- run over the option
   matrices below with `InterpretedFunction.run` patched: each Triton launch is recorded (kernel,
   arguments, launch options) and skipped (only the launches matter here; the CPU tests check the
   values). A launch becomes the specialization Triton's JIT would compile on a GPU
   (`specialization()`: pointer dtypes, 16-byte alignment, ints of value 1 as constexpr, ints
   divisible by 16, i64 past 2^31). GPU-only choices replace the interpreter's: attention's tile is
   kernels.attention.tile_config's for each arch, the GroupNorm split count that of a 108- and a
   132-SM GPU. The GroupNorm and step matrices are strength-2 covering arrays (`pairwise()`: every
   pair of values of any two options meets in some call); the attention matrix visits every cell of
   the tile table, so every TILE_TABLE entry is compiled (checked).
2. compile (no TRITON_INTERPRET): each distinct specialization for sm_80 and sm_90, in WORKERS
   processes; registers and spill bytes per kernel from ptxas -v's log of the compile (Triton
   prints it under TRITON_DUMP_PTXAS_LOG=1; a kernel from Triton's cache gets ptxas -v run on its
   PTX), shared memory from Triton's metadata.

The test fails on a compile error, register spills beyond SPILL_BUDGET bytes, or shared memory
beyond what the arch gives one block (sm_80 family: 99 KiB, what sm_86/sm_89 allow; sm_90:
227 KiB). The CUDA C++ test reads ddpm_fast/_C*.so's resource usage with cuobjdump
--dump-resource-usage; it has no spill count, so stack frames (spills or local arrays) beyond
CUDA_STACK_BUDGET bytes fail, as does static shared memory beyond 48 KiB (the attention kernel's
dynamic shared memory is sized at launch and not in the binary: not checked here). Run with -s for
the tables. Triton API used: triton.compile, ASTSource(fn, signature, constexprs, attrs),
GPUTarget, InterpretedFunction.run (checked with 3.8; the GPU machine has 3.6).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARCHS = (80, 90)
SPILL_BUDGET = 0       # bytes of register spill stores (or loads) ptxas may report for a kernel
SHARED_LIMIT = {80: 99 * 1024, 90: 227 * 1024}  # bytes of shared memory per block
CUDA_STATIC_SHARED_LIMIT = 48 * 1024  # static __shared__ per block (more needs dynamic + opt-in)
# cuobjdump's STACK of a CUDA C++ function: its stack frame, spills included. 0: the 8-16 B frames
# five sm_80 attention instantiations had (register saves around the IEEE-division and int64-division
# subroutine CALLs) are gone since one reciprocal per row and 32-bit block-index division; every
# other function of the 2026-12-02 build already had STACK 0. (The step forward's pixel_kernel had a
# 24-byte frame with spills for a while: two inlined copies of the step made it ~340 KB of SASS;
# its two passes now share one loop body.)
CUDA_STACK_BUDGET = 0
KERNELS = "ddpm_fast.kernels"
ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2
TIMEOUT_S = 900


# ---- the option matrices ---------------------------------------------------------------------------
def pairwise(factors: dict[str, tuple]) -> list[dict]:
    """A strength-2 covering array over `factors` (name -> levels), built greedily and
    deterministically: every pair of levels of any two factors appears in some row."""
    names = list(factors)
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2)
                 for va in factors[a] for vb in factors[b]}
    rows = []
    while uncovered:
        a, va, b, vb = min(uncovered, key=repr)  # start from a pair still uncovered
        row: dict = {a: va, b: vb}
        for name in names:
            if name in row:
                continue

            def gain(level):
                return sum((x, row[x], name, level) in uncovered or (name, level, x, row[x]) in uncovered
                           for x in row)
            row[name] = max(factors[name], key=gain)  # max keeps the first of equal gains
        row = {name: row[name] for name in names}
        uncovered -= {(x, row[x], y, row[y]) for x, y in itertools.combinations(names, 2)}
        rows.append(row)
    return rows


GN_FACTORS = {
    "dtype": ("float32", "float16", "bfloat16"),
    "layout": ("nchw", "channels_last"),
    # fused: one program per group; two-pass: moments + apply; odd: odd sizes, 1-d / 3-d spatial
    "shape": ((2, 32, 5, 7), (2, 64, 33, 31), (3, 6, 19), (1, 8, 3, 5, 7), (2, 32, 64, 64)),
    "groups": ("some", "one"),
    "weight": (False, True),
    "bias": (False, True),
    "scale": (False, True),
    "shift": (False, True),
    "silu": (False, True),
    # under autograd: the forward with statistics and the backward kernels (issue 20)
    "grad": (False, True),
}
# attention: every (T bucket, head-dim tile, dtype) cell of the tile table once, at the widest head
# dim of the tile's bucket but not a power of 2 (40 -> BLOCK_D 64, 96 -> 128), so that each arch's
# table entries are all compiled (for fp16 and bf16 alike). T = 16, 64, 256 (one per bucket) share
# their specialization (divisible by 16) and the cycled options depend on (head dim, dtype) alone,
# so cells whose table entries coincide compile once. Then odd sizes: T = 63 with head dim 8
# (BLOCK_D 16) per dtype.
ATTENTION_DTYPES = ("float32", "float16", "bfloat16")
ATTENTION_CELLS = (tuple((t, d, dtype) for t in (16, 64, 256) for d in (40, 96, 256) for dtype in ATTENTION_DTYPES)
                   + tuple((63, 8, dtype) for dtype in ATTENTION_DTYPES))
ATTENTION_CYCLED = {
    "layout": ("legacy", "new"),
    "strides": ("contiguous", "transposed"),
    "batch_heads": ((2, 1), (1, 3)),
}


def attention_rows() -> list[dict]:
    """ATTENTION_CELLS; with i the index of (head dim, dtype) among the cells' pairs, option k of
    ATTENTION_CYCLED at level (i >> k) & 1 (every pair of their levels meets within 4 pairs)."""
    pairs = sorted({(d, dtype) for _t, d, dtype in ATTENTION_CELLS}, key=lambda p: (p[0], ATTENTION_DTYPES.index(p[1])))
    rows = []
    for t, d, dtype in ATTENTION_CELLS:
        i = pairs.index((d, dtype))
        rows.append({"length": t, "head_dim": d, "dtype": dtype,
                     **{name: levels[(i >> k) & 1] for k, (name, levels) in enumerate(ATTENTION_CYCLED.items())}})
    return rows


STEP_FACTORS = {
    "dtype": ("float32", "float16", "bfloat16"),
    "model_dtype": ("same", "float32"),
    "layout": ("nchw", "channels_last"),
    "shape": ((2, 3, 8, 8), (1, 4, 5, 7), (3, 1, 17, 3)),
    "method": ("ddpm", "ddim"),
    "prediction": ("epsilon", "x0", "v"),
    "variance": ("fixed_small", "fixed_large", "learned_range", "learned"),
    "clip_denoised": (True, False),
    "noise_mode": ("normal", "squared", "zero"),
    "project_noise": (None, "pixel", "sample"),
    "clip": (None, (-1.0, 1.0)),
    "noise_source": ("drawn", "given", "none"),
    "guidance_grad": (False, True),
    "eps_from_x0": (True, False),
    "return_x0": (True, False),
}
SM_COUNTS = (108, 132)  # A100, H100/H200: the GroupNorm split count follows 4 x the SM count


# ---- record: run the public ops, intercept the launches ----------------------------------------------
TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64", "int32": "i32",
                "uint8": "u8", "bool": "i1", "float64": "fp64"}


def specialization(value) -> tuple[str, bool, object]:
    """(Triton type, divisible by 16, constexpr value) of a runtime argument, as Triton's JIT
    specializes it: tensors by dtype and 16-byte alignment, ints of value 1 become the constexpr 1,
    other ints i32 (i64 past 32 bits) noting divisibility by 16, floats fp32, None constexpr."""
    import torch

    if value is None:
        return "constexpr", False, None
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[str(value.dtype).removeprefix("torch.")], value.data_ptr() % 16 == 0, None
    if isinstance(value, bool):
        return "u1", False, None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False, 1
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0, None
    if isinstance(value, float):
        return "fp32", False, None
    raise TypeError(f"no Triton specialization for a launch argument of type {type(value).__name__}")


def encode_constexpr(value):
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"tl_dtype": str(value)}
    if isinstance(value, tl.constexpr):
        return encode_constexpr(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record constexpr value {value!r}")


def decode_constexpr(value):
    import triton.language as tl

    if isinstance(value, dict):
        return tl.dtype(value["tl_dtype"])
    return value


def is_constexpr_param(fn, name: str) -> bool:
    import inspect

    return "constexpr" in str(inspect.signature(fn).parameters[name].annotation)


def launch_spec(kernel, args: tuple, kwargs: dict, origin: str) -> dict:
    """A recorded launch as a compile job: {module, kernel, signature, constexprs, divisible,
    options, origin}."""
    fn = kernel.fn
    names = list(kernel.arg_names)
    bound = dict(zip(names, args))
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound.update(kwargs)
    signature, constexprs, divisible = {}, {}, []
    for name in names:
        value = bound[name]
        if is_constexpr_param(fn, name):
            signature[name] = "constexpr"
            constexprs[name] = encode_constexpr(value)
            continue
        kind, div16, const = specialization(value)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = const
        elif div16:
            divisible.append(name)
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature,
            "constexprs": constexprs, "divisible": divisible, "options": options, "origin": origin}


def _make_step_inputs(row: dict):
    import torch

    from ddpm_fast.step_layout import NUM_COEFS

    dtype = getattr(torch, row["dtype"])
    shape = row["shape"]
    b, c = shape[:2]
    gen = torch.Generator().manual_seed(0)
    mo_c = 2 * c if row["variance"] in ("learned_range", "learned") else c

    def tensor(channels, dt):
        t = torch.randn((b, channels, *shape[2:]), generator=gen).to(dt)
        return t.to(memory_format=torch.channels_last) if row["layout"] == "channels_last" else t

    x = tensor(c, dtype)
    mo = tensor(mo_c, dtype if row["model_dtype"] == "same" else torch.float32)
    coef = torch.rand((b, NUM_COEFS), generator=gen) + 0.5
    kwargs = dict(method=row["method"], prediction=row["prediction"], variance=row["variance"],
                  clip_denoised=row["clip_denoised"], noise_mode=row["noise_mode"],
                  project_noise=row["project_noise"], clip=row["clip"], eps_from_x0=row["eps_from_x0"],
                  return_x0=row["return_x0"], backend="triton")
    if row["guidance_grad"]:
        kwargs["guidance_grad"] = tensor(c, dtype)
    noise = None
    if row["noise_source"] == "given":
        noise = tensor(c, dtype)
    elif row["noise_source"] == "drawn":
        kwargs["seed"] = torch.arange(b, dtype=torch.int64) + 7
        kwargs["step"] = 3
    return x, mo, coef, noise, kwargs


def _run_matrix(record: list) -> None:
    """Every public op over its option matrix (launches intercepted by the caller)."""
    import torch

    from ddpm_fast import ops, philox
    from ddpm_fast.kernels import group_norm_scale_shift as gn_kernels

    for sm_count in SM_COUNTS:
        gn_kernels._target_programs = lambda device, sms=sm_count: 4 * sms
        for row in pairwise(GN_FACTORS):
            record.append(f"group_norm_scale_shift {row}")
            shape = row["shape"]
            n, c = shape[:2]
            x = torch.randn(shape).to(getattr(torch, row["dtype"]))
            if row["layout"] == "channels_last":
                fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
                x = x.to(memory_format=fmt) if fmt else x.transpose(1, -1).contiguous().transpose(1, -1)
            groups = 1 if row["groups"] == "one" else max(1, c // 4)
            params = {k: (torch.randn(c) if k in ("weight", "bias") else torch.randn(n, c))
                      for k in ("weight", "bias", "scale", "shift") if row[k]}
            if row["grad"]:
                for t in (x, *params.values()):
                    t.requires_grad_()
            y = ops.group_norm_scale_shift(x, groups, **params, silu=row["silu"], backend="triton")
            if row["grad"]:
                y.backward(torch.ones_like(y))
    for row in attention_rows():
        record.append(f"attention {row}")
        batch, heads = row["batch_heads"]
        width, t = 3 * heads * row["head_dim"], row["length"]
        qkv = torch.randn(batch, width, t).to(getattr(torch, row["dtype"]))
        if row["strides"] == "transposed":  # (B, T, 3C) memory read as (B, 3C, T)
            qkv = qkv.transpose(1, 2).contiguous().transpose(1, 2)
        ops.attention(qkv, heads, row["layout"], backend="triton")
        # under autograd: the forward that saves lse, then the backward kernels (issue 20)
        out = ops.attention(qkv.requires_grad_(), heads, row["layout"], backend="triton")
        out.backward(torch.ones_like(out))
    for row in pairwise(STEP_FACTORS):
        record.append(f"diffusion_step {row}")
        x, mo, coef, noise, kwargs = _make_step_inputs(row)
        ops.diffusion_step(x, mo, coef, noise, **kwargs)
        # under autograd: the backward kernels (issue 20), every pass of the sample projection
        x_prev, x0 = ops.diffusion_step(x.requires_grad_(), mo.requires_grad_(), coef, noise, **kwargs)
        (x_prev.sum() + (x0.sum() if x0 is not None else 0)).backward()
    for shape in ((3, 8, 8), (1, 5, 7)):
        record.append(f"initial_noise {shape}")
        philox.initial_noise(torch.arange(2, dtype=torch.int64), shape, backend="triton")


def _gpu_attention_specs(spec: dict, t: int, head_dim: int, backward: bool = False) -> list[dict]:
    """The interpreter's attention launch `spec` as each arch's GPU launch (tile from the table;
    the backward kernels' from kernels.attention_backward.backward_tile)."""
    import torch

    from ddpm_fast.kernels import attention as att
    from ddpm_fast.kernels import attention_backward as att_bwd

    dtype = {"*fp32": torch.float32, "*fp16": torch.float16, "*bf16": torch.bfloat16}[spec["signature"]["qkv"]]
    out = []
    for cap in ARCHS:
        tile = att_bwd.backward_tile(head_dim, dtype) if backward else att.tile_config(cap, t, head_dim, dtype)
        constexprs = dict(spec["constexprs"])
        constexprs.update({k: encode_constexpr(v) for k, v in att.dot_constexprs(dtype, head_dim, False).items()})
        constexprs.update(BLOCK_M=tile["BLOCK_M"], BLOCK_N=tile["BLOCK_N"])
        out.append({**spec, "constexprs": constexprs, "archs": [cap],
                    "options": {"num_warps": tile["num_warps"], "num_stages": tile["num_stages"]}})
    return out


def record_main(out_path: str) -> None:
    """Subprocess 1 (TRITON_INTERPRET=1): writes the distinct compile jobs as JSON."""
    from triton.runtime.interpreter import InterpretedFunction

    origins: list[str] = []
    launches: list[dict] = []
    launch_args: list[tuple] = []

    def recording_run(self, *args, grid, warmup, **kwargs):
        spec = launch_spec(self, args, dict(kwargs), origins[-1] if origins else "?")
        launches.append(spec)
        launch_args.append(dict(zip(self.arg_names, args)))
        return None  # the launch itself is skipped

    InterpretedFunction.run = recording_run
    _run_matrix(origins)
    specs = []
    for spec, args in zip(launches, launch_args):
        if spec["kernel"] in ("_attention_fwd", "_attention_fwd_lse", "_attention_bwd_dkdv", "_attention_bwd_dq"):
            specs.extend(_gpu_attention_specs(spec, args["T"], args["HEAD_DIM"], "_bwd_" in spec["kernel"]))
        else:
            specs.append({**spec, "archs": list(ARCHS)})
    jobs, seen = [], set()
    for spec in specs:
        for arch in spec["archs"]:
            job = {**spec, "arch": arch}
            del job["archs"]
            key = json.dumps({k: v for k, v in job.items() if k != "origin"}, sort_keys=True)
            if key not in seen:
                seen.add(key)
                jobs.append(job)
    Path(out_path).write_text(json.dumps({"jobs": jobs, "calls": len(origins), "launches": len(launches)}))


# ---- compile ------------------------------------------------------------------------------------------
def nvidia_tool(name: str) -> str | None:
    """ptxas / cuobjdump: the copy shipped with triton, else one on PATH."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(tool) if tool.exists() else shutil.which(name)


_FUNCTION = re.compile(r"Function (\S+):\s*\n\s*(.*)")
_ARCH = re.compile(r"arch = (sm_\d+)")


def resource_usage(path: str) -> list[dict]:
    """[{arch, function, REG, STACK, SHARED, LOCAL}] of every device function in an object file,
    from `cuobjdump --dump-resource-usage` (raises with its message when it fails)."""
    proc = subprocess.run([nvidia_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"cuobjdump --dump-resource-usage {path}: {proc.stderr.strip() or proc.stdout.strip()}")
    arch_at = [(m.start(), m.group(1)) for m in _ARCH.finditer(proc.stdout)]
    rows = []
    for m in _FUNCTION.finditer(proc.stdout):
        arch = next((a for pos, a in reversed(arch_at) if pos < m.start()), None)
        fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", m.group(2)))
        rows.append({"arch": arch, "function": m.group(1),
                     **{k: int(fields.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")}})
    return rows


_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> dict | None:
    """{regs, stack, spill_stores, spill_loads} from a `ptxas -v` log, None if it has none."""
    stack, regs = _PTXAS_STACK.search(log), _PTXAS_REGS.search(log)
    if not (stack and regs):
        return None
    return {"regs": int(regs.group(1)), "stack": int(stack.group(1)), "spill_stores": int(stack.group(2)),
            "spill_loads": int(stack.group(3))}


def ptxas_usage(ptx: str, arch: int, scratch: Path) -> dict:
    """ptxas -v's report on Triton's PTX, ptxas run with the flags Triton's make_cubin passes (for
    a kernel Triton's cache returned, whose log was never printed)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    src = scratch / f"{os.getpid()}.ptx"
    src.write_text(ptx)
    for extra in (["--regAllocOptLevel=2"], []):  # Triton 3.8's flag; an older ptxas may not know it
        proc = subprocess.run([nvidia_tool("ptxas"), "-lineinfo", "-v", *extra,
                               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(src) + ".o"],
                              capture_output=True, text=True)
        usage = parse_ptxas_log(proc.stderr + proc.stdout)
        if usage is not None:
            break
    if proc.returncode or usage is None:
        raise RuntimeError(f"ptxas -v: {proc.stderr.strip()}")
    return usage


def _load_kernel(module: str, name: str):
    if module.endswith(".py"):  # a kernel file outside the package (the planted test kernel)
        spec = importlib.util.spec_from_file_location(Path(module).stem, module)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return getattr(mod, name)
    return getattr(importlib.import_module(module), name)


def compile_job(job: dict, scratch: Path) -> dict:
    """Compile one job for its arch; {regs, stack, local, shared, error}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _load_kernel(job["module"], job["kernel"])
    names = list(fn.arg_names)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in job["divisible"]}
    constexprs = {n: decode_constexpr(v) for n, v in job["constexprs"].items()}
    start = time.perf_counter()
    log = io.StringIO()  # Triton prints ptxas -v's log under TRITON_DUMP_PTXAS_LOG=1 (see compile_main)
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn=fn, signature=job["signature"], constexprs=constexprs,
                                                attrs=attrs),
                                      target=GPUTarget("cuda", job["arch"], 32), options=dict(job["options"]))
    except Exception as exc:  # the failure is the result: reported, and failed by the test
        return {"error": f"{type(exc).__name__}: {exc}"}
    usage = parse_ptxas_log(log.getvalue()) or ptxas_usage(compiled.asm["ptx"], job["arch"], scratch)
    return {"error": None, **usage, "shared": int(compiled.metadata.shared),
            "seconds": round(time.perf_counter() - start, 2)}


def compile_main(jobs_path: str, out_path: str) -> None:
    """Subprocess 2 (no TRITON_INTERPRET): compiles the jobs of a JSON list, writes the results."""
    import tempfile

    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    jobs = json.loads(Path(jobs_path).read_text())
    with tempfile.TemporaryDirectory() as scratch:
        results = [{**job, **compile_job(job, Path(scratch))} for job in jobs]
    Path(out_path).write_text(json.dumps(results))


# ---- the test process side -------------------------------------------------------------------------
def _env(interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    return env


def _run_self(args: list[str], interpret: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], env=_env(interpret), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, what: str) -> None:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    if proc.returncode:
        raise AssertionError(f"{what} failed (exit {proc.returncode}):\n{out[-6000:]}")


def compile_jobs(jobs: list[dict], tmp: Path) -> list[dict]:
    """Compile `jobs` in WORKERS subprocesses; the results in job order."""
    shards = [jobs[i::WORKERS] for i in range(WORKERS)]
    procs = []
    for i, shard in enumerate(shards):
        (tmp / f"jobs{i}.json").write_text(json.dumps(shard))
        procs.append(_run_self(["compile", str(tmp / f"jobs{i}.json"), str(tmp / f"out{i}.json")], False))
    for proc in procs:
        _wait(proc, "the compile subprocess")
    results = [json.loads((tmp / f"out{i}.json").read_text()) for i in range(WORKERS)]
    ordered = []
    for k in range(len(jobs)):
        ordered.append(results[k % WORKERS][k // WORKERS])
    return ordered


def failures(results: list[dict]) -> list[str]:
    """What the test reports: compile errors, spills beyond SPILL_BUDGET, shared memory beyond the arch."""
    bad = []
    for r in results:
        where = f"{r['kernel']} sm_{r['arch']} ({r['origin']})"
        if r["error"]:
            bad.append(f"{where}: compile error: {r['error'][:1500]}")
        elif max(r["spill_stores"], r["spill_loads"]) > SPILL_BUDGET:
            bad.append(f"{where}: register spills: {r['spill_stores']} B stored, {r['spill_loads']} B "
                       f"loaded (budget {SPILL_BUDGET} B), {r['regs']} registers")
        elif r["shared"] > SHARED_LIMIT[r["arch"]]:
            bad.append(f"{where}: {r['shared']} B of shared memory (sm_{r['arch']} family: "
                       f"{SHARED_LIMIT[r['arch']]} B per block)")
    return bad


def _print_table(results: list[dict]) -> None:
    print(f"\n{'kernel':<18} {'arch':<6} {'warps':>5} {'regs':>5} {'spill':>5} {'shared':>7} {'sec':>5}  constexprs")
    for r in sorted(results, key=lambda r: (r["kernel"], r["arch"], -(r.get("regs") or 0))):
        ce = {k: v for k, v in r["constexprs"].items() if v not in (None, False)}
        if r["error"]:
            print(f"{r['kernel']:<18} sm_{r['arch']:<3} ERROR {r['error'][:100]}")
            continue
        print(f"{r['kernel']:<18} sm_{r['arch']:<3} {r['options'].get('num_warps', 4):>5} {r['regs']:>5} "
              f"{r['spill_stores']:>5} {r['shared']:>7} {r['seconds']:>5.1f}  {json.dumps(ce, sort_keys=True)[:150]}")


def untried_table_entries(jobs: list[dict]) -> list:
    """The TILE_TABLE entries (each with fp16 and bf16 for a 16-bit entry) no attention job compiles."""
    from ddpm_fast.kernels.attention import TILE_TABLE

    tried = {(j["arch"], j["constexprs"]["BLOCK_D"], j["signature"]["qkv"], j["constexprs"]["BLOCK_M"],
              j["constexprs"]["BLOCK_N"], j["options"]["num_warps"], j["options"]["num_stages"])
             for j in jobs if j["kernel"] == "_attention_fwd"}
    dtypes = {"32": ("*fp32",), "16": ("*fp16", "*bf16")}
    return [(key, dtype) for key, tile in TILE_TABLE.items() for dtype in dtypes[key[3]]
            if (key[0], key[2], dtype, *tile) not in tried]


needs_ptxas = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or not (Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia").is_dir(),
    reason="triton with its NVIDIA backend (ptxas, cuobjdump) is not installed")


@needs_ptxas
def test_pairwise_covers_every_pair():
    rows = pairwise(STEP_FACTORS)
    for a, b in itertools.combinations(STEP_FACTORS, 2):
        seen = {(r[a], r[b]) for r in rows}
        assert seen == set(itertools.product(STEP_FACTORS[a], STEP_FACTORS[b])), (a, b)
    assert len(rows) < 40  # a covering array, not the product


@needs_ptxas
def test_triton_kernels_compile_for_sm80_and_sm90(tmp_path):
    _wait(_run_self(["record", str(tmp_path / "jobs.json")], True), "the record subprocess")
    recorded = json.loads((tmp_path / "jobs.json").read_text())
    jobs = recorded["jobs"]
    kernels = {j["kernel"] for j in jobs}
    # every kernel the launchers can run was reached by the matrix
    assert kernels == {"_fused_kernel", "_moments_kernel", "_apply_kernel", "_attention_fwd", "_attention_fwd_lse",
                       "_attention_bwd_delta", "_attention_bwd_dkdv", "_attention_bwd_dq", "_step_kernel",
                       "_pixel_kernel", "_backward_kernel", "_pixel_backward_kernel", "_gn_backward_sums_kernel",
                       "_gn_backward_dx_kernel"}, kernels
    assert untried_table_entries(jobs) == []
    results = compile_jobs(jobs, tmp_path)
    print(f"\n{recorded['calls']} op calls, {recorded['launches']} launches -> {len(jobs)} distinct "
          "(kernel, specialization, arch) compiles")
    _print_table(results)
    bad = failures(results)
    assert not bad, f"{len(bad)} of {len(results)} compiles fail:\n" + "\n".join(bad[:20])


PLANTED = '''
import triton
import triton.language as tl

SCALE{annotation} = {value}


@triton.jit
def planted(x_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * SCALE, mask=i < n)
'''


@needs_ptxas
def test_catches_constexpr_global_form(tmp_path):
    """A kernel with a `NAME: tl.constexpr = v` global (the form the interpreter accepts and the
    code generator rejects) is reported as a compile error; the `tl.constexpr(v)` form is not."""
    jobs = []
    for label, annotation, value in (("annotated", ": tl.constexpr", "3"), ("instance", "", "tl.constexpr(3)")):
        path = tmp_path / f"planted_{label}.py"
        path.write_text(PLANTED.format(annotation=annotation, value=value))
        jobs.append({"module": str(path), "kernel": "planted", "arch": 90, "options": {},
                     "signature": {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                     "constexprs": {"BLOCK": 128}, "divisible": ["x_ptr"], "origin": label})
    annotated, instance = compile_jobs(jobs, tmp_path)
    bad = failures([annotated, instance])
    assert len(bad) == 1 and "compile error" in bad[0] and "SCALE" in bad[0], bad
    assert instance["error"] is None and instance["regs"] > 0


# ---- CUDA C++ objects ---------------------------------------------------------------------------------
def _extension_path() -> Path | None:
    spec = importlib.util.find_spec("ddpm_fast._C")
    return Path(spec.origin) if spec and spec.origin else None


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


@needs_ptxas
def test_cuda_objects_have_no_spills_and_fit_shared_memory():
    path = _extension_path()
    if path is None:
        pytest.skip("ddpm_fast._C is not built")
    try:
        rows = resource_usage(str(path))
    except RuntimeError as exc:
        if "does not contain device code" in str(exc) or "no device code" in str(exc).lower():
            pytest.skip(f"ddpm_fast._C was built without CUDA ({exc})")
        raise
    if not rows:
        pytest.skip("ddpm_fast._C has no CUDA device functions (built without CUDA)")
    names = _demangle([r["function"] for r in rows])
    print(f"\n{'arch':<6} {'regs':>4} {'stack':>5} {'local':>5} {'shared':>6}  function ({path.name})")
    bad = []
    for r, name in sorted(zip(rows, names), key=lambda p: (p[0]["arch"] or "", p[1])):
        print(f"{r['arch']:<6} {r['REG']:>4} {r['STACK']:>5} {r['LOCAL']:>5} {r['SHARED']:>6}  {name[:110]}")
        if r["STACK"] > CUDA_STACK_BUDGET or r["LOCAL"] > CUDA_STACK_BUDGET:
            bad.append(f"{r['arch']} {name}: stack frame {r['STACK']} B, local {r['LOCAL']} B (spills or local "
                       f"arrays; budget {CUDA_STACK_BUDGET} B)")
        if r["SHARED"] > CUDA_STATIC_SHARED_LIMIT:
            bad.append(f"{r['arch']} {name}: {r['SHARED']} B static shared memory "
                       f"(at most {CUDA_STATIC_SHARED_LIMIT} B per block)")
    assert not bad, "\n".join(bad)


if __name__ == "__main__":
    if sys.argv[1] == "record":
        record_main(sys.argv[2])
    elif sys.argv[1] == "compile":
        compile_main(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} record OUT.json | compile JOBS.json OUT.json")
