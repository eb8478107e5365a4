// Per-element math of the fused reverse diffusion step, shared by the CPU and CUDA kernels.
// The definition is ddpm_fast/reference.py diffusion_step; the coefficient columns and option codes
// mirror ddpm_fast/step_layout.py (change them together; kernels/diffusion_step.py is the Triton
// copy).
//
// step_element<T> is generic over the value type: float in the CUDA kernels (one element per call),
// a fixed-width SIMD value in the CPU kernel (csrc/cpu/diffusion_step.cpp). T needs +, -, * and /
// with T and float operands, construction from float, and the overloads step_exp(T) and
// step_clamp(T, float, float) (found by argument-dependent lookup for class types).
#pragma once

#include <cmath>
#include <cstdint>

#include "ddpm_fast_common.h"

namespace ddpm_fast {
namespace step {

// ---- ddpm_fast/step_layout.py: coefficient columns of coef (B, kNumCoefs) float32 -------------
enum Column : int {
  kSqrtRecipAb = 0,    // 1 / sqrt(ab)
  kSqrtRecipm1Ab = 1,  // sqrt(1 / ab - 1)
  kSqrtAb = 2,         // sqrt(ab)
  kSqrt1mAb = 3,       // sqrt(1 - ab)
  kPostCoef1 = 4,      // posterior mean coefficient of x0
  kPostCoef2 = 5,      // posterior mean coefficient of x_t
  kLogVarMin = 6,      // DDPM log variance (fixed), or the min end of learned_range
  kLogVarMax = 7,      // learned_range: the max end (log beta)
  kVariance = 8,       // DDPM fixed variance used by classifier guidance
  kSqrtAbPrev = 9,     // DDIM sqrt(ab_prev)
  kDdimDir = 10,       // DDIM coefficient of eps
  kDdimSigma = 11,     // DDIM sigma (eta inside)
  kNonzero = 12,       // 1 when the step adds noise
  kNumCoefs = 13,
};

// ---- ddpm_fast/step_layout.py: option codes (index in METHODS, PREDICTIONS, ...) ---------------
enum Method : int { kDdpm = 0, kDdim = 1 };
enum Prediction : int { kEpsilon = 0, kPredX0 = 1, kPredV = 2 };
enum Variance : int { kFixedSmall = 0, kFixedLarge = 1, kLearnedRange = 2, kLearned = 3 };
enum NoiseMode : int { kNoiseNormal = 0, kNoiseSquared = 1, kNoiseZero = 2 };
enum Projection : int { kProjectNone = 0, kProjectPixel = 1, kProjectSample = 2 };

DDPM_HD_INLINE bool learned_variance(int variance) { return variance == kLearnedRange || variance == kLearned; }

// The options of one call, uniform over the batch.
struct Options {
  int method;
  int prediction;
  int variance;
  int noise_mode;
  int projection;
  bool clip_denoised;
  bool eps_from_x0;
  bool has_grad;
};

// One sample's coefficient row, plus the per-sample values the fixed variances derive from it.
struct Coefs {
  float c[kNumCoefs];
  float fixed_std;  // exp(0.5 * c[kLogVarMin])
  float recip_sqrt_recipm1_ab;  // 1 / c[kSqrtRecipm1Ab]: eps from x0 multiplies (no per-element division)

