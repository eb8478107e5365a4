"""`make gpu-check`: the GPU acceptance run, one command from a fresh clone on a CUDA machine.

It uses the python and torch that are there (no venv, no download) and runs these phases, each
with a time budget (seconds, on an H100/H200-class GPU with 16 cores; 480 = 8 minutes in all),
a hard limit of budget x --slack, and its measured time printed:

  build      210  pip install --no-build-isolation --no-deps --no-index -e . for the local GPU's
                  arch only (TORCH_CUDA_ARCH_LIST from its compute capability), MAX_JOBS = cores
  tests       90  pytest -m cuda tests/ with a per-test timeout (pytest-timeout): JUnit XML
  bench       80  the GPU benchmarks (`pytest -m cuda benchmarks/`) through ddpm_fast.benchreport:
                  JSON + markdown, the 0.8x speed gate with its noise margin, the kernels' issue
                  targets reported; copied to benchmarks/results/<gpu>-<date>.{json,md}
  sanitizer   40  compute-sanitizer memcheck, then racecheck, over one small run of each CUDA C++
                  and Triton kernel (benchmarks/gpu_workloads.py kernels); skipped with a note when
                  the time left is short or the sanitizer refuses the device
  e2e         30  the bundled digits model: whole-loop CUDA graph == eager (same seed), and its
                  eval_digits quality against the CPU figures (benchmarks/gpu_workloads.py e2e)
  targets     30  issue 17's kernel targets (benchmarks/gpu_workloads.py attention, bandwidth):
                  the tensor-core attention vs SDPA's flash backend, GroupNorm's share of peak
                  HBM bandwidth, the step vs a copy of the same bytes; met / MISSED reported,
                  not gated; optional (skipped when the total budget is spent)

The budgets are estimates made without a GPU. build: the six .cu files take 40-85 s each for two
archs on the 2-core CI machine (the step's took 4-8 minutes until their passes and storage dtypes
became run-time kernel parameters), well within the phase's budget on a 16-core GPU host. tests and bench: the
count of `cuda` tests and benchmarks and their sizes (Triton's JIT compiles dominate the tests;
the ADM-64 sample benchmarks time 10 steps, not 250). The first GPU run's summary gives the
real times.

Everything lands under $DDPM_FAST_GPU_CHECK_DIR (default build/gpu-check/), flat, so a copy of
the folder keeps it: summary.json (pass/fail per point, versions, GPU, times), summary.md,
junit.xml, <gpu>-<date>.json/.md (benchmarks), sanitizer.txt, log.txt. Exit status 1 when any
phase fails, after the results are written. Without a GPU (or without torch) it says so, runs its
dry run (the plan, the writers) and exits 0.

    make gpu-check                              # what a GPU session types
    python3 benchmarks/gpu_check.py --dry-run   # the plan only
    python3 benchmarks/gpu_check.py --skip sanitizer --out-dir /tmp/out
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "build" / "gpu-check"
TOTAL_BUDGET_S = 480
MIN_SPEEDUP = 0.8          # the speed gate: every fused path >= 0.8x its reference, same run
TEST_TIMEOUT_S = 90        # pytest-timeout, per test
BENCH_TIMEOUT_S = 120      # pytest-timeout, per benchmark


# ---- plan -----------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What a phase found: status "pass", "fail" or "skip", one line of detail, and data for
    the summary."""

    status: str
    detail: str = ""
    data: dict = field(default_factory=dict)


@dataclass
class Phase:
    """One step of the run: `run(ctx) -> Outcome` within `budget_s` (killed at budget_s x slack).
    `needs`: phases that must have passed first (else skipped); `optional`: skipped, not run,
    when less than its budget is left of the total."""

    name: str
    budget_s: int
    what: str
    run: Callable[["Context"], Outcome]
    commands: Callable[["Context"], list[list[str]]] = lambda ctx: []
    needs: tuple[str, ...] = ()
    optional: bool = False


