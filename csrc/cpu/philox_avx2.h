// The CPU kernel's AVX2 draw of the Philox4x32-10 + Box-Muller normals of csrc/include/philox.h:
// the same construction (ddpm_fast/philox.py defines it) with AVX2 + FMA intrinsics, 8 Philox
// blocks = 32 consecutive elements at a time, structured like csrc/cpu/philox_avx512.h (whose
// instructions AVX2 lacks: vpternlog, vgetmant / vgetexp, mask registers); the arithmetic both
// share is csrc/cpu/box_muller_simd.h. GCC's vectorisation of philox.h's scalar code spent most of
// its instructions on shuffles for the 32-bit mulhi; here each word sits in the low half of a
// 64-bit lane and the multiply is one vpmuludq. A (16, 3, 64, 64) step with DDPM_FAST_CPU_ISA=avx2
// took ~515 us through the portable loops, ~290 us with this file (one Zen 4 core). Results agree
// with philox.h's to float rounding (vrsqrtps + one Newton step: |dz| < 1e-6; tests compare
// against the reference at 1e-5).
//
// Compiled for x86-64-v3 through function attributes; call fill_normals_avx2 only when the CPU
// has AVX2 + FMA (csrc/include/cpu_isa.h).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

#include <cstdint>

#include "box_muller_simd.h"
#include "normals_staging.h"
#include "philox.h"

namespace ddpm_fast {
namespace philox_avx2 {

#define DDPM_AVX2_INLINE static inline __attribute__((target("arch=x86-64-v3"), always_inline))

typedef uint32_t U32x8 __attribute__((vector_size(32)));  // the words as 32-bit lanes
typedef int32_t I32x8 __attribute__((vector_size(32)));

// Philox4x32-10 of the 4 blocks `block` (words in the low halves of 64-bit lanes) in place in c.
DDPM_AVX2_INLINE void philox4(__m256i c[4], philox::Key key) {
  const __m256i m0 = _mm256_set1_epi64x(philox::kM0), m1 = _mm256_set1_epi64x(philox::kM1);
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < 10; ++r) {
    const __m256i p0 = _mm256_mul_epu32(c[0], m0), p1 = _mm256_mul_epu32(c[2], m1);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c[1]), _mm256_set1_epi64x(k0));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c[3]), _mm256_set1_epi64x(k1));
    c[0] = n0;
    c[1] = p1;  // the low word of the product; the high half is don't-care (vpmuludq ignores it)
    c[2] = n2;
    c[3] = p0;
    k0 += philox::kW0;
    k1 += philox::kW1;
  }
}

// The four output words of Philox blocks block0 .. block0 + 7 (counter words 1..3 as philox.h's
// normal4): lane j of r[k] is word k of block block0 + j.
DDPM_AVX2_INLINE void philox_words8(uint32_t block0, philox::Key key, philox::StepWords st, __m256i r[4]) {
  __m256i a[4], b[4];
  a[0] = _mm256_add_epi64(_mm256_set1_epi64x(block0), _mm256_setr_epi64x(0, 1, 2, 3));
  b[0] = _mm256_add_epi64(a[0], _mm256_set1_epi64x(4));
  a[1] = b[1] = _mm256_set1_epi64x(st.lo);
  a[2] = b[2] = _mm256_set1_epi64x(st.hi);
  a[3] = b[3] = _mm256_set1_epi64x(philox::kNoiseStream);
  philox4(a, key);
  philox4(b, key);
  // the low dwords of a's and b's 64-bit lanes, in block order
  const __m256i low_words = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int k = 0; k < 4; ++k) {
    const __m256i lo_a = _mm256_permutevar8x32_epi32(a[k], low_words);  // a's words in dwords 0..3
    const __m256i lo_b = _mm256_permutevar8x32_epi32(b[k], low_words);
    r[k] = _mm256_permute2x128_si256(lo_a, lo_b, 0x20);
  }
}

// sqrt(-2 ln u) for u = uniform_from_bits(bits): philox.h log_unit's reduction (m in
// [sqrt(1/2), sqrt(2)), integer selections) and series, then vrsqrtps (12 bits) and one Newton
// step on the product (relative error ~2e-7).
DDPM_AVX2_INLINE __m256 radius(__m256i bits) {
  const __m256 u = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bits, 9)), _mm256_set1_ps(0x1p-23f),
                                   _mm256_set1_ps(0x1p-24f));
  const __m256i ub = _mm256_castps_si256(u);
  __m256i m_bits = _mm256_or_si256(_mm256_and_si256(ub, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F800000));
  const __m256i high = _mm256_cmpgt_epi32(m_bits, _mm256_set1_epi32(0x3FB504F3));  // -1 where m > sqrt(2)
  m_bits = _mm256_sub_epi32(m_bits, _mm256_and_si256(high, _mm256_set1_epi32(1 << 23)));  // halve m
  const __m256 e = _mm256_cvtepi32_ps(
      _mm256_sub_epi32(_mm256_sub_epi32(_mm256_srli_epi32(ub, 23), _mm256_set1_epi32(127)), high));
  const __m256 m = _mm256_castsi256_ps(m_bits);
  const __m256 v = box_muller_simd::minus_two_log(e, m);  // >= 1.19e-7 > 0
  return box_muller_simd::sqrt_from_rsqrt(v, _mm256_rsqrt_ps(v));  // 12-bit estimate
}

