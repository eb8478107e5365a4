// The CPU kernel's AVX-512 draw of the Philox4x32-10 + Box-Muller normals of csrc/include/philox.h:
// the same construction (ddpm_fast/philox.py defines it), written with intrinsics for 16 Philox blocks
// = 64 consecutive elements at a time. The 196,608 normals of a (16, 3, 64, 64) step take about
// 110 us on one AVX-512 core (Zen 4) this way; the portable loops over philox.h that this replaced
// for AVX-512 took about 145 us, mostly because here
//   * the Philox words are carried in 64-bit lanes, so the 32 x 32 -> 64-bit multiply is one
//     vpmuludq and the three-way XOR one vpternlogq; the block-independent halves of rounds 0
//     and 1 are scalar;
//   * ln u takes its exponent and mantissa from vgetexpps / vgetmantps, the square root is
//     vrsqrt14ps plus one Newton step, and the quarter-turn reduction of the angle is integer
//     arithmetic on the Philox word (csrc/cpu/box_muller_simd.h: the arithmetic shared with the
//     AVX2 draw, csrc/cpu/philox_avx2.h).
// Results agree with philox.h's to float rounding (|dz| < 1e-6; the contract between backends is
// 1e-5, tests/test_diffusion_step.py checks the drawn noise against the reference).
//
// Everything here is compiled for x86-64-v4 through function attributes (the extension is built for
// the baseline ISA); only fill_normals_avx512 may be called, and only when the CPU has AVX-512
// (csrc/include/cpu_isa.h).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

#include <cstdint>

#include "box_muller_simd.h"
#include "normals_staging.h"
#include "philox.h"

// GCC 12 reports its own _mm512_undefined_* (self-initialised on purpose) as "may be used
// uninitialized" in every function that inlines these intrinsics: a false positive.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace ddpm_fast {
namespace philox_avx512 {

#define DDPM_AVX512_INLINE static inline __attribute__((target("arch=x86-64-v4"), always_inline))

typedef uint32_t U32x16 __attribute__((vector_size(64)));  // the words as 32-bit lanes
typedef int32_t I32x16 __attribute__((vector_size(64)));

// The high word of m * c for the word c in the low half of each 64-bit lane; lo gets the product
// itself (its low half is the low word; the high half is don't-care, vpmuludq ignores it).
DDPM_AVX512_INLINE __m512i mulhilo(__m512i c, __m512i m, __m512i& lo) {
  lo = _mm512_mul_epu32(c, m);
  return _mm512_srli_epi64(lo, 32);
}

// Philox4x32-10 of the 8 blocks `block` (64-bit lanes) into w[0..3] (words in the low halves).
// Counter words 1..3 (step lo, step hi, stream) are the same for every block, so rounds 0 and 1
// have scalar halves: hi / lo of M1 * step_hi (round 0) and of M0 * c0' (round 1, where
// c0' = hi(M1 step_hi) ^ step_lo ^ k0 does not depend on the block).
DDPM_AVX512_INLINE void philox8(__m512i block, philox::Key key, philox::StepWords st, __m512i w[4]) {
  const __m512i m0 = _mm512_set1_epi64(philox::kM0), m1 = _mm512_set1_epi64(philox::kM1);
  uint32_t k0 = key.k0, k1 = key.k1;
  uint32_t hi1, lo1, hi0, lo0;
  philox::mulhilo(philox::kM1, st.hi, hi1, lo1);               // round 0, scalar half
  const uint32_t c0_1 = hi1 ^ st.lo ^ k0;                       // c0 after round 0
  philox::mulhilo(philox::kM0, c0_1, hi0, lo0);                 // round 1, scalar half
  k0 += philox::kW0;
  k1 += philox::kW1;
  __m512i l0, l1;
  const __m512i h0 = mulhilo(block, m0, l0);                                          // round 0
  const __m512i c2_1 = _mm512_xor_si512(h0, _mm512_set1_epi64(philox::kNoiseStream ^ key.k1));
  const __m512i h1 = mulhilo(c2_1, m1, l1);                                           // round 1
  __m512i c0 = _mm512_xor_si512(h1, _mm512_set1_epi64(lo1 ^ k0));
  __m512i c1 = l1;
  __m512i c2 = _mm512_xor_si512(l0, _mm512_set1_epi64(hi0 ^ k1));
  __m512i c3 = _mm512_set1_epi64(lo0);
  for (int r = 2; r < 10; ++r) {
    k0 += philox::kW0;
    k1 += philox::kW1;
    __m512i lo_0, lo_1;
    const __m512i hi_0 = mulhilo(c0, m0, lo_0), hi_1 = mulhilo(c2, m1, lo_1);
    c0 = _mm512_ternarylogic_epi64(hi_1, c1, _mm512_set1_epi64(k0), 0x96);  // 0x96: a ^ b ^ c
    c2 = _mm512_ternarylogic_epi64(hi_0, c3, _mm512_set1_epi64(k1), 0x96);
    c1 = lo_1;
    c3 = lo_0;
  }
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

// sqrt(-2 ln u) for the uniform u = uniform_from_bits(bits): ln u = e ln 2 + ln m with
// m = getmant(u) in [3/4, 3/2) and e = getexp(4u / 3) its exponent, ln m = 2 atanh(s) with
// s = (m - 1) / (m + 1), |s| <= 0.2, by its series to s^9 (philox.h log_unit's series).
DDPM_AVX512_INLINE __m512 radius(__m512i bits) {
  const __m512 u = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bits, 9)), _mm512_set1_ps(0x1p-23f),
                                   _mm512_set1_ps(0x1p-24f));
  const __m512 m = _mm512_getmant_ps(u, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
  const __m512 e = _mm512_getexp_ps(_mm512_mul_ps(u, _mm512_set1_ps(4.0f / 3.0f)));
  const __m512 v = box_muller_simd::minus_two_log(e, m);  // >= 1.19e-7 > 0
  return box_muller_simd::sqrt_from_rsqrt(v, _mm512_rsqrt14_ps(v));  // 14-bit estimate
}

