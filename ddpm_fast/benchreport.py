"""Benchmark reports and the speed gate (the `ddpm-fast bench-report` command).

Every benchmark of benchmarks/ records in pytest-benchmark's extra_info the reference time
measured in the same run and `speedup = t_ref / t_fused`. This module turns a pytest-benchmark
JSON file into a markdown table, and fails (exit 1) when any fused path is slower than
`--min-speedup` times its reference — a ratio, so machines of different speed compare.

Noise margin (`run`): a benchmark that fails the gate by less than MARGIN (15%) of it — speedup in
[min_speedup * (1 - MARGIN), min_speedup) — is measured again, up to REPEATS more times, and keeps
its best speedup; it fails only if no repeat reaches the gate. One further below fails at once.

Benchmarks may also record `extra_info["targets"]`: the goals of the kernels' issues (e.g. the step
within 1.3x a copy of x), each {"what", "value", "limit", "kind": "max"|"min", "issue"}; they are
reported (met / missed), not gated.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

MARGIN = 0.15   # a gate failure within this fraction of the gate is measured again ...
REPEATS = 2     # ... up to this many more times


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
    info: dict = field(default_factory=dict, compare=False, repr=False)
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # its pytest-benchmark entry


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
        if "%peak_bw" in info:
            thr.append(f"{info['%peak_bw']:.0f}% of peak bandwidth")
        if "TFLOP/s" in info:
            thr.append(f"{info['TFLOP/s']:.3f} TFLOP/s")
        out.append(Result(
            name=bench.get("fullname", bench["name"]), speedup=info.get("speedup"),
            t_fused=info.get("t_fused_s", bench["stats"]["min"]), t_ref=info.get("t_ref_s"),
            device=str(info.get("device", "")), dtype=str(info.get("dtype", "")),
            shape=str(info.get("shape", "")), throughput=", ".join(thr), info=info, raw=bench))
    return out


def markdown(results: list[Result], title: str = "") -> str:
    """A markdown table: benchmark, device, dtype, shape, reference (or stock baseline) and fused
    (best) times, speedup (or the ratio to the baseline, which the gate does not hold)."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| benchmark | device | dtype | shape | reference | fused | speedup | throughput |",
              "|---|---|---|---|---:|---:|---:|---|"]
    for r in results:
        ref = "" if r.t_ref is None else _fmt_time(r.t_ref)
        sp = "" if r.speedup is None else f"{r.speedup:.2f}x"
        if "speedup_vs_baseline" in r.info:   # a stock fast path: reported, not gated
            sp = f"{r.info['speedup_vs_baseline']:.2f}x vs {r.info.get('baseline', 'baseline')}"
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


def marginal(results: list[Result], min_speedup: float, margin: float = MARGIN) -> list[Result]:
    """The gate failures close enough to the gate to be noise: speedup in
    [min_speedup * (1 - margin), min_speedup)."""
    return [r for r in results if r.speedup is not None
            and min_speedup * (1 - margin) <= r.speedup < min_speedup]


def gate_with_repeats(results: list[Result], min_speedup: float,
                      rerun: Callable[[list[str]], list[Result]], *, margin: float = MARGIN,
                      repeats: int = REPEATS) -> tuple[list[Result], list[str]]:
    """The gate with a noise margin: the `marginal` failures are measured again by
    `rerun(names) -> results of those benchmarks`, up to `repeats` times while any is still
    marginal; each keeps its best speedup (interference only ever slows a run down). Returns the
    final results (in the original order, a repeated one with info["gate_attempts"], its speedups
    in order) and the gate's failures on them."""
    best = {r.name: r for r in results}
    attempts = {r.name: [r.speedup] for r in marginal(results, min_speedup, margin)}
    for _ in range(repeats):
        pending = [r.name for r in marginal(list(best.values()), min_speedup, margin)
                   if r.name in attempts]
        if not pending:
            break
        print(f"speed gate: {len(pending)} benchmark(s) within {margin:.0%} of the "
              f"{min_speedup}x gate, measuring again: {', '.join(pending)}")
        for new in rerun(pending):
            if new.name not in attempts:
                continue
            attempts[new.name].append(new.speedup)
            old = best[new.name]
            if new.speedup is not None and (old.speedup is None or new.speedup > old.speedup):
                best[new.name] = new
    final = []
    for r in results:
        chosen = best[r.name]
        if r.name in attempts:
            chosen.info["gate_attempts"] = attempts[r.name]
        final.append(chosen)
    return final, gate(final, min_speedup)


