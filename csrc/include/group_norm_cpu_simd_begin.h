// Opens the SIMD section of a CPU kernel file of group_norm_scale_shift (forward and backward):
// include it after every other header, and group_norm_cpu_simd_end.h after the vector code. On
// x86-64 (GCC/Clang) the code between them is compiled for AVX2+FMA+F16C (the kernels check the
// CPU at run time, cpu_isa.h) with at::vec's AVX2 Vectorized<float>; elsewhere at::vec's default.
// Also the vector helpers both files use: two-vector loads/stores of float/half/bfloat16, lane
// sums, and the vector SiLU and sigmoid (a lean exp on AVX2).
// No include guard: a file includes it once, and the section ends with the _end header.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(CPU_CAPABILITY)
#define DDPM_GN_X86_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
// sleef.h declares its AVX2 functions (which the vec headers name but these kernels never call)
// only when __AVX__ is predefined, which a target pragma does not do.
#define SLEEF_STATIC_LIBS
#ifndef __AVX__
#define __AVX__ 1
#include <sleef.h>
#undef __AVX__
#endif
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "group_norm_math.h"

namespace ddpm_fast {
namespace gn_simd {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kStep = 2 * kVec;  // elements per inner iteration (two float vectors)

// ---- loads/stores of 2 * kVec elements as two float vectors -----------------------------------
template <typename T>
inline void load2(const T* p, Vec& lo, Vec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo = Vec::loadu(p);
    hi = Vec::loadu(p + kVec);
  } else {
    at::vec::load_to_float<T>(p, lo, hi);
  }
}

template <typename T>
inline void store2(T* p, const Vec& lo, const Vec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo.store(p);
    hi.store(p + kVec);
  } else {
    at::vec::convert_from_float<T>(lo, hi).store(p);
  }
}

inline double lane_sum(const Vec& v) {
  alignas(64) float lanes[kVec];
  v.store(lanes);
  double s = 0.0;
  for (int64_t j = 0; j < kVec; ++j) s += lanes[j];
  return s;
}

// s1[c + j] += the lanes of (lo1, hi1), s2[c + j] += those of (lo2, hi2), j < 2 * kVec: per-channel
// vector accumulators of 2 * kVec channels (channels-last kernels) added into double sums.
inline void add_lanes(double* s1, double* s2, const Vec& lo1, const Vec& hi1, const Vec& lo2, const Vec& hi2) {
  alignas(64) float lanes[4][kVec];
  lo1.store(lanes[0]);
  hi1.store(lanes[1]);
  lo2.store(lanes[2]);
  hi2.store(lanes[3]);
  for (int64_t j = 0; j < kVec; ++j) {
    s1[j] += lanes[0][j];
    s1[kVec + j] += lanes[1][j];
    s2[j] += lanes[2][j];
    s2[kVec + j] += lanes[3][j];
  }
}

// 1 + exp(-y): the costly part of SiLU and sigmoid (the FMA ports are the bottleneck). On x86 a
// lean AVX2 version: exp(t) = 2^n * p(r), n = round(t / ln 2), r = t - n ln 2 in [-ln2/2, ln2/2],
// p a degree-4 minimax polynomial (gn::kExpPoly, relative error < 3e-6, which moves SiLU by
// < 1e-6 absolutely: |d silu| <= |y| s (1 - s) |d exp / exp| <= 0.45 |...|), with t clamped to
// +-87 so that 2^n stays a normal float. Where the one-constant reduction loses digits (|t| large)
// sigmoid is saturated and the error does not show. Elsewhere at::vec's exp_u20.
inline Vec one_plus_exp_neg(const Vec& y) {
#ifdef DDPM_GN_X86_AVX2
  const __m256 yc = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(87.0f));
  // k = -y log2(e) + (1.5 * 2^23 + 127): its low mantissa bits hold round(-y log2 e) + 127.
  const __m256 magic = _mm256_set1_ps(12582912.0f + 127.0f);
  const __m256 k = _mm256_fnmadd_ps(yc, _mm256_set1_ps(gn::kLog2e), magic);
  const __m256 n = _mm256_sub_ps(k, magic);
  const __m256 r = _mm256_fnmsub_ps(n, _mm256_set1_ps(gn::kLn2), yc);  // -y - n ln2
  __m256 p = _mm256_set1_ps(gn::kExpPoly[0]);
  for (int j = 1; j < 5; ++j) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(gn::kExpPoly[j]));
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(k), 23));
  return Vec(_mm256_fmadd_ps(p, two_n, _mm256_set1_ps(1.0f)));
#else
  return Vec(1.0f) + y.neg().exp_u20();
#endif
}

// SiLU(y) = y / (1 + exp(-y)). A division beats reciprocal + Newton here: it runs beside the FMA
// ports.
inline Vec silu(const Vec& y) { return y / one_plus_exp_neg(y); }

// sigmoid(y) = 1 / (1 + exp(-y)).
inline Vec sigmoid(const Vec& y) { return Vec(1.0f) / one_plus_exp_neg(y); }

}  // namespace gn_simd
}  // namespace ddpm_fast
