"""setup.py's build choices, read without building: with no GPU visible and TORCH_CUDA_ARCH_LIST
unset (a first `make demo` on a CPU machine) the CUDA objects are left out; any GPU, any
TORCH_CUDA_ARCH_LIST (CI's "8.0;9.0") or a CPU build of torch keeps the usual behaviour."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import setuptools

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py's namespace, executed with setuptools.setup replaced by a no-op."""
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    ns = {"__file__": str(ROOT / "setup.py"), "__name__": "setup_under_test"}
    exec(compile((ROOT / "setup.py").read_text(), str(ROOT / "setup.py"), "exec"), ns)
    return SimpleNamespace(**ns)


def fake_torch(cuda_version, gpu):
    return SimpleNamespace(version=SimpleNamespace(cuda=cuda_version),
                           cuda=SimpleNamespace(is_available=lambda: gpu))


@pytest.mark.parametrize("arch_list,cuda_version,gpu,skip", [
    (None, "13.0", False, True),         # CPU machine, CUDA torch: CPU kernels only
    ("8.0;9.0", "13.0", False, False),   # CI: both archs compiled although no GPU is visible
    (None, "13.0", True, False),         # a GPU machine: the default archs
    (None, None, False, False),          # CPU torch: CMake finds no CUDA anyway
    ("", "13.0", False, True),           # set but empty counts as unset
])
def test_cuda_objects_are_left_out_only_without_gpu_and_arch_list(setup_py, monkeypatch, capsys,
                                                                  arch_list, cuda_version, gpu, skip):
    if arch_list is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    assert setup_py.skip_cuda(fake_torch(cuda_version, gpu)) is skip
    assert ("building the CPU kernels only" in capsys.readouterr().out) is skip
