// The instruction-set-independent parts of the intrinsics draws of the CPU kernel
// (csrc/cpu/philox_avx2.h, philox_avx512.h): philox.h's Box-Muller arithmetic written once for
// GCC / Clang SIMD types (__m256, __m512 and 32-bit integer vectors of the same width: arithmetic
// operators and scalar operands work on them; the compiler fuses multiply-adds where the calling
// function's target has FMA). Each header keeps what needs its own instructions (the mantissa /
// exponent split of ln u, the reciprocal square root estimate, selections, shuffles).
#pragma once

#include <cstdint>

namespace ddpm_fast {
namespace box_muller_simd {

#define DDPM_SIMD_INLINE static inline __attribute__((always_inline))

// -2 ln u from ln u = e ln 2 + ln m, for m in [3/4, 3/2) (or [sqrt(1/2), sqrt(2))): ln m = 2 atanh(s),
// s = (m - 1) / (m + 1), |s| <= 0.2, by philox.h log_unit's series (to s^9); ln 2 split as there
// (e * hi exact).
template <class F>
DDPM_SIMD_INLINE F minus_two_log(F e, F m) {
  const F s = (m - 1.0f) / (m + 1.0f);
  const F s2 = s * s;
  const F minus_two_log_m =
      s * (-4.0f + s2 * (-4.0f / 3.0f + s2 * (-4.0f / 5.0f + s2 * (-4.0f / 7.0f + s2 * (-4.0f / 9.0f)))));
  return e * (-2.0f * 0.693145751953125f) + (e * (-2.0f * 1.428606765330187e-06f) + minus_two_log_m);
}

// sqrt(v) from an estimate y of 1 / sqrt(v): one Newton step on the product v y (squares the
// estimate's relative error: 2^-12 -> ~2e-7, 2^-14 -> ~1e-8).
template <class F>
DDPM_SIMD_INLINE F sqrt_from_rsqrt(F v, F y) {
  const F q = v * y;
  return q + q * (0.5f - q * (0.5f * y));
}

// The angle of u = uniform_from_bits(bits) = (k + 1/2) 2^-23, k = bits >> 9, reduced to a quarter
// turn: q = (k + 2^20) >> 21 (0..4, the nearest quarter) and 2 pi u - q pi / 2 = 2 pi (k - q 2^21
// + 1/2) 2^-23, the remainder computed exactly in integers. U: unsigned 32-bit lanes, I: signed.
template <class F, class I, class U>
DDPM_SIMD_INLINE F quarter_turn(U bits, U& q) {
  const U kq = (bits >> 9) + (1u << 20);
  q = kq >> 21;
  const I d = (I)(kq & ((1u << 21) - 1)) - (1 << 20);  // (I): the same bits as signed lanes
  constexpr float kTwoPi = 6.28318530717958647692f;
  return __builtin_convertvector(d, F) * (kTwoPi * 0x1p-23f) + kTwoPi * 0x1p-24f;
}

// sin a and cos a for |a| <= pi / 4: philox.h sincos_turns' Taylor polynomials (sin to a^9, cos to
// a^8; the a^10 term of cos is below 3e-8 there).
template <class F>
DDPM_SIMD_INLINE void sin_cos_quarter(F a, F& sin_a, F& cos_a) {
  const F a2 = a * a;
  sin_a = a + a * a2 * (-1.0f / 6.0f + a2 * (1.0f / 120.0f + a2 * (-1.0f / 5040.0f + a2 * (1.0f / 362880.0f))));
  cos_a = 1.0f + a2 * (-0.5f + a2 * (1.0f / 24.0f + a2 * (-1.0f / 720.0f + a2 * (1.0f / 40320.0f))));
}

#undef DDPM_SIMD_INLINE

}  // namespace box_muller_simd
}  // namespace ddpm_fast