@dataclass
class Context:
    """Where and with what the phases run."""

    out: Path
    python: str = sys.executable
    jobs: int = os.cpu_count() or 1
    arch: str | None = None      # TORCH_CUDA_ARCH_LIST for the build, e.g. "9.0"
    gpu: str | None = None
    slack: float = 1.5
    log: Path | None = None

    def limit(self, phase: Phase) -> float:
        return phase.budget_s * self.slack

    def run(self, cmd: list[str], timeout: float, env: dict | None = None,
            cwd: Path = ROOT) -> tuple[int | None, str]:
        """Run cmd, its output echoed and appended to the log; (exit code, or None when it ran
        past `timeout` and was killed with its children; the output's last 8000 characters)."""
        print("$ " + " ".join(cmd), flush=True)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        chunks: list[bytes] = []
        timed_out = False
        with open(self.log, "ab") if self.log else open(os.devnull, "wb") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    _kill_group(proc)
                    break
                if not sel.select(timeout=min(left, 1.0)):
                    continue
                data = os.read(proc.stdout.fileno(), 65536)
                if not data:
                    break
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
                log.write(data)
                chunks.append(data)
                if len(chunks) > 64:
                    chunks = [b"".join(chunks)[-8000:]]
            proc.wait()
            proc.stdout.close()
        text = b"".join(chunks)[-8000:].decode(errors="replace")
        return (None if timed_out else proc.returncode), text


def _kill_group(proc: subprocess.Popen) -> None:
    """End a phase's process and its children (it was started in its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def arch_list(capability: tuple[int, int]) -> str:
    """TORCH_CUDA_ARCH_LIST for one GPU: (9, 0) -> "9.0"."""
    major, minor = capability
    if major < 1 or minor < 0:
        raise ValueError(f"capability must be (major >= 1, minor >= 0); got {capability!r}")
    return f"{major}.{minor}"


def build_commands(ctx: Context) -> list[list[str]]:
    return [[ctx.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
             "-e", "."]]


def build(ctx: Context) -> Outcome:
    env = {"MAX_JOBS": str(ctx.jobs), "TORCH_CUDA_ARCH_LIST": ctx.arch or ""}
    rc, tail = ctx.run(build_commands(ctx)[0], ctx.limit(PHASES["build"]), env)
    if rc != 0:
        return Outcome("fail", _why(rc, "the build"), {"tail": tail})
    rc, out = ctx.run([ctx.python, "-c", "import ddpm_fast, ddpm_fast._C as c; "
                       "print('cuda_compiled', c.cuda_compiled(), c.cuda_archs())"], 60)
    ok = rc == 0 and "cuda_compiled True" in out
    return Outcome("pass" if ok else "fail",
                   f"TORCH_CUDA_ARCH_LIST={ctx.arch}, MAX_JOBS={ctx.jobs}" if ok else
                   "the built extension does not import with its CUDA kernels", {"check": out[-400:]})


def pytest_timeout_args(ctx: Context, seconds: int) -> list[str]:
    """Per-test timeout through pytest-timeout when `ctx.python` has it (else none: noted)."""
    found = subprocess.run([ctx.python, "-c", "import pytest_timeout"], capture_output=True).returncode == 0
    return [f"--timeout={seconds}"] if found else []


_IMPORT_PROBE = r"""
import ast, importlib.util, json, sys
from pathlib import Path
local = {"conftest", "ddpm_fast", "kernels"}
out = {}
for path in sorted(Path(sys.argv[1]).glob("test_*.py")):
    names = set()
    for node in ast.parse(path.read_text()).body:   # module-level imports only
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    missing = sorted(n for n in names if n not in local and not n.startswith("test_")
                     and importlib.util.find_spec(n) is None)
    if missing:
        out[str(path)] = missing
