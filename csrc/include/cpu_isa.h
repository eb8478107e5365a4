// The x86 instruction sets the CPU kernels may use: the widest this CPU has, capped by the
// environment variable DDPM_FAST_CPU_ISA=avx2|baseline (read once per process), so that tests can
// run every variant of a kernel on one machine.
#pragma once

#include <cstdlib>
#include <string>

namespace ddpm_fast {
namespace cpu_isa {

enum Level : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };  // x86-64, x86-64-v3, x86-64-v4

inline Level level() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Level chosen = [] {
    __builtin_cpu_init();
    const char* cap = std::getenv("DDPM_FAST_CPU_ISA");
    const std::string limit = cap ? cap : "";
    if (limit != "baseline" && limit != "avx2" && __builtin_cpu_supports("x86-64-v4")) return kAvx512;
    if (limit != "baseline" && __builtin_cpu_supports("x86-64-v3")) return kAvx2;
    return kBaseline;
  }();
  return chosen;
#else
  return kBaseline;
#endif
}

// The name of level(): "avx512", "avx2" or "baseline" (what ddpm_fast._C.cpu_isa() reports).
inline const char* name() {
  switch (level()) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace cpu_isa
}  // namespace ddpm_fast
