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

DDPM_HD float silu(float v) {
  return v / (1.0f + expf(-v));
}

// The fused normalise + affine + scale-shift (+ SiLU) of one element, in fp32.
DDPM_HD float apply_element(float x, float a, float b, bool use_silu) {
  const float y = fmaf(a, x, b);
  return use_silu ? silu(y) : y;
}

}  // namespace gn
}  // namespace ddpm_fast