print(json.dumps(out))
"""


def uncollectable(python: str, test_dir: Path = ROOT / "tests") -> dict[str, list[str]]:
    """Test modules that `python` cannot import for want of a third-party module (e.g. diffusers,
    a test extra the GPU image lacks): {path: [missing modules]}. Left out of the GPU test run
    (with a note) rather than failing its collection."""
    res = subprocess.run([python, "-c", _IMPORT_PROBE, str(Path(test_dir).resolve())], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    return json.loads(res.stdout) if res.returncode == 0 else {}


def tests_commands(ctx: Context, timeout_args: list[str] | None = None,
                   ignored: dict[str, list[str]] | None = None) -> list[list[str]]:
    targs = [f"--timeout={TEST_TIMEOUT_S}"] if timeout_args is None else timeout_args
    return [[ctx.python, "-m", "pytest", "tests", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider",
             f"--junitxml={ctx.out / 'junit.xml'}", "-o", "junit_family=xunit2", *targs,
             *(f"--ignore={path}" for path in (ignored or {}))]]


def tests(ctx: Context) -> Outcome:
    targs = pytest_timeout_args(ctx, TEST_TIMEOUT_S)
    ignored = uncollectable(ctx.python)
    rc, tail = ctx.run(tests_commands(ctx, targs, ignored)[0], ctx.limit(PHASES["tests"]))
    counts = junit_counts(ctx.out / "junit.xml")
    note = "" if targs else " (pytest-timeout missing: no per-test timeout)"
    note += "".join(f"; not collected: {path} (needs {', '.join(mods)})" for path, mods in ignored.items())
    ok = rc == 0 and counts.get("tests", 0) > counts.get("skipped", 0)
    detail = (_why(rc, "pytest") + "; " if rc != 0 else "") + (
        "{tests} cuda tests: {failures} failed, {errors} errors, {skipped} skipped".format(**counts)
        if counts else "no JUnit XML") + note
    return Outcome("pass" if ok else "fail", detail, {"junit": counts, "not_collected": ignored,
                                                      "tail": tail if not ok else ""})


def junit_counts(path: Path) -> dict:
    """{tests, failures, errors, skipped} summed over a JUnit XML file's test suites ({} if none)."""
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def bench_commands(ctx: Context, timeout_args: list[str] | None = None) -> list[list[str]]:
    targs = [f"--timeout={BENCH_TIMEOUT_S}"] if timeout_args is None else timeout_args
    return [[ctx.python, "-m", "ddpm_fast.benchreport", "run", "--out-dir", str(ctx.out),
             "--min-speedup", str(MIN_SPEEDUP), "--", "-m", "cuda", *targs]]


def bench(ctx: Context) -> Outcome:
    started = time.time()
    rc, tail = ctx.run(bench_commands(ctx, pytest_timeout_args(ctx, BENCH_TIMEOUT_S))[0],
                       ctx.limit(PHASES["bench"]))
    written = sorted(p for p in ctx.out.glob("*.json") if p.stat().st_mtime >= started - 1)
    results = ROOT / "benchmarks" / "results"
    for path in written + [p.with_suffix(".md") for p in written if p.with_suffix(".md").exists()]:
        shutil.copy2(path, results / path.name)
    targets = [line for line in tail.splitlines() if line.startswith(("- met:", "- MISSED:"))]
    gate = "speed gate passed" in tail
    detail = (f"speed gate passed ({MIN_SPEEDUP}x)" if rc == 0 and gate else
              _why(rc, "the benchmarks / speed gate"))
    return Outcome("pass" if rc == 0 and gate else "fail", detail,
                   {"files": [p.name for p in written], "targets": targets,
                    "tail": "" if rc == 0 else tail})


SANITIZER_TOOLS = ("memcheck", "racecheck")


def sanitizer_binary() -> str | None:
    return shutil.which("compute-sanitizer") or next(
        (str(p) for p in (Path("/usr/local/cuda/bin/compute-sanitizer"),) if p.exists()), None)


