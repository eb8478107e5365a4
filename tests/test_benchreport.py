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