// sin and cos of 2 pi u for u = uniform_from_bits(bits): box_muller_simd's quarter-turn reduction
// and polynomials, then the quadrant's swap (blends) and sign flips (sin is negative in quadrants
// 2, 3: bit 1 of q, cos in 1, 2: bit 1 of q + 1).
DDPM_AVX2_INLINE void sincos_turns(__m256i bits, __m256& sin_out, __m256& cos_out) {
  U32x8 qu;
  const __m256 a = box_muller_simd::quarter_turn<__m256, I32x8>((U32x8)bits, qu);
  __m256 sp, cp;
  box_muller_simd::sin_cos_quarter(a, sp, cp);
  const __m256i q = (__m256i)qu;
  const __m256 odd = _mm256_castsi256_ps(
      _mm256_cmpeq_epi32(_mm256_and_si256(q, _mm256_set1_epi32(1)), _mm256_set1_epi32(1)));
  const __m256 sv = _mm256_blendv_ps(sp, cp, odd), cv = _mm256_blendv_ps(cp, sp, odd);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i sin_sign = _mm256_and_si256(_mm256_slli_epi32(q, 30), sign);
  const __m256i cos_sign = _mm256_and_si256(_mm256_slli_epi32(_mm256_add_epi32(q, _mm256_set1_epi32(1)), 30), sign);
  sin_out = _mm256_xor_ps(sv, _mm256_castsi256_ps(sin_sign));
  cos_out = _mm256_xor_ps(cv, _mm256_castsi256_ps(cos_sign));
}

// The 32 normals of Philox blocks block0 .. block0 + 7, in element order (out[i] = elements
// 4 block0 + 8 i .. + 7).
DDPM_AVX2_INLINE void normals32(uint32_t block0, philox::Key key, philox::StepWords st, __m256 out[4]) {
  __m256i r[4];
  philox_words8(block0, key, st, r);
  __m256 z[4];  // z[k] lane j: word-k normal of block block0 + j
  for (int pair = 0; pair < 2; ++pair) {
    const __m256 rad = radius(r[2 * pair]);
    __m256 s, c;
    sincos_turns(r[2 * pair + 1], s, c);
    z[2 * pair] = _mm256_mul_ps(rad, c);
    z[2 * pair + 1] = _mm256_mul_ps(rad, s);
  }
  // element 4 j + k = z[k][j]: interleave within 128-bit lanes (lane l of e_i: block 4 l + i), then
  // pair the lanes up
  const __m256 ab_lo = _mm256_unpacklo_ps(z[0], z[1]), ab_hi = _mm256_unpackhi_ps(z[0], z[1]);
  const __m256 cd_lo = _mm256_unpacklo_ps(z[2], z[3]), cd_hi = _mm256_unpackhi_ps(z[2], z[3]);
  const __m256 e0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab_lo), _mm256_castps_pd(cd_lo)));
  const __m256 e1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab_lo), _mm256_castps_pd(cd_lo)));
  const __m256 e2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(ab_hi), _mm256_castps_pd(cd_hi)));
  const __m256 e3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(ab_hi), _mm256_castps_pd(cd_hi)));
  out[0] = _mm256_permute2f128_ps(e0, e1, 0x20);  // blocks 0, 1
  out[1] = _mm256_permute2f128_ps(e2, e3, 0x20);  // blocks 2, 3
  out[2] = _mm256_permute2f128_ps(e0, e1, 0x31);  // blocks 4, 5
  out[3] = _mm256_permute2f128_ps(e2, e3, 0x31);  // blocks 6, 7
}

// Standard normals of elements first .. first + count - 1 of a sample (any alignment) into z;
// tmp holds count + 72 floats (csrc/cpu/normals_staging.h).
__attribute__((target("arch=x86-64-v3"))) static void fill_normals_avx2(philox::Key key, philox::StepWords st,
                                                                        int64_t first, int64_t count, float* z,
                                                                        float* tmp) {
  const NormalsStaging at(first, count, 8, z, tmp);
  for (int64_t j = 0; j < at.blocks; j += 8) {
    __m256 out[4];
    normals32(static_cast<uint32_t>(at.block0 + j), key, st, out);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(at.dst + 4 * j + 8 * i, out[i]);
  }
  at.finish(z, count);
}

#undef DDPM_AVX2_INLINE

}  // namespace philox_avx2
}  // namespace ddpm_fast

#endif  // x86-64 with GCC / Clang