def sanitizer_commands(ctx: Context) -> list[list[str]]:
    binary = sanitizer_binary() or "compute-sanitizer"
    return [[binary, "--tool", tool, "--error-exitcode", "86", "--print-limit", "20", ctx.python,
             str(ROOT / "benchmarks" / "gpu_workloads.py"), "kernels"] for tool in SANITIZER_TOOLS]


def sanitizer_verdict(tool: str, rc: int | None, output: str) -> Outcome:
    """Read one compute-sanitizer run: a refused device or a run past its share of the budget is a
    skip with a note; reported errors or hazards, or a failing workload, fail."""
    if re.search(r"Device not supported|Unable to find injection library|"
                 r"error 999|Target application returned an error: 999|"
                 r"LibraryNotLoaded|not supported on this platform", output):
        return Outcome("skip", f"{tool}: the sanitizer refused this device/runtime")
    if rc is None:
        return Outcome("skip", f"{tool}: stopped at its share of the time budget")
    m = re.search(r"ERROR SUMMARY: (\d+) error", output)
    hazards = re.search(r"RACECHECK SUMMARY: (\d+) hazard", output)
    errors = int(m.group(1)) if m else 0
    errors += int(hazards.group(1)) if hazards else 0
    if errors or rc == 86:
        return Outcome("fail", f"{tool}: {errors} error(s) reported")
    if rc != 0:
        return Outcome("fail", f"{tool}: the workload failed under the sanitizer (exit {rc})")
    if not (m or hazards):
        return Outcome("fail", f"{tool}: no sanitizer summary in its output")
    return Outcome("pass", f"{tool}: 0 errors")


def sanitizer(ctx: Context) -> Outcome:
    if sanitizer_binary() is None:
        return Outcome("skip", "compute-sanitizer not found")
    limit = ctx.limit(PHASES["sanitizer"])
    share = {"memcheck": 0.6, "racecheck": 0.4}
    env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}   # every allocation its own: out-of-bounds show
    verdicts = []
    text = []
    for cmd, tool in zip(sanitizer_commands(ctx), SANITIZER_TOOLS):
        rc, out = ctx.run(cmd, limit * share[tool], env)
        text.append(f"==== {tool} (exit {rc})\n{out}")
        verdicts.append(sanitizer_verdict(tool, rc, out))
        if verdicts[-1].detail.endswith("refused this device/runtime"):
            break
    (ctx.out / "sanitizer.txt").write_text("\n".join(text))
    status = ("fail" if any(v.status == "fail" for v in verdicts) else
              "pass" if all(v.status == "pass" for v in verdicts) else "skip")
    return Outcome(status, "; ".join(v.detail for v in verdicts))


# The CPU figures of README.md ("The bundled model and sample quality"): setting ->
# (accuracy, confidence, diversity) over 1000 samples, seed 0, and the agreement required on a GPU.
CPU_QUALITY = {"ddpm:250": (0.999, 0.927, 0.953), "ddim:50": (0.989, 0.918, 0.997)}
QUALITY_TOLERANCE = {"accuracy": 0.01, "confidence": 0.02, "diversity": 0.03}


def quality_verdicts(measured: dict[str, dict]) -> list[str]:
    """Failures of measured eval_digits figures ({setting: {accuracy, confidence, diversity}})
    against CPU_QUALITY: accuracy may not drop by more than its tolerance, confidence and
    diversity must agree within theirs. [] when all agree; a missing setting is a failure."""
    failures = []
    for setting, expected in CPU_QUALITY.items():
        got = measured.get(setting)
        if got is None:
            failures.append(f"{setting}: not measured")
            continue
        for key, want in zip(("accuracy", "confidence", "diversity"), expected):
            tol = QUALITY_TOLERANCE[key]
            bad = got[key] < want - tol if key == "accuracy" else abs(got[key] - want) > tol
            if bad:
                failures.append(f"{setting}: {key} {got[key]:.3f} vs {want:.3f} on the CPU (tolerance {tol})")
    return failures


