// Closes the SIMD section opened by group_norm_cpu_simd_begin.h: the rest of the file is compiled
// for the baseline target again, and may ask gn_simd::supported() whether to run the section's code.
#ifdef DDPM_GN_X86_AVX2
#pragma GCC pop_options
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#endif

#include "cpu_isa.h"

namespace ddpm_fast {
namespace gn_simd {

// Whether this CPU runs the SIMD section: x86-64-v3 (AVX2, FMA, F16C, ...) unless
// DDPM_FAST_CPU_ISA=baseline caps it (cpu_isa.h); elsewhere at::vec's default always runs.
inline bool supported() {
#ifdef DDPM_GN_X86_AVX2
  return cpu_isa::level() >= cpu_isa::kAvx2;
#else
  return true;
#endif
}

}  // namespace gn_simd
}  // namespace ddpm_fast
