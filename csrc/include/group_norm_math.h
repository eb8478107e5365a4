// Per-element math of group_norm_scale_shift (ADM's AdaGN), shared by the CPU (.cpp) and CUDA (.cu)
// kernels so that both compute exactly the same thing:
//
//   y = SiLU?( ((x - mean) * rstd * weight + bias) * (1 + scale) + shift )
//
// folded per (n, c) into one affine map y = a * x + b (then the optional SiLU), with mean/rstd the
// statistics of x's group (n, c / (C / num_groups)).
//
// Statistics are carried as Moments {count, mean, m2 = sum (x - mean)^2} and merged with Chan's
// parallel formula, which stays accurate when the mean is large relative to the spread (unlike
// E[x^2] - E[x]^2). T is float on the GPU and double for the CPU's per-channel / per-group merges.
//
// The GPU kernel keeps every Moments of a group in one frame: values minus the group's shift (its
// first element), subtracted before any arithmetic. Its threads build moments by Welford's update
// (welford_step, one value per channel) or from short runs (moments_of_run: a run of K values of
// one group, two passes over registers) merged with Chan's formula, so no sum of squares is ever
// formed. In fp32 a large mean (1e4 + N(0, 1): ulp(1e4) = 1e-3) would otherwise enter every
// update's rounding and, through Chan's delta term, m2 to first order (~1e-5 relative); in the
// shifted frame means are O(spread) and rounding stays at fp32's 6e-8 relative.
#pragma once

#include <cmath>
#include <cstdint>

#include "ddpm_fast_common.h"