def e2e_commands(ctx: Context) -> list[list[str]]:
    return [[ctx.python, str(ROOT / "benchmarks" / "gpu_workloads.py"), "e2e",
             "--json", str(ctx.out / "e2e.json"), "--settings", ",".join(CPU_QUALITY)]]


def e2e(ctx: Context) -> Outcome:
    rc, tail = ctx.run(e2e_commands(ctx)[0], ctx.limit(PHASES["e2e"]))
    path = ctx.out / "e2e.json"
    if rc != 0 or not path.exists():
        return Outcome("fail", _why(rc, "the end-to-end checks"), {"tail": tail})
    data = json.loads(path.read_text())
    path.unlink()   # folded into summary.json
    failures = [] if data["graph_equals_eager"] else [
        f"graph != eager (max |diff| {data['graph_max_abs_diff']:.3g})"]
    failures += quality_verdicts(data["quality"])
    return Outcome("fail" if failures else "pass", "; ".join(failures) or
                   "graph == eager; quality matches the CPU figures", data)


TARGET_WORKLOADS = ("attention", "bandwidth")   # benchmarks/gpu_workloads.py subcommands


def targets_commands(ctx: Context) -> list[list[str]]:
    return [[ctx.python, str(ROOT / "benchmarks" / "gpu_workloads.py"), name, "--json", str(ctx.out / f"{name}.json")]
            for name in TARGET_WORKLOADS]


def targets(ctx: Context) -> Outcome:
    """Issue 17's kernel targets, each workload in its share of the phase's time: reported
    (met / MISSED per target), not gated; a workload that fails or leaves no JSON fails the phase."""
    commands = targets_commands(ctx)
    data, met, failed = {}, [], []
    for name, cmd in zip(TARGET_WORKLOADS, commands):
        rc, tail = ctx.run(cmd, ctx.limit(PHASES["targets"]) / len(commands))
        path = ctx.out / f"{name}.json"
        if rc != 0 or not path.exists():
            failed.append(_why(rc, f"gpu_workloads.py {name}"))
            data[name] = {"tail": tail}
            continue
        data[name] = json.loads(path.read_text())
        path.unlink()   # folded into summary.json
        met += [f"{t['verdict']}: {t['what']} = {t['value']:.3g}" for t in data[name]["targets"]]
    if failed:
        return Outcome("fail", "; ".join(failed), data)
    return Outcome("pass", "; ".join(met), data)


def _why(rc: int | None, what: str) -> str:
    return f"{what} ran past its time limit" if rc is None else f"{what} exited {rc}"


PHASES = {p.name: p for p in [
    Phase("build", 210, "build for the local GPU's arch with the python/torch that are here",
          build, build_commands),
    Phase("tests", 90, "pytest -m cuda (per-test timeout), JUnit XML", tests, tests_commands,
          needs=("build",)),
    Phase("bench", 80, "GPU benchmarks, speed gate, issue targets", bench, bench_commands,
          needs=("build",)),
    Phase("sanitizer", 40, "compute-sanitizer memcheck + racecheck over each kernel", sanitizer,
          sanitizer_commands, needs=("build",), optional=True),
    Phase("e2e", 30, "digits: graph == eager, quality vs the CPU figures", e2e, e2e_commands,
          needs=("build",)),
    Phase("targets", 30, "issue 17 kernel targets: attention vs SDPA flash, bandwidth (reported)", targets,
          targets_commands, needs=("build",), optional=True),
]}


# ---- running ---------------------------------------------------------------------------------

