// Counter-based Gaussian noise shared by the CPU and CUDA kernels: Philox4x32-10 + Box-Muller.
//
// The construction is defined in ONE place, the docstring of ddpm_fast/philox.py (the PyTorch
// reference); kernels/diffusion_step.py is the Triton copy. In short, element i of a sample with
// seed `seed` at step id `step` is lane i % 4 of the Box-Muller pairs of
//   Philox4x32_10(counter = (i / 4, step lo, step hi, kNoiseStream), key = (seed lo, seed hi)).
// Change the three implementations together.
//
// Everything here is branch-free scalar code (DDPM_HD): the CUDA kernels call it per thread and the
// CPU kernel calls it lane by lane in loops that the compiler vectorises (with intrinsics versions of
// the same construction where they pay: csrc/cpu/philox_avx512.h, csrc/cpu/philox_avx2.h), which is
// why log and sin/cos are small polynomials here rather than libm calls (accurate to ~1e-7 absolute
// on the ranges used; other backends' libm results differ by rounding only).
#pragma once

#include <cmath>
#include <cstdint>

#include "ddpm_fast_common.h"

namespace ddpm_fast {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // Weyl key increments
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr uint32_t kNoiseStream = 0x4E4F4953u;  // counter word 3 of every noise draw
constexpr int64_t kInitialNoiseStep = -1;       // the step id that draws x_T

struct Key {
  uint32_t k0, k1;
};

// The key of a sample's int64 seed (two's complement words: low, high).
DDPM_HD_INLINE Key key_of_seed(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return Key{static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32)};
}

// Counter words 1 and 2: the step id's low and high words.
struct StepWords {
  uint32_t lo, hi;
};

DDPM_HD_INLINE StepWords step_words(int64_t step) {
  const uint64_t s = static_cast<uint64_t>(step);
  return StepWords{static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32)};
}

// The high and low words of the 32 x 32 -> 64-bit product m * c.
DDPM_HD_INLINE void mulhilo(uint32_t m, uint32_t c, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(m, c);
#else
  hi = static_cast<uint32_t>((static_cast<uint64_t>(m) * c) >> 32);
#endif
  lo = m * c;
}

// Random123's Philox4x32 with 10 rounds, on the counter c in place.
DDPM_HD_INLINE void philox4x32_10(uint32_t c[4], Key key) {
  uint32_t k0 = key.k0, k1 = key.k1;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c[0], hi0, lo0);
    mulhilo(kM1, c[2], hi1, lo1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0;
    const uint32_t n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
    k0 += kW0;
    k1 += kW1;
  }
}

DDPM_HD_INLINE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

DDPM_HD_INLINE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// A 32-bit word -> (floor(r / 2^9) + 1/2) / 2^23, a uniform in (0, 1) computed exactly.
DDPM_HD_INLINE float uniform_from_bits(uint32_t r) {
  return (static_cast<float>(static_cast<int32_t>(r >> 9)) + 0.5f) * 1.1920928955078125e-07f;
}

// ln(u) for a normal float u in (0, 1]: u = m 2^e with m in [sqrt(1/2), sqrt(2)),
// ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172, by its series to s^9.
// (Selections are integer arithmetic so that compilers if-convert and vectorise the CPU loops.)
DDPM_HD_INLINE float log_unit(float u) {
  const uint32_t bits = float_bits(u);
  uint32_t m_bits = (bits & 0x007FFFFFu) | 0x3F800000u;  // m in [1, 2)
  const uint32_t high = m_bits > 0x3FB504F3u ? 1u : 0u;   // m > sqrt(2): halve m
  m_bits -= high << 23;
  const int e = static_cast<int>(bits >> 23) - 127 + static_cast<int>(high);
  const float m = bits_float(m_bits);
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  const float series =
      1.0f + s2 * (1.0f / 3.0f + s2 * (1.0f / 5.0f + s2 * (1.0f / 7.0f + s2 * (1.0f / 9.0f))));
  const float fe = static_cast<float>(e);
  constexpr float kLn2Hi = 0.693145751953125f;     // ln 2 = hi + lo, hi with 16 significant bits
  constexpr float kLn2Lo = 1.428606765330187e-06f;  // so that fe * hi is exact
  return fe * kLn2Hi + (fe * kLn2Lo + 2.0f * s * series);
}