def target_lines(results: list[Result]) -> list[str]:
    """One line per target a benchmark recorded (extra_info["targets"]): met or missed."""
    lines = []
    for r in results:
        for t in r.info.get("targets", []):
            ok = t["value"] <= t["limit"] if t.get("kind", "max") == "max" else t["value"] >= t["limit"]
            sign = "<=" if t.get("kind", "max") == "max" else ">="
            issue = f" (issue {t['issue']})" if t.get("issue") else ""
            lines.append(f"{'met' if ok else 'MISSED'}: {r.name.split('::', 1)[-1]}: {t['what']} "
                         f"{t['value']:.3g} (target {sign} {t['limit']:g}){issue}")
    return lines


def _report(json_path: Path, md_path: Path | None, min_speedup: float | None, title: str,
            rerun: Callable[[list[str]], list[Result]] | None = None) -> int:
    results = load(json_path)
    if not results:
        print(f"{json_path}: no benchmarks", file=sys.stderr)
        return 1
    failures = []
    if min_speedup is not None:
        if rerun is not None:
            results, failures = gate_with_repeats(results, min_speedup, rerun)
            _store_repeats(json_path, results)
        else:
            failures = gate(results, min_speedup)
    table = markdown(results, title)
    targets = target_lines(results)
    if targets:
        table += "\nTargets of the kernels' issues (reported, not gated):\n\n" + "".join(
            f"- {line}\n" for line in targets)
    if md_path is not None:
        md_path.write_text(table)
    print(table)
    if min_speedup is not None:
        if failures:
            print("speed gate FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
            return 1
        print(f"speed gate passed: every fused path >= {min_speedup}x its reference "
              f"({len(results)} benchmarks)")
    return 0


def _store_repeats(json_path: Path, results: list[Result]) -> None:
    """Write the repeated benchmarks' kept measurements (and their attempts) into the JSON file."""
    repeated = {r.name: r for r in results if "gate_attempts" in r.info}
    if not repeated:
        return
    data = json.loads(json_path.read_text())
    for i, bench in enumerate(data.get("benchmarks", [])):
        r = repeated.get(bench.get("fullname", bench["name"]))
        if r is not None:
            data["benchmarks"][i] = {**r.raw, "extra_info": r.info}
    json_path.write_text(json.dumps(data, indent=2))


def _run_pytest(json_path: Path, pytest_args: list[str], quick: bool) -> int:
    env = dict(os.environ)
    if quick:
        env["DDPM_FAST_BENCH_QUICK"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={json_path}", *pytest_args]
    return subprocess.run(cmd, env=env).returncode


def _run(args) -> int:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{device_name()}-{_dt.date.today().isoformat()}" + ("-quick" if args.quick else "")
    json_path = out_dir / f"{stem}.json"
    rc = _run_pytest(json_path, ["benchmarks", *args.pytest_args], args.quick)
    if rc != 0:
        # a failing benchmark (e.g. its correctness check): report what was measured, then fail
        if json_path.exists() and load(json_path):
            title = f"{device_name()} {_dt.date.today().isoformat()} (pytest exit {rc})"
            _report(json_path, out_dir / f"{stem}.md", None, title)
        print(f"benchmarks: pytest exited {rc}", file=sys.stderr)
        return rc

    def rerun(names: list[str]) -> list[Result]:
        repeat_path = out_dir / f"{stem}.repeat.json"
        try:
            if _run_pytest(repeat_path, [*names, *args.pytest_args], args.quick) != 0:
                return []
            return load(repeat_path)
        finally:
            repeat_path.unlink(missing_ok=True)

    title = f"{device_name()} {_dt.date.today().isoformat()}" + (" (quick)" if args.quick else "")
    return _report(json_path, out_dir / f"{stem}.md", args.min_speedup, title, rerun)


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
