"""The benchmark report and its speed gate, on synthetic pytest-benchmark results."""
import json

from ddpm_fast import benchreport


def _write(tmp_path, speedups):
    data = {"benchmarks": [
        {"name": f"test_op[{i}]", "fullname": f"benchmarks/test_x.py::test_op[{i}]",
         "stats": {"median": 2e-3 / (s or 1.0), "min": 1e-3 / (s or 1.0)},
         "extra_info": ({} if s is None else {"speedup": s, "t_ref_s": 1e-3, "device": "cpu",
                                              "dtype": "float32", "shape": [8, 128, 32, 32],
                                              "GB/s": 12.5})}
        for i, s in enumerate(speedups)]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    return path


def test_gate_passes_when_every_fused_path_is_fast_enough(tmp_path):
    results = benchreport.load(_write(tmp_path, [3.0, 1.1, 0.81]))
    assert benchreport.gate(results, 0.8) == []


def test_gate_fails_a_deliberately_slowed_kernel(tmp_path):
    # one fused path at 0.5x its reference (as a slowed kernel would be) fails the 0.8x gate
    results = benchreport.load(_write(tmp_path, [3.0, 0.5, 1.2]))
    failures = benchreport.gate(results, 0.8)
    assert len(failures) == 1 and "test_op[1]" in failures[0] and "0.50x" in failures[0]


def test_benchmarks_without_reference_are_not_gated(tmp_path):
    results = benchreport.load(_write(tmp_path, [None, 2.0]))
    assert benchreport.gate(results, 0.8) == []
    assert results[0].speedup is None


def test_report_exit_code_and_markdown(tmp_path, capsys):
    md = tmp_path / "r.md"
    assert benchreport.main(["report", str(_write(tmp_path, [2.0])), "--markdown", str(md),
                             "--min-speedup", "0.8"]) == 0
    table = md.read_text()
    assert "| test_op[0] | cpu | float32 | [8, 128, 32, 32] | 1.00 ms | 500.0 us | 2.00x | 12.5 GB/s |" in table
    assert benchreport.main(["report", str(_write(tmp_path, [0.7])), "--min-speedup", "0.8"]) == 1
    assert "speed gate FAILED" in capsys.readouterr().err


# ---- the noise margin: a failure within 15% of the gate is measured again before failing -------

def _rerun_with(tmp_path, speedups_by_attempt):
    """A rerun(names) that returns, at its k-th call, the named benchmarks at speedups_by_attempt[k]
    (names as test_op[i] of _write), and records the names it was asked for."""
    calls = []

    def rerun(names):
        s = speedups_by_attempt[len(calls)]
        calls.append(list(names))
        path = tmp_path / f"repeat{len(calls)}.json"
        path.write_text(json.dumps({"benchmarks": [
            {"name": n.split("::")[-1], "fullname": n, "stats": {"median": 1e-3 / s, "min": 1e-3 / s},
             "extra_info": {"speedup": s, "t_ref_s": 1e-3}} for n in names]}))
        return benchreport.load(path)

    return rerun, calls


def test_marginal_gate_failure_is_repeated_and_keeps_its_best(tmp_path):
    results = benchreport.load(_write(tmp_path, [3.0, 0.75, 1.2]))   # 0.75 >= 0.8 * 0.85 = 0.68
    rerun, calls = _rerun_with(tmp_path, [0.95])
    final, failures = benchreport.gate_with_repeats(results, 0.8, rerun)
    assert failures == []
    assert calls == [["benchmarks/test_x.py::test_op[1]"]]   # only the marginal one is repeated
    assert [r.speedup for r in final] == [3.0, 0.95, 1.2]
    assert final[1].info["gate_attempts"] == [0.75, 0.95]


def test_marginal_gate_failure_that_stays_slow_fails_after_the_repeats(tmp_path):
    results = benchreport.load(_write(tmp_path, [0.7, 2.0]))
    rerun, calls = _rerun_with(tmp_path, [0.72, 0.71, 0.9])
    final, failures = benchreport.gate_with_repeats(results, 0.8, rerun)
    assert len(calls) == benchreport.REPEATS == 2
    assert len(failures) == 1 and "test_op[0]" in failures[0] and "0.72x" in failures[0]
    assert final[0].info["gate_attempts"] == [0.7, 0.72, 0.71]


def test_gate_failure_far_below_the_margin_fails_at_once(tmp_path):
    # a deliberately slowed kernel (0.5x, below 0.68) is not given another chance
    results = benchreport.load(_write(tmp_path, [0.5, 0.79]))
    rerun, calls = _rerun_with(tmp_path, [0.9, 0.9])
    _, failures = benchreport.gate_with_repeats(results, 0.8, rerun)
    assert calls == [["benchmarks/test_x.py::test_op[1]"]]
    assert len(failures) == 1 and "test_op[0]" in failures[0]


def test_run_repeats_marginal_benchmarks_and_stores_the_kept_result(tmp_path, monkeypatch, capsys):
    """`run` end to end with pytest replaced: the first run has a marginal failure, its repeat
    passes; the JSON on disk then holds the repeat's measurement and the attempts."""
    runs = []

    def fake_pytest(json_path, pytest_args, quick):
        runs.append(list(pytest_args))
        speedups = [2.0, 0.74] if len(runs) == 1 else [0.9]
        names = ([f"benchmarks/test_x.py::test_op[{i}]" for i in range(2)] if len(runs) == 1
                 else pytest_args[:1])
        json_path.write_text(json.dumps({"benchmarks": [
            {"name": n.split("::")[-1], "fullname": n, "stats": {"median": 1e-3 / s, "min": 1e-3 / s},
             "extra_info": {"speedup": s, "t_ref_s": 1e-3}} for n, s in zip(names, speedups)]}))
        return 0

    monkeypatch.setattr(benchreport, "_run_pytest", fake_pytest)
    monkeypatch.setattr(benchreport, "device_name", lambda: "testdev")
    assert benchreport.main(["run", "--out-dir", str(tmp_path), "--min-speedup", "0.8"]) == 0
    assert runs[1][0] == "benchmarks/test_x.py::test_op[1]" and len(runs) == 2
    (stored,) = tmp_path.glob("testdev-*.json")
    data = json.loads(stored.read_text())["benchmarks"]
    assert data[1]["extra_info"]["speedup"] == 0.9 and data[1]["extra_info"]["gate_attempts"] == [0.74, 0.9]
    assert data[0]["extra_info"]["speedup"] == 2.0
    assert "within 15% of the 0.8x gate" in capsys.readouterr().out


def test_targets_are_reported_met_or_missed(tmp_path):
    path = _write(tmp_path, [2.0, 2.0])
    data = json.loads(path.read_text())
    data["benchmarks"][0]["extra_info"]["targets"] = [
        {"what": "fused / copy of x", "value": 1.2, "limit": 1.3, "kind": "max", "issue": 17}]
    data["benchmarks"][1]["extra_info"]["targets"] = [
        {"what": "% of peak bandwidth", "value": 70.0, "limit": 85.0, "kind": "min", "issue": 17}]
    path.write_text(json.dumps(data))
    lines = benchreport.target_lines(benchreport.load(path))
    assert lines == ["met: test_op[0]: fused / copy of x 1.2 (target <= 1.3) (issue 17)",
                     "MISSED: test_op[1]: % of peak bandwidth 70 (target >= 85) (issue 17)"]


def test_run_with_a_failing_benchmark_still_writes_the_table_and_fails(tmp_path, monkeypatch):
    def fake_pytest(json_path, pytest_args, quick):
        json_path.write_text(_write(tmp_path, [2.0]).read_text())
        return 1   # e.g. one benchmark's correctness check failed

    monkeypatch.setattr(benchreport, "_run_pytest", fake_pytest)
    monkeypatch.setattr(benchreport, "device_name", lambda: "testdev")
    assert benchreport.main(["run", "--out-dir", str(tmp_path), "--min-speedup", "0.8"]) == 1
    (md,) = tmp_path.glob("testdev-*.md")
    assert "| test_op[0] |" in md.read_text() and "(pytest exit 1)" in md.read_text()