// sin(2 pi u) and cos(2 pi u) for u in [0, 1): exact reduction to a quarter turn plus
// |a| <= pi / 4, then Taylor polynomials (errors below 2e-9 before rounding).
DDPM_HD_INLINE void sincos_turns(float u, float& sin_out, float& cos_out) {
  const float q = rintf(4.0f * u);    // nearest quarter turn, 0..4
  const float f = u - 0.25f * q;      // exact, |f| <= 1/8
  const float a = f * 6.28318530717958647692f;
  const float a2 = a * a;
  const float sp =
      a * (1.0f + a2 * (-1.0f / 6.0f + a2 * (1.0f / 120.0f + a2 * (-1.0f / 5040.0f + a2 * (1.0f / 362880.0f)))));
  const float cp =
      1.0f + a2 * (-0.5f + a2 * (1.0f / 24.0f + a2 * (-1.0f / 720.0f +
                                                       a2 * (1.0f / 40320.0f + a2 * (-1.0f / 3628800.0f)))));
  const uint32_t quadrant = static_cast<uint32_t>(static_cast<int32_t>(q)) & 3u;
  const float sv = (quadrant & 1u) ? cp : sp;
  const float cv = (quadrant & 1u) ? sp : cp;
  // negate by flipping the sign bit: quadrants 2, 3 for sin, 1, 2 for cos
  sin_out = bits_float(float_bits(sv) ^ ((quadrant >> 1) << 31));
  cos_out = bits_float(float_bits(cv) ^ (((quadrant ^ (quadrant >> 1)) & 1u) << 31));
}

// sqrt(v) for v > 0 (1-2 ulp). On the host it avoids libm's sqrtf, whose errno side effect keeps
// GCC from vectorising loops (the build does not pass -fno-math-errno): the bit-level estimate
// of 1 / sqrt(v), two Newton steps (relative error 5e-6), then one Newton step on sqrt itself.
DDPM_HD_INLINE float sqrt_positive(float v) {
#if defined(__CUDA_ARCH__)
  return sqrtf(v);
#else
  float y = bits_float(0x5F3759DFu - (float_bits(v) >> 1));
  y = y * (1.5f - 0.5f * v * y * y);
  y = y * (1.5f - 0.5f * v * y * y);
  const float s = v * y;
  return s + 0.5f * y * (v - s * s);
#endif
}

// Box-Muller: two words -> two independent standard normals (r cos, r sin).
DDPM_HD_INLINE void box_muller(uint32_t radius_bits, uint32_t angle_bits, float& z_cos, float& z_sin) {
  const float radius = sqrt_positive(-2.0f * log_unit(uniform_from_bits(radius_bits)));
  float s, c;
  sincos_turns(uniform_from_bits(angle_bits), s, c);
  z_cos = radius * c;
  z_sin = radius * s;
}

// The four normals of Philox block `block` (elements 4 block .. 4 block + 3 of the sample).
DDPM_HD_INLINE void normal4(Key key, StepWords step, uint32_t block, float z[4]) {
  uint32_t c[4] = {block, step.lo, step.hi, kNoiseStream};
  philox4x32_10(c, key);
  box_muller(c[0], c[1], z[0], z[1]);
  box_muller(c[2], c[3], z[2], z[3]);
}

// The normal of element `index` alone (one Philox block per call: use normal4 where 4 aligned
// consecutive elements are needed).
DDPM_HD_INLINE float normal_at(Key key, StepWords step, uint64_t index) {
  uint32_t c[4] = {static_cast<uint32_t>(index >> 2), step.lo, step.hi, kNoiseStream};
  philox4x32_10(c, key);
  const int lane = static_cast<int>(index & 3);
  float z_cos, z_sin;
  box_muller(lane < 2 ? c[0] : c[2], lane < 2 ? c[1] : c[3], z_cos, z_sin);
  return (lane & 1) ? z_sin : z_cos;
}

}  // namespace philox
}  // namespace ddpm_fast