  DDPM_HD_INLINE float operator[](int i) const { return c[i]; }
};

DDPM_HD_INLINE Coefs load_coefs(const float* row) {
  Coefs k;
  for (int i = 0; i < kNumCoefs; ++i) k.c[i] = row[i];
  k.fixed_std = expf(0.5f * k.c[kLogVarMin]);
  k.recip_sqrt_recipm1_ab = 1.0f / k.c[kSqrtRecipm1Ab];
  return k;
}

// Scalar overloads of the helpers step_element uses (a SIMD type brings its own).
DDPM_HD_INLINE float step_exp(float v) { return expf(v); }

// Like torch.clamp: NaN stays NaN.
DDPM_HD_INLINE float step_clamp(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// What an element's step yields before noise, projection and clip:
// x_new = x_det + scale * z, the predicted x0 (the value returned as pred_x0).
template <class T>
struct Values {
  T x_det;
  T x0;
  T scale;
};

// One element (or one SIMD value of elements) of one sample. pred is the model's eps / x0 / v,
// var_out its variance channel (read only for learned variances with DDPM), grad the classifier
// guidance gradient (read only when o.has_grad).
template <class T>
DDPM_HD_INLINE Values<T> step_element(const Coefs& k, const Options& o, T x, T pred, T var_out, T grad) {
  T x0_raw = pred;
  if (o.prediction == kEpsilon) {
    x0_raw = k[kSqrtRecipAb] * x - k[kSqrtRecipm1Ab] * pred;
  } else if (o.prediction == kPredV) {
    x0_raw = k[kSqrtAb] * x - k[kSqrt1mAb] * pred;
  }
  T x0 = o.clip_denoised ? step_clamp(x0_raw, -1.0f, 1.0f) : x0_raw;

  T x_det = x0;
  T std = T(0.0f);
  if (o.method == kDdpm) {
    T mean = k[kPostCoef1] * x0 + k[kPostCoef2] * x;
    if (o.variance == kFixedSmall || o.variance == kFixedLarge) {
      if (o.has_grad) mean = mean + k[kVariance] * grad;
      std = T(k.fixed_std);
    } else {
      T log_var = var_out;
      if (o.variance == kLearnedRange) {
        const T frac = (var_out + 1.0f) / 2.0f;
        log_var = frac * k[kLogVarMax] + (1.0f - frac) * k[kLogVarMin];
      }
      if (o.has_grad) mean = mean + step_exp(log_var) * grad;
      std = step_exp(0.5f * log_var);
    }
    x_det = mean;
  } else {
    T eps = pred;
    if (o.has_grad) {
      eps = (k[kSqrtRecipAb] * x - x0) * k.recip_sqrt_recipm1_ab - k[kSqrt1mAb] * grad;
      x0 = k[kSqrtRecipAb] * x - k[kSqrtRecipm1Ab] * eps;
    } else if (o.eps_from_x0) {
      eps = (k[kSqrtRecipAb] * x - x0) * k.recip_sqrt_recipm1_ab;
    } else if (o.prediction == kPredV) {
      eps = k[kSqrtAb] * pred + k[kSqrt1mAb] * x;
    } else if (o.prediction == kPredX0) {
      eps = (k[kSqrtRecipAb] * x - x0_raw) * k.recip_sqrt_recipm1_ab;
    }
    x_det = k[kSqrtAbPrev] * x0 + k[kDdimDir] * eps;
    std = T(k[kDdimSigma]);
  }

  T scale = T(0.0f);
  if (o.noise_mode == kNoiseNormal) {
    scale = std * k[kNonzero];
  } else if (o.noise_mode == kNoiseSquared) {
    scale = (std * std) * k[kNonzero];
  }
  return Values<T>{x_det, x0, scale};
}

// ---- the same step as an affine map (no learned variance, no guidance gradient) ------------------
// For these options step_element is, with per-sample scalars,
//   x0    = clamp(x0_x * x + x0_pred * pred, lo, hi)      (lo, hi = -1, 1 with clip_denoised, else
//                                                           -inf, inf: a clamp that changes nothing)
//   x_det = det_x0 * x0 + det_x * x + det_pred * pred,    scale as in step_element,
// because every eps / mean formula there is linear in x, pred and x0. The CPU kernel runs this form:
// its loop then has no per-element option branches (about 15 us of 180 at (16, 3, 64, 64), one
// thread).
// Results equal step_element's up to float rounding (the products of coefficients are formed once).
// A term that step_element does not have for the options (DDPM's x_det has no pred term, DDIM with
// the model's eps no x term) is left out rather than multiplied by 0, so that an infinite input
// that clip_denoised makes finite stays finite as it does there (uses_x / uses_pred say which).
struct Affine {
  float x0_x, x0_pred, x0_lo, x0_hi;
  float det_x0, det_x, det_pred;
  float scale;
  bool uses_x, uses_pred;  // x_det has an x term, a pred term
};

DDPM_HD_INLINE bool has_affine_form(const Options& o) {
  return !o.has_grad && !(o.method == kDdpm && learned_variance(o.variance));
}

// Requires has_affine_form(o).
DDPM_HD_INLINE Affine affine_form(const Coefs& k, const Options& o) {
  Affine f{};
  if (o.prediction == kEpsilon) {
    f.x0_x = k[kSqrtRecipAb];
    f.x0_pred = -k[kSqrtRecipm1Ab];
  } else if (o.prediction == kPredV) {
    f.x0_x = k[kSqrtAb];
    f.x0_pred = -k[kSqrt1mAb];
  } else {
    f.x0_x = 0.0f;
    f.x0_pred = 1.0f;
  }
  f.x0_lo = o.clip_denoised ? -1.0f : -INFINITY;
  f.x0_hi = o.clip_denoised ? 1.0f : INFINITY;
  float std = 0.0f;
  if (o.method == kDdpm) {  // mean = post1 x0 + post2 x
    f.det_x0 = k[kPostCoef1];
    f.det_x = k[kPostCoef2];
    f.det_pred = 0.0f;
    f.uses_x = true;
    std = k.fixed_std;
  } else {  // x_det = sqrt(ab_prev) x0 + dir eps
    const float dir = k[kDdimDir], r = k.recip_sqrt_recipm1_ab;
    f.det_x0 = k[kSqrtAbPrev];
    f.det_x = 0.0f;
    f.det_pred = 0.0f;
    if (o.eps_from_x0) {  // eps = (sra x - x0) r
      f.det_x0 -= dir * r;
      f.det_x = dir * k[kSqrtRecipAb] * r;
      f.uses_x = true;
    } else if (o.prediction == kPredV) {  // eps = sqrt(ab) pred + sqrt(1 - ab) x
      f.det_x = dir * k[kSqrt1mAb];
      f.det_pred = dir * k[kSqrtAb];
      f.uses_x = f.uses_pred = true;
    } else if (o.prediction == kPredX0) {  // eps = (sra x - pred) r, from the unclipped x0 = pred
      f.det_x = dir * k[kSqrtRecipAb] * r;
      f.det_pred = -dir * r;
      f.uses_x = f.uses_pred = true;
    } else {  // eps = pred
      f.det_pred = dir;
      f.uses_pred = true;
    }
    std = k[kDdimSigma];
  }
  if (o.noise_mode == kNoiseNormal) {
    f.scale = std * k[kNonzero];
  } else if (o.noise_mode == kNoiseSquared) {
    f.scale = (std * std) * k[kNonzero];
  }
  return f;
}

// kUsesX, kUsesPred: f.uses_x, f.uses_pred (compile-time in the CPU kernel's loops).
template <class T, bool kUsesX, bool kUsesPred>
DDPM_HD_INLINE Values<T> affine_step_element(const Affine& f, T x, T pred) {
  const T x0_raw = f.x0_pred * pred;  // (predicting x0, x0 = pred has no x term: x0_x is 0)
  const T x0 = step_clamp(f.x0_x == 0.0f ? x0_raw : f.x0_x * x + x0_raw, f.x0_lo, f.x0_hi);
  T x_det = f.det_x0 * x0;
  if constexpr (kUsesX) x_det = x_det + f.det_x * x;
  if constexpr (kUsesPred) x_det = x_det + f.det_pred * pred;
  return Values<T>{x_det, x0, T(f.scale)};
}

// The projection's factor: x_out = x0 + factor * (x_new - x0) puts x_out on the sphere of radius
// sqrt(radius2) around x0 in the direction of x_new - x0 (x0 itself where that length is 0).
DDPM_HD_INLINE float projection_factor(float radius2, float length2) {
  return length2 > 0.0f ? sqrtf(radius2) / sqrtf(length2) : 0.0f;
}

}  // namespace step
}  // namespace ddpm_fast
