"""Build of ddpm_fast: setup.py drives CMake (Ninja) on CMakeLists.txt, the one description of
the C++/CUDA sources, and installs the Python package `ddpm_fast` with the Triton kernels of
`kernels/` as its subpackage `ddpm_fast.kernels`.

Environment:
  DDPM_FAST_CPU_ONLY=1   build the CPU kernels only
  TORCH_CUDA_ARCH_LIST   CUDA archs to compile for. Unset: "8.0;9.0+PTX" when a GPU is visible,
                         and no CUDA objects at all without one (see `skip_cuda`)
  MAX_JOBS               parallel compile jobs (default: all cores)
  DDPM_FAST_DEBUG=1      Debug build
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import torch  # the build needs the torch it will run with (use --no-build-isolation)

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        config = "Debug" if os.environ.get("DDPM_FAST_DEBUG") == "1" else "Release"
        args = [
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DDDPM_FAST_OUTPUT_DIR={out_dir}",
        ]
        cpu_only = os.environ.get("DDPM_FAST_CPU_ONLY") == "1" or skip_cuda(torch)
        args.append(f"-DDDPM_FAST_CPU_ONLY={'ON' if cpu_only else 'OFF'}")  # explicit: CMake caches it
        cmake = _tool("cmake")
        ninja = _tool("ninja")
        generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if _runs(ninja) else []
        subprocess.run([cmake, "-S", str(ext.source_dir), "-B", str(build_dir), *generator, *args],
                       check=True)
        build = [cmake, "--build", str(build_dir), "--config", config]
        jobs = os.environ.get("MAX_JOBS")
        if jobs:
            build += ["--parallel", jobs]
        elif not generator:
            build += ["--parallel", str(os.cpu_count() or 1)]
        subprocess.run(build, check=True)
        built = Path(self.get_ext_fullpath(ext.name))
        if not built.exists():
            raise RuntimeError(f"CMake did not produce {built}")


def skip_cuda(torch) -> bool:
    """True when nothing asks for CUDA objects and nothing here could run them: a CUDA build of
    torch, no GPU visible and TORCH_CUDA_ARCH_LIST unset (a first `make demo` on a CPU machine).
    Their device code takes most of a first build's time (one nvcc device pass of
    csrc/cuda/diffusion_step.cu alone: over 7 CPU-minutes on the 2-core CI machine, twice for
    sm_80 and sm_90), and on a GPU the Triton kernels, which need no build, serve every op. Set
    TORCH_CUDA_ARCH_LIST (CI sets "8.0;9.0") to build them here for GPUs elsewhere."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.version.cuda is None or torch.cuda.is_available():
        return False
    print("ddpm_fast: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building the CPU kernels only "
          "(set TORCH_CUDA_ARCH_LIST, e.g. \"8.0;9.0\", to compile the CUDA C++ kernels too)")
    return True


def _tool(name: str) -> str:
    """The cmake / ninja of the pip packages of the building Python (a system cmake may be too
    old: torch's CMake config needs >= 3.26), else the one on PATH."""
    try:
        module = __import__(name)
        path = Path(module.BIN_DIR if name == "ninja" else module.CMAKE_BIN_DIR) / name
        if path.exists():
            return str(path)
    except (ImportError, AttributeError):
        pass
    return name


def _runs(program: str) -> bool:
    try:
        subprocess.run([program, "--version"], check=True, capture_output=True)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


setup(
    packages=["ddpm_fast", "ddpm_fast.ops", "ddpm_fast.assets", "ddpm_fast.kernels"],
    package_dir={"ddpm_fast": "ddpm_fast", "ddpm_fast.kernels": "kernels"},
    package_data={"ddpm_fast.assets": ["*.safetensors", "*.json"]},
    ext_modules=[CMakeExtension("ddpm_fast._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
)
