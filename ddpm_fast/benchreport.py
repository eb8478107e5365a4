"""Benchmark reports and the speed gate (the `ddpm-fast bench-report` command).

Every benchmark of benchmarks/ records in pytest-benchmark's extra_info the reference time
measured in the same run and `speedup = t_ref / t_fused`. This module turns a pytest-benchmark
JSON file into a markdown table, and fails (exit 1) when any fused path is slower than
`--min-speedup` times its reference — a ratio, so machines of different speed compare.

  python -m ddpm_fast.benchreport run [--quick] [--out-dir benchmarks/results] [--min-speedup 0.8]
  python -m ddpm_fast.benchreport report RESULTS.json [--markdown OUT.md] [--min-speedup 0.8]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Result:
    """One benchmark: its name, the measured times (s) and what extra_info says of it."""

    name: str
    speedup: float | None
    t_fused: float
    t_ref: float | None
    device: str
    dtype: str
    shape: str
    throughput: str


def bench_threads() -> int:
    """The CPU thread count the benchmarks run with (benchmarks/conftest.py reads the same)."""
    return int(os.environ.get("DDPM_FAST_BENCH_THREADS", os.cpu_count() or 1))


def device_name() -> str:
    """A file-name-safe device description: the GPU's name, else the CPU's model and the
    benchmarks' thread count (e.g. cpu-amd-epyc-2t)."""
    name = f"cpu-{_cpu_model()}-{bench_threads()}t"
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
    except ImportError:
        pass
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load(path: str | Path) -> list[Result]:
    """The results of a pytest-benchmark JSON file."""
    data = json.loads(Path(path).read_text())
    out = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        thr = []
        if "GB/s" in info:
            thr.append(f"{info['GB/s']:.1f} GB/s")
        if "TFLOP/s" in info:
            thr.append(f"{info['TFLOP/s']:.3f} TFLOP/s")
        out.append(Result(
            name=bench.get("fullname", bench["name"]), speedup=info.get("speedup"),
            t_fused=info.get("t_fused_s", bench["stats"]["min"]), t_ref=info.get("t_ref_s"),
            device=str(info.get("device", "")), dtype=str(info.get("dtype", "")),
            shape=str(info.get("shape", "")), throughput=", ".join(thr)))
    return out


def markdown(results: list[Result], title: str = "") -> str:
    """A markdown table: benchmark, device, dtype, shape, reference and fused (best) times, speedup."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| benchmark | device | dtype | shape | reference | fused | speedup | throughput |",
              "|---|---|---|---|---:|---:|---:|---|"]
    for r in results:
        ref = "" if r.t_ref is None else _fmt_time(r.t_ref)
        sp = "" if r.speedup is None else f"{r.speedup:.2f}x"
        name = r.name.split("::", 1)[-1]
        lines.append(f"| {name} | {r.device} | {r.dtype} | {r.shape} | {ref} | "
                     f"{_fmt_time(r.t_fused)} | {sp} | {r.throughput} |")
    return "\n".join(lines) + "\n"


def _fmt_time(t: float) -> str:
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} us"


def gate(results: list[Result], min_speedup: float) -> list[str]:
    """The failures: every benchmark with a speedup below min_speedup (a deliberately slowed
    kernel shows up here); benchmarks without a reference are not gated."""
    return [f"{r.name}: {r.speedup:.2f}x < {min_speedup}x its reference"
            for r in results if r.speedup is not None and r.speedup < min_speedup]


def _report(json_path: Path, md_path: Path | None, min_speedup: float | None, title: str) -> int:
    results = load(json_path)
    if not results:
        print(f"{json_path}: no benchmarks", file=sys.stderr)
        return 1
    table = markdown(results, title)
    if md_path is not None:
        md_path.write_text(table)
    print(table)
    if min_speedup is not None:
        failures = gate(results, min_speedup)
        if failures:
            print("speed gate FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
            return 1
        print(f"speed gate passed: every fused path >= {min_speedup}x its reference "
              f"({len(results)} benchmarks)")
    return 0


def _run(args) -> int:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{device_name()}-{_dt.date.today().isoformat()}" + ("-quick" if args.quick else "")
    json_path = out_dir / f"{stem}.json"
    env = dict(os.environ)
    if args.quick:
        env["DDPM_FAST_BENCH_QUICK"] = "1"
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={json_path}", *args.pytest_args]
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        return rc
    title = f"{device_name()} {_dt.date.today().isoformat()}" + (" (quick)" if args.quick else "")
    return _report(json_path, out_dir / f"{stem}.md", args.min_speedup, title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddpm-fast bench-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the benchmark suite, write JSON + markdown, apply the gate")
    p.add_argument("--quick", action="store_true", help="few rounds, small shapes (CI)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--min-speedup", type=float, default=None)
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    p = sub.add_parser("report", help="markdown table (and gate) of a pytest-benchmark JSON file")
    p.add_argument("json")
    p.add_argument("--markdown", default=None)
    p.add_argument("--min-speedup", type=float, default=None)
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    return _report(Path(args.json), None if args.markdown is None else Path(args.markdown),
                   args.min_speedup, Path(args.json).stem)


if __name__ == "__main__":
    sys.exit(main())
