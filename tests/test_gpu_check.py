"""`make gpu-check` (benchmarks/gpu_check.py) without a GPU: its dry run through the Makefile, and
the pieces a GPU run rests on, exercised here on synthetic phases and outputs: the phase runner
(failures, dependencies, the time budget, the exit status), the hard time limit of a phase's
command, the readers of pytest's JUnit XML and of compute-sanitizer's output, the quality
comparison with the CPU figures and the result writers."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_make_gpu_check_without_a_gpu_runs_the_dry_run_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DDPM_FAST_GPU_CHECK_DIR": str(tmp_path)}
    res = subprocess.run(["make", "-s", "gpu-check", f"GPU_CHECK_PYTHON={sys.executable}"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no CUDA GPU is visible" in res.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["result"] == "dry run"
    assert summary["versions"]["python"] == "%d.%d.%d" % sys.version_info[:3]
    phases = {p["name"]: p for p in summary["phases"]}
    assert list(phases) == ["build", "tests", "bench", "sanitizer", "e2e", "targets"]
    assert all(p["status"] == "planned" for p in phases.values())
    assert sum(p["budget_s"] for p in phases.values()) <= 480   # 8 minutes on an H100/H200
    (build,) = phases["build"]["data"]["commands"]
    assert build.startswith(sys.executable) and "--no-build-isolation --no-deps --no-index -e ." in build
    (tests,) = phases["tests"]["data"]["commands"]
    assert " -m cuda " in tests and "--timeout=" in tests and f"--junitxml={tmp_path / 'junit.xml'}" in tests
    (bench,) = phases["bench"]["data"]["commands"]
    assert "ddpm_fast.benchreport run" in bench and "--min-speedup 0.8" in bench
    assert [c.split()[2] for c in phases["sanitizer"]["data"]["commands"]] == ["memcheck", "racecheck"]
    assert phases["sanitizer"]["data"]["optional"] and phases["e2e"]["data"]["needs"] == ["build"]
    assert "| sanitizer | planned |  | 40 |" in (tmp_path / "summary.md").read_text()
    assert [c.split()[2] for c in phases["targets"]["data"]["commands"]] == ["attention", "bandwidth"]
    assert phases["targets"]["data"]["optional"]


def _phase(name, status=None, raises=None, budget=10, needs=(), optional=False, calls=None):
    def run(ctx):
        if calls is not None:
            calls.append(name)
        if raises:
            raise raises
        return gpu_check.Outcome(status, f"{name} said {status}", {"x": 1})

    return gpu_check.Phase(name, budget, f"phase {name}", run, needs=needs, optional=optional)


def test_a_failing_phase_fails_the_run_and_skips_what_needs_it(tmp_path, capsys):
    calls = []
    phases = [_phase("a", "pass", calls=calls),
              _phase("b", raises=RuntimeError("broke"), calls=calls),
              _phase("c", "pass", needs=("b",), calls=calls),
              _phase("d", "pass", needs=("a",), calls=calls)]
    records = gpu_check.run_phases(phases, gpu_check.Context(out=tmp_path))
    assert calls == ["a", "b", "d"]   # c needs b, which failed
    assert [r["status"] for r in records] == ["pass", "fail", "skip", "pass"]
    assert records[1]["detail"] == "RuntimeError: broke" and "Traceback" in records[1]["data"]["traceback"]
    assert records[2]["detail"] == "needs b"
    assert gpu_check.exit_code(records) == 1
    summary = gpu_check.write_results(tmp_path, records, {"gpu": "Test GPU", "python": "3"}, dry_run=False)
    assert summary["result"] == "fail"
    assert json.loads((tmp_path / "summary.json").read_text())["phases"][1]["status"] == "fail"
    assert "| b | fail |" in (tmp_path / "summary.md").read_text()
    assert "[gpu-check] b: fail in 0 s (budget 10 s): RuntimeError: broke" in capsys.readouterr().out


def test_passing_and_skipped_phases_exit_0_and_an_optional_phase_yields_to_the_budget(tmp_path):
    calls = []
    phases = [_phase("a", "pass", calls=calls), _phase("s", "skip", calls=calls),
              _phase("opt", "pass", budget=100, optional=True, calls=calls)]
    records = gpu_check.run_phases(phases, gpu_check.Context(out=tmp_path, slack=1.0), total_budget_s=50)
    assert calls == ["a", "s"] and [r["status"] for r in records] == ["pass", "skip", "skip"]
    assert "it needs 100 s" in records[2]["detail"]
    assert gpu_check.exit_code(records) == 0
    assert gpu_check.write_results(tmp_path, records, {}, dry_run=False)["result"] == "pass"


def test_a_command_past_its_limit_is_killed_with_its_output_kept(tmp_path):
    ctx = gpu_check.Context(out=tmp_path, log=tmp_path / "log.txt")
    t0 = time.monotonic()
    rc, out = ctx.run(["sh", "-c", "echo started; sleep 30 & wait"], timeout=1.5)
    assert rc is None and "started" in out and time.monotonic() - t0 < 10
    rc, out = ctx.run([sys.executable, "-c", "import sys; print('x' * 9000); sys.exit(3)"], timeout=60)
    assert rc == 3 and out.rstrip().endswith("x" * 100) and len(out) <= 8000
    assert "started" in (tmp_path / "log.txt").read_text()


def test_targets_phase_folds_both_workloads_and_fails_when_one_breaks(tmp_path, monkeypatch):
    """The targets phase runs gpu_workloads.py attention and bandwidth, each in half the phase's
    limit; their JSON targets (met or MISSED) make the detail; a workload that exits non-zero
    fails the phase (a MISSED target does not)."""
    ctx = gpu_check.Context(out=tmp_path, slack=1.0)
    seen = []

    def fake_run(cmd, timeout, env=None, cwd=None):
        name, out = cmd[2], Path(cmd[cmd.index("--json") + 1])
        seen.append((name, timeout))
        if name == "bandwidth" and broken:
            return 1, "Traceback: boom"
        verdict = "met" if name == "attention" else "MISSED"
        out.write_text(json.dumps({"targets": [{"what": f"{name} x", "value": 1.25, "verdict": verdict}]}))
        return 0, ""

    monkeypatch.setattr(ctx, "run", fake_run)
    broken = False
    outcome = gpu_check.targets(ctx)
    assert [n for n, _ in seen] == ["attention", "bandwidth"] and {t for _, t in seen} == {15.0}
    assert outcome.status == "pass" and outcome.detail == "met: attention x = 1.25; MISSED: bandwidth x = 1.25"
    assert not list(tmp_path.glob("*.json"))   # folded into the outcome's data
    broken = True
    outcome = gpu_check.targets(ctx)
    assert outcome.status == "fail" and "gpu_workloads.py bandwidth exited 1" in outcome.detail
    assert outcome.data["bandwidth"]["tail"] == "Traceback: boom"


def test_arch_list_of_the_local_gpu():
    assert gpu_check.arch_list((9, 0)) == "9.0"
    assert gpu_check.arch_list((8, 6)) == "8.6"
    assert gpu_check.arch_list((12, 0)) == "12.0"
    with pytest.raises(ValueError, match="capability"):
        gpu_check.arch_list((0, 0))


def test_junit_counts(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text('<testsuites><testsuite tests="7" failures="1" errors="0" skipped="2"/>'
                    '<testsuite tests="3" failures="0" errors="1" skipped="0"/></testsuites>')
    assert gpu_check.junit_counts(path) == {"tests": 10, "failures": 1, "errors": 1, "skipped": 2}
    assert gpu_check.junit_counts(tmp_path / "missing.xml") == {}


@pytest.mark.parametrize("rc,output,status", [
    (0, "========= COMPUTE-SANITIZER\nran: x\n========= ERROR SUMMARY: 0 errors\n", "pass"),
    (86, "========= Invalid __global__ write of size 4 bytes\n========= ERROR SUMMARY: 2 errors\n", "fail"),
    (0, "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n", "fail"),
    (0, "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", "pass"),
    (1, "========= Error: Device not supported\n", "skip"),
    (1, "Traceback ...\nAssertionError: attention: max |kernel - reference|\n========= ERROR SUMMARY: 0 errors\n",
     "fail"),
    (None, "========= COMPUTE-SANITIZER\n", "skip"),
    (0, "no summary at all\n", "fail"),
])
def test_sanitizer_verdict(rc, output, status):
    assert gpu_check.sanitizer_verdict("memcheck", rc, output).status == status


def test_quality_against_the_cpu_figures():
    cpu = {s: dict(zip(("accuracy", "confidence", "diversity"), v)) for s, v in gpu_check.CPU_QUALITY.items()}
    assert gpu_check.quality_verdicts(cpu) == []
    better = {s: {**v, "accuracy": 1.0} for s, v in cpu.items()}
    assert gpu_check.quality_verdicts(better) == []
    worse = {**cpu, "ddpm:250": {**cpu["ddpm:250"], "accuracy": cpu["ddpm:250"]["accuracy"] - 0.02}}
    (failure,) = gpu_check.quality_verdicts(worse)
    assert failure.startswith("ddpm:250: accuracy")
    collapsed = {**cpu, "ddim:50": {**cpu["ddim:50"], "diversity": 0.9}}
    assert gpu_check.quality_verdicts(collapsed) == ["ddim:50: diversity 0.900 vs 0.997 on the CPU (tolerance 0.03)"]
    assert gpu_check.quality_verdicts({"ddpm:250": cpu["ddpm:250"]}) == ["ddim:50: not measured"]


def test_bad_arguments_are_refused(capsys):
    for argv in (["--only", "build,nope"], ["--skip", "x"], ["--jobs", "0"], ["--slack", "0.5"]):
        with pytest.raises(SystemExit) as exc:
            gpu_check.parse_args(argv)
        assert exc.value.code == 2
    assert "unknown phase(s) x" in capsys.readouterr().err
    args = gpu_check.parse_args(["--skip", "sanitizer,e2e,targets"])
    assert [p.name for p in gpu_check.selected(args)] == ["build", "tests", "bench"]


def test_test_modules_with_a_missing_third_party_import_are_left_out(tmp_path):
    (tmp_path / "test_needs_missing.py").write_text(
        "import json\nimport pytest, missing_too_pkg.sub\nfrom surely_not_installed_pkg import thing\n\n"
        "def test_x():\n    pass\n")
    (tmp_path / "test_fine.py").write_text(
        "import json\nfrom conftest import x\nimport ddpm_fast\n\ndef f():\n    import also_not_installed_pkg\n")
    missing = gpu_check.uncollectable(sys.executable, tmp_path)
    assert missing == {str(tmp_path / "test_needs_missing.py"): ["missing_too_pkg", "surely_not_installed_pkg"]}
    ctx = gpu_check.Context(out=tmp_path)
    (cmd,) = gpu_check.tests_commands(ctx, [], missing)
    assert cmd[-1] == f"--ignore={tmp_path / 'test_needs_missing.py'}"