def run_phases(phases: list[Phase], ctx: Context, total_budget_s: float = TOTAL_BUDGET_S) -> list[dict]:
    """Run the phases in order; one record per phase {name, status, detail, seconds, budget_s,
    data}. A phase whose `needs` did not pass is skipped; an optional one is skipped when less
    than its budget is left of total_budget_s x slack; an exception in a phase is its failure."""
    records: dict[str, dict] = {}
    start = time.monotonic()
    for phase in phases:
        missing = [n for n in phase.needs if records.get(n, {}).get("status") != "pass"]
        left = total_budget_s * ctx.slack - (time.monotonic() - start)
        t0 = time.monotonic()
        if missing:
            outcome = Outcome("skip", f"needs {', '.join(missing)}")
        elif phase.optional and left < phase.budget_s:
            outcome = Outcome("skip", f"{left:.0f} s left of the total budget, it needs {phase.budget_s} s")
        else:
            print(f"\n[gpu-check] ---- {phase.name} (budget {phase.budget_s} s): {phase.what}", flush=True)
            try:
                outcome = phase.run(ctx)
            except Exception as exc:  # a broken phase is reported, and the others still run
                outcome = Outcome("fail", f"{type(exc).__name__}: {exc}",
                                  {"traceback": traceback.format_exc()[-2000:]})
        seconds = time.monotonic() - t0
        over = " OVER BUDGET" if seconds > phase.budget_s else ""
        print(f"[gpu-check] {phase.name}: {outcome.status} in {seconds:.0f} s "
              f"(budget {phase.budget_s} s){over}: {outcome.detail}", flush=True)
        records[phase.name] = {"name": phase.name, "status": outcome.status, "detail": outcome.detail,
                               "seconds": round(seconds, 1), "budget_s": phase.budget_s,
                               "data": outcome.data}
    return list(records.values())


def exit_code(records: list[dict]) -> int:
    return 1 if any(r["status"] == "fail" for r in records) else 0


def versions(python: str = sys.executable) -> dict:
    """Versions of what the run used: python, torch, triton, CUDA, nvcc, GPU name and
    capability, driver, cores (each None when absent). Read in a subprocess of `python`."""
    probe = r"""
import json, platform, os
out = {"python": platform.python_version(), "cores": os.cpu_count()}
try:
    import torch
    out.update(torch=torch.__version__, cuda=torch.version.cuda, gpu=None)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, capability=list(torch.cuda.get_device_capability(0)),
                   gpu_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count)
except Exception as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
try:
    import triton
    out["triton"] = triton.__version__
except Exception:
    out["triton"] = None
print(json.dumps(out))
"""
    try:
        res = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
        info = json.loads(res.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        info = {"python": platform.python_version(), "cores": os.cpu_count(), "gpu": None,
                "torch_error": f"{type(exc).__name__}: {exc}"}
    info["nvcc"] = _first_line(["nvcc", "--version"], r"release [\d.]+")
    info["driver"] = _first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], r".+")
    return info