// sin and cos of 2 pi u for u = uniform_from_bits(bits): box_muller_simd's quarter-turn reduction
// and polynomials, then the quadrant's swap (mask blends) and sign flips (0x78: a ^ (b & c); sin is
// negative in quadrants 2, 3: bit 1 of q, cos in 1, 2: bit 1 of q + 1).
DDPM_AVX512_INLINE void sincos_turns(__m512i bits, __m512& sin_out, __m512& cos_out) {
  U32x16 q;
  const __m512 a = box_muller_simd::quarter_turn<__m512, I32x16>((U32x16)bits, q);
  __m512 sp, cp;
  box_muller_simd::sin_cos_quarter(a, sp, cp);
  const __m512i qi = (__m512i)q;
  const __mmask16 odd = _mm512_test_epi32_mask(qi, _mm512_set1_epi32(1));
  const __m512i sv = _mm512_castps_si512(_mm512_mask_blend_ps(odd, sp, cp));
  const __m512i cv = _mm512_castps_si512(_mm512_mask_blend_ps(odd, cp, sp));
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  sin_out = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(sv, _mm512_slli_epi32(qi, 30), sign, 0x78));
  cos_out = _mm512_castsi512_ps(
      _mm512_ternarylogic_epi32(cv, _mm512_slli_epi32(_mm512_add_epi32(qi, _mm512_set1_epi32(1)), 30), sign, 0x78));
}

// The 64 normals of Philox blocks block0 .. block0 + 15, in element order (out[i] = elements
// 4 block0 + 16 i .. + 15).
DDPM_AVX512_INLINE void normals64(uint32_t block0, philox::Key key, philox::StepWords st, __m512 out[4]) {
  const __m512i first = _mm512_add_epi64(_mm512_set1_epi64(block0), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  __m512i a[4], b[4];
  philox8(first, key, st, a);
  philox8(_mm512_add_epi64(first, _mm512_set1_epi64(8)), key, st, b);
  const __m512i low_words = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  __m512 z[4];  // z[k] lane j: word-k normal of block block0 + j
  for (int pair = 0; pair < 2; ++pair) {
    const __m512i radius_bits = _mm512_permutex2var_epi32(a[2 * pair], low_words, b[2 * pair]);
    const __m512i angle_bits = _mm512_permutex2var_epi32(a[2 * pair + 1], low_words, b[2 * pair + 1]);
    const __m512 r = radius(radius_bits);
    __m512 s, c;
    sincos_turns(angle_bits, s, c);
    z[2 * pair] = _mm512_mul_ps(r, c);
    z[2 * pair + 1] = _mm512_mul_ps(r, s);
  }
  // element 4 j + k = z[k][j]: interleave the four within 128-bit lanes, then transpose the lanes
  const __m512 ab_lo = _mm512_unpacklo_ps(z[0], z[1]), ab_hi = _mm512_unpackhi_ps(z[0], z[1]);
  const __m512 cd_lo = _mm512_unpacklo_ps(z[2], z[3]), cd_hi = _mm512_unpackhi_ps(z[2], z[3]);
#define DDPM_PD _mm512_castps_pd
  const __m512 e0 = _mm512_castpd_ps(_mm512_unpacklo_pd(DDPM_PD(ab_lo), DDPM_PD(cd_lo)));  // 128-bit lane l: block 4 l
  const __m512 e1 = _mm512_castpd_ps(_mm512_unpackhi_pd(DDPM_PD(ab_lo), DDPM_PD(cd_lo)));  // block 4 l + 1
  const __m512 e2 = _mm512_castpd_ps(_mm512_unpacklo_pd(DDPM_PD(ab_hi), DDPM_PD(cd_hi)));  // block 4 l + 2
  const __m512 e3 = _mm512_castpd_ps(_mm512_unpackhi_pd(DDPM_PD(ab_hi), DDPM_PD(cd_hi)));  // block 4 l + 3
#undef DDPM_PD
  const __m512 t0 = _mm512_shuffle_f32x4(e0, e1, 0x44), t1 = _mm512_shuffle_f32x4(e0, e1, 0xEE);
  const __m512 t2 = _mm512_shuffle_f32x4(e2, e3, 0x44), t3 = _mm512_shuffle_f32x4(e2, e3, 0xEE);
  out[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
  out[1] = _mm512_shuffle_f32x4(t0, t2, 0xDD);
  out[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
  out[3] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
}

// Standard normals of elements first .. first + count - 1 of a sample (any alignment) into z;
// tmp holds count + 72 floats (csrc/cpu/normals_staging.h).
__attribute__((target("arch=x86-64-v4"))) static void fill_normals_avx512(philox::Key key, philox::StepWords st,
                                                                          int64_t first, int64_t count, float* z,
                                                                          float* tmp) {
  const NormalsStaging at(first, count, 16, z, tmp);
  for (int64_t j = 0; j < at.blocks; j += 16) {
    __m512 out[4];
    normals64(static_cast<uint32_t>(at.block0 + j), key, st, out);
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(at.dst + 4 * j + 16 * i, out[i]);
  }
  at.finish(z, count);
}

#undef DDPM_AVX512_INLINE

}  // namespace philox_avx512
}  // namespace ddpm_fast

#pragma GCC diagnostic pop

#endif  // x86-64 with GCC / Clang