namespace ddpm_fast {
namespace gn {

template <typename T>
struct Moments {
  T count;  // number of values
  T mean;   // their mean
  T m2;     // sum of squared deviations from the mean
};

template <typename T>
DDPM_HD Moments<T> moments_empty() {
  return Moments<T>{T(0), T(0), T(0)};
}

// Welford's update with one value.
template <typename T>
DDPM_HD Moments<T> moments_push(Moments<T> m, T x) {
  m.count += T(1);
  const T delta = x - m.mean;
  m.mean += delta / m.count;
  m.m2 += delta * (x - m.mean);
  return m;
}

// Chan et al.: the moments of the union of two disjoint sets.
template <typename T>
DDPM_HD Moments<T> moments_merge(Moments<T> a, Moments<T> b) {
  const T count = a.count + b.count;
  if (b.count == T(0)) return a;
  if (a.count == T(0)) return b;
  const T wb = b.count / count;
  const T delta = b.mean - a.mean;
  Moments<T> r;
  r.count = count;
  r.mean = a.mean + delta * wb;
  r.m2 = a.m2 + b.m2 + delta * delta * a.count * wb;
  return r;
}

// Welford's update of one running (mean, m2) with the value d when the count has just become
// 1 / inv_count: channels that see the same number of values share the reciprocal.
template <typename T>
DDPM_HD void welford_step(T& mean, T& m2, T d, T inv_count) {
  const T delta = d - mean;
  mean += delta * inv_count;
  m2 += delta * (d - mean);
}

// Moments of the K values d[0..K) (two passes over registers: mean, then squared deviations).
// K is a power of two, so the mean is the sum scaled exactly.
template <int K, typename T>
DDPM_HD Moments<T> moments_of_run(const T (&d)[K]) {
  static_assert(K > 0 && (K & (K - 1)) == 0, "K must be a power of two");
  T sum = T(0);
#pragma unroll
  for (int k = 0; k < K; ++k) sum += d[k];
  const T mean = sum * (T(1) / T(K));
  T m2 = T(0);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const T dev = d[k] - mean;
    m2 += dev * dev;
  }
  return Moments<T>{T(K), mean, m2};
}

// True when moments from shifted sums (below) are ill-conditioned: s2 - s1^2 / count multiplies
// the rounding of the fp32 squares by 1 + (mean - shift)^2 / var, so a shift more than two standard
// deviations away (e.g. an outlier as the first value: 4e-5 relative variance error) needs a second
// pass with a better shift (the CPU kernel's first shift is one value of the data).
template <typename T>
DDPM_HD bool shift_is_far(const Moments<T>& m, T shift) {
  const T off = m.mean - shift;
  return off * off * m.count > T(4) * m.m2;
}

// Moments of `count` values x_i given s1 = sum(x_i - shift) and s2 = sum((x_i - shift)^2).
// Choosing `shift` close to the data (e.g. one of the values) keeps s2 - s1^2/count well conditioned.
template <typename T>
DDPM_HD Moments<T> moments_from_shifted_sums(T count, T shift, T s1, T s2) {
  if (count == T(0)) return moments_empty<T>();
  const T m = s1 / count;
  T m2 = s2 - s1 * m;
  if (m2 < T(0)) m2 = T(0);  // rounding can push a zero spread slightly negative
  return Moments<T>{count, shift + m, m2};
}

// 1 / sqrt(population variance + eps) of a group.
template <typename T>
DDPM_HD T group_rstd(Moments<T> m, T eps) {
  const T var = m.count > T(0) ? m.m2 / m.count : T(0);
  return T(1) / sqrt(var + eps);
}

// The per-(n, c) affine map y = a * x + b equal to
//   ((x - mean) * rstd * weight + bias) * (1 + scale) + shift.
// Absent weight/bias/scale/shift are passed as 1/0/0/0.
template <typename T>
struct ChannelAffine {
  T a;
  T b;
};

template <typename T>
DDPM_HD ChannelAffine<T> channel_affine(T mean, T rstd, T weight, T bias, T scale, T shift) {
  const T gain = rstd * weight;  // multiplies x - mean
  const T mod = T(1) + scale;    // AdaGN's (1 + scale)
  ChannelAffine<T> r;
  r.a = gain * mod;
  r.b = (bias - mean * gain) * mod + shift;
  return r;
}

// The CPU kernels' vector exp (group_norm_cpu_simd_begin.h and the AVX-512 SiLU): e^r ~ p(r) on
// [-ln2/2, ln2/2], degree-4 minimax coefficients, highest degree first (relative error < 3e-6).
constexpr float kExpPoly[5] = {0.041513849f, 0.167874739f, 0.50003016f, 0.99996686f, 1.0f};
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

DDPM_HD float silu(float v) {
  return v / (1.0f + expf(-v));
}

// SiLU for fp16/bf16 outputs: on the GPU the fast exp (__expf, ex2.approx: a few ulp of fp32 for
// |v| < 30, ~1e-6 relative at |v| = 80) and division (__fdividef, rcp.approx: 2 ulp; v / inf gives
// -0 for v < -88 as the exact form does), errors far below the outputs' rounding (2^-11 / 2^-8
// relative). fp32 outputs use the exact silu. Elsewhere (the CPU kernel, which has its own vector
// SiLU) the exact one; the SIMT harness provides both intrinsics (tests/simt/simt.h).
DDPM_HD float silu_fast(float v) {
#if defined(__CUDA_ARCH__)
  return __fdividef(v, 1.0f + __expf(-v));
#else
  return silu(v);
#endif
}

// The fused normalise + affine + scale-shift (+ SiLU) of one element, in fp32.
DDPM_HD float apply_element(float x, float a, float b, bool use_silu) {
  const float y = fmaf(a, x, b);
  return use_silu ? silu(y) : y;
}

// The same with silu_fast (kFast) or the exact SiLU.
template <bool kFast>
DDPM_HD float apply_element_as(float x, float a, float b, bool use_silu) {
  const float y = fmaf(a, x, b);
  if (!use_silu) return y;
  return kFast ? silu_fast(y) : silu(y);
}

// ---- backward ------------------------------------------------------------------------------------
//
// With xhat = (x - mean) * rstd, h = xhat * weight + bias, m = 1 + scale, z = h * m + shift (the
// pre-SiLU output, recomputed as z = a * x + b with channel_affine's (a, b)) and y = SiLU(z) or z:
//   dz          = dy * SiLU'(z)  (or dy),   SiLU'(z) = s (1 + z (1 - s)),  s = sigmoid(z)
//   dshift[n,c] = sum_p dz                                   =: A[n,c]
//   dscale[n,c] = sum_p dz * h = weight * B + bias * A,        B[n,c] := sum_p dz * xhat
//   dbias[c]    = sum_n sum_p dz * m = sum_n m * A
//   dweight[c]  = sum_n sum_p dz * m * xhat = sum_n m * B
// and through the normalisation, with dxhat = dz * m * weight and the group means over its
// K = (C/G) * pixels values, c1 = mean_g(dxhat) = sum_c m w A / K, c2 = mean_g(dxhat * xhat) =
// sum_c m w B / K (the derivative of (x - mean) * rstd with mean and rstd depending on x):
//   dx = rstd * (dxhat - c1 - xhat * c2)
//      = alpha * dz + beta * (x - mean) + gamma,   alpha = rstd m w, beta = -rstd^2 c2, gamma = -rstd c1.
// (x - mean) rather than x with a folded constant: with a large mean, beta * x + (gamma - beta *
// mean) would cancel to ulp(beta * x).

// SiLU'(z) = s + z s (1 - s), s = sigmoid(z); tends to 0 (z -> -inf) and 1 (z -> +inf). On the
// GPU with the fast exp and division (a few ulp of fp32, far below the gradients' tolerance; and
// no IEEE-division subroutine call, whose register saves would give the kernels a stack frame):
// for z < -88 the divisor is inf and s = 0, as the exact form gives.
DDPM_HD float silu_grad(float z) {
#if defined(__CUDA_ARCH__)
  const float s = __fdividef(1.0f, 1.0f + __expf(-z));
#else
  const float s = 1.0f / (1.0f + expf(-z));
#endif
  return s * (1.0f + z * (1.0f - s));
}

// d loss / d z of one element from d loss / d y, at z = a * x + b (the forward's fused map).
DDPM_HD float dz_element(float x, float dy, float a, float b, bool use_silu) {
  return use_silu ? dy * silu_grad(fmaf(a, x, b)) : dy;
}

// What one (n, c) contributes, from its sums A = sum_p dz and B = sum_p dz * xhat.
template <typename T>
struct ChannelGrads {
  T dscale;    // (N, C) gradient of scale
  T dshift;    // (N, C) gradient of shift
  T dweight;   // m * B: summed over n, the gradient of weight
  T dbias;     // m * A: summed over n, the gradient of bias
  T dxhat;     // m * weight * A: summed over the group's channels, K * c1
  T dxhat_x;   // m * weight * B: summed over the group's channels, K * c2
};

// Absent weight/bias/scale are passed as 1/0/0.
template <typename T>
DDPM_HD ChannelGrads<T> channel_grads(T A, T B, T weight, T bias, T scale) {
  const T mod = T(1) + scale;
  ChannelGrads<T> r;
  r.dscale = weight * B + bias * A;
  r.dshift = A;
  r.dweight = mod * B;
  r.dbias = mod * A;
  r.dxhat = mod * weight * A;
  r.dxhat_x = mod * weight * B;
  return r;
}

// dx = alpha * dz + beta * (x - mean) + gamma of one (n, c): alpha per channel, beta and gamma
// per group, from the group's sums of ChannelGrads::dxhat / dxhat_x over its `count` values.
template <typename T>
struct DxAffine {
  T alpha, beta, gamma;
};

template <typename T>
DDPM_HD DxAffine<T> dx_affine(T rstd, T weight, T scale, T sum_dxhat, T sum_dxhat_x, T count) {
  const T inv = count > T(0) ? T(1) / count : T(0);
  DxAffine<T> r;
  r.alpha = rstd * (T(1) + scale) * weight;
  r.beta = -rstd * rstd * sum_dxhat_x * inv;
  r.gamma = -rstd * sum_dxhat * inv;
  return r;
}

// dx of one element.
DDPM_HD float dx_element(float x, float dz, float mean, float alpha, float beta, float gamma) {
  return fmaf(alpha, dz, fmaf(beta, x - mean, gamma));
}

}  // namespace gn
}  // namespace ddpm_fast