def _first_line(cmd: list[str], pattern: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(pattern, out)
    return m.group(0).strip() if m else None


# ---- results ---------------------------------------------------------------------------------

def write_results(out: Path, records: list[dict], info: dict, *, dry_run: bool, note: str = "") -> dict:
    """summary.json (every point pass/fail/skip, times, versions, GPU) and summary.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "result": "dry run" if dry_run else ("fail" if exit_code(records) else "pass"),
        "note": note, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": round(sum(r.get("seconds") or 0 for r in records), 1),
        "total_budget_s": TOTAL_BUDGET_S, "versions": info, "phases": records,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    lines = [f"# gpu-check: {summary['result']}", "",
             f"{info.get('gpu') or 'no GPU'}; python {info.get('python')}, torch {info.get('torch')}, "
             f"triton {info.get('triton')}, CUDA {info.get('cuda')}, nvcc {info.get('nvcc')}, "
             f"driver {info.get('driver')}, {info.get('cores')} cores", ""]
    if note:
        lines += [note, ""]
    lines += ["| phase | status | seconds | budget (s) | detail |", "|---|---|---:|---:|---|"]
    for r in records:
        secs = "" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['name']} | {r['status']} | {secs} | {r['budget_s']} | {r['detail']} |")
    lines += ["", f"total {summary['total_seconds']:.0f} s of a {TOTAL_BUDGET_S} s budget", ""]
    (out / "summary.md").write_text("\n".join(lines))
    return summary


def plan_records(phases: list[Phase], ctx: Context) -> list[dict]:
    """The dry run's records: every phase "planned", with the commands it would run."""
    return [{"name": p.name, "status": "planned", "detail": p.what, "seconds": None,
             "budget_s": p.budget_s, "limit_s": ctx.limit(p),
             "data": {"commands": [" ".join(c) for c in p.commands(ctx)], "needs": list(p.needs),
                      "optional": p.optional}} for p in phases]


def print_plan(records: list[dict]) -> None:
    print(f"[gpu-check] plan ({sum(r['budget_s'] for r in records)} s of budgets, "
          f"{TOTAL_BUDGET_S} s in all):")
    for r in records:
        print(f"  {r['name']:<10} {r['budget_s']:>4} s  {r['detail']}")
        for c in r["data"]["commands"]:
            print(f"  {'':<10}         $ {c}")


# ---- main ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n")[0],
                                epilog="Phases: " + ", ".join(PHASES))
    p.add_argument("--out-dir", default=os.environ.get("DDPM_FAST_GPU_CHECK_DIR") or str(DEFAULT_OUT),
                   help="results folder (default $DDPM_FAST_GPU_CHECK_DIR or build/gpu-check)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write the dry-run results")
    p.add_argument("--only", default="", help="comma-separated phases to run (default all)")
    p.add_argument("--skip", default="", help="comma-separated phases to leave out")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="MAX_JOBS of the build")
    p.add_argument("--slack", type=float, default=1.5,
                   help="a phase is stopped at budget x slack (default 1.5)")
    args = p.parse_args(argv)
    for name in ("only", "skip"):
        chosen = [s for s in getattr(args, name).split(",") if s]
        unknown = [s for s in chosen if s not in PHASES]
        if unknown:
            p.error(f"--{name}: unknown phase(s) {', '.join(unknown)}; phases are {', '.join(PHASES)}")
        setattr(args, name, chosen)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1; got {args.jobs}")
    if args.slack < 1:
        p.error(f"--slack must be >= 1; got {args.slack}")
    return args


def selected(args: argparse.Namespace) -> list[Phase]:
    return [p for name, p in PHASES.items() if (not args.only or name in args.only) and name not in args.skip]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = versions()
    ctx = Context(out=out, jobs=args.jobs, slack=args.slack, gpu=info.get("gpu"),
                  arch=arch_list(tuple(info["capability"])) if info.get("capability") else None)
    phases = selected(args)
    if args.dry_run or not ctx.gpu:
        why = "dry run asked for" if args.dry_run else (
            "no CUDA GPU is visible" + (f" ({info['torch_error']})" if info.get("torch_error") else ""))
        print(f"[gpu-check] {why}: nothing is built or run; the plan and the result writers only.")
        records = plan_records(phases, ctx)
        print_plan(records)
        write_results(out, records, info, dry_run=True, note=f"dry run: {why}")
        print(f"[gpu-check] dry-run results in {out}")
        return 0
    ctx.log = out / "log.txt"
    ctx.log.write_text("")
    print(f"[gpu-check] {ctx.gpu} (TORCH_CUDA_ARCH_LIST={ctx.arch}), torch {info.get('torch')}, "
          f"triton {info.get('triton')}, {ctx.jobs} build jobs; results in {out}")
    records = run_phases(phases, ctx)
    summary = write_results(out, records, info, dry_run=False)
    print(f"\n[gpu-check] {summary['result'].upper()} in {summary['total_seconds']:.0f} s "
          f"(budget {TOTAL_BUDGET_S} s); results in {out}")
    for r in records:
        print(f"  {r['name']:<10} {r['status']:<5} {r['seconds']:>5.0f} s / {r['budget_s']:>3} s  {r['detail']}")
    return exit_code(records)


if __name__ == "__main__":
    sys.exit(main())
