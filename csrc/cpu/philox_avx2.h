// The Philox4x32-10 words of csrc/include/philox.h for the CPU kernel's AVX2 variant, with
// intrinsics: 8 blocks at a time, each word in the low half of a 64-bit lane so that the
// 32 x 32 -> 64-bit multiply is one vpmuludq (GCC's vectorisation of philox.h's scalar mulhilo
// over 32-bit lanes spends most of its instructions on shuffles: ~290 us for the words of
// 196,608 normals on this project's Zen 4 core with AVX2, ~110 us this way). Box-Muller stays in
// philox.h's portable loops. The AVX-512 variant has its own draw (csrc/cpu/philox_avx512.h).
//
// Compiled for x86-64-v3 through function attributes; call only when the CPU has AVX2 + FMA
// (csrc/include/cpu_isa.h).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)

#include <immintrin.h>

#include <cstdint>

#include "philox.h"

namespace ddpm_fast {
namespace philox_avx2 {

#define DDPM_AVX2_INLINE static inline __attribute__((target("arch=x86-64-v3"), always_inline))

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
// normal4): r[k][j] is word k of block block0 + j.
__attribute__((target("arch=x86-64-v3"))) static inline void philox_words8(uint32_t block0, philox::Key key,
                                                                            philox::StepWords st, uint32_t r[4][8]) {
  __m256i a[4], b[4];
  a[0] = _mm256_add_epi64(_mm256_set1_epi64x(block0), _mm256_setr_epi64x(0, 1, 2, 3));
  b[0] = _mm256_add_epi64(a[0], _mm256_set1_epi64x(4));
  a[1] = b[1] = _mm256_set1_epi64x(st.lo);
  a[2] = b[2] = _mm256_set1_epi64x(st.hi);
  a[3] = b[3] = _mm256_set1_epi64x(philox::kNoiseStream);
  philox4(a, key);
  philox4(b, key);
  // the low dwords of a's and b's lanes, in block order: within each 128-bit half pick dwords 0, 2,
  // then gather the halves
  const __m256i low_words = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int k = 0; k < 4; ++k) {
    const __m256i lo_a = _mm256_permutevar8x32_epi32(a[k], low_words);  // a's words in dwords 0..3
    const __m256i lo_b = _mm256_permutevar8x32_epi32(b[k], low_words);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(r[k]), _mm256_permute2x128_si256(lo_a, lo_b, 0x20));
  }
}

#undef DDPM_AVX2_INLINE

}  // namespace philox_avx2
}  // namespace ddpm_fast

#endif  // x86-64 with GCC / Clang
