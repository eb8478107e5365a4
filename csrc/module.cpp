// The Python module ddpm_fast._C. Importing it runs the static TORCH_LIBRARY registrations of
// every source linked into it; the few functions here only report how it was built.
#include <torch/extension.h>

#include "cpu_isa.h"

#ifndef DDPM_FAST_CUDA_ARCHS
#define DDPM_FAST_CUDA_ARCHS ""
#endif

namespace {

bool cuda_compiled() {
#ifdef DDPM_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ddpm_fast compiled kernels (CPU C++ and CUDA C++)";
  m.def("cuda_compiled", &cuda_compiled, "True when the CUDA kernels were compiled into this build");
  m.def("cuda_archs", [] { return std::string(DDPM_FAST_CUDA_ARCHS); },
        "The TORCH_CUDA_ARCH_LIST the CUDA kernels were compiled for ('' without CUDA)");
  m.def("openmp_enabled", &openmp_enabled, "True when the CPU kernels were built with OpenMP");
  m.def("cpu_isa", [] { return std::string(ddpm_fast::cpu_isa::name()); },
        "The instruction set the CPU kernels run with in this process: 'avx512', 'avx2' or "
        "'baseline' (the widest the CPU has, capped by DDPM_FAST_CPU_ISA)");
}
