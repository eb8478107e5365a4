// Per-element math of the fused reverse diffusion step's backward, shared by the CPU and CUDA
// kernels (csrc/cpu/diffusion_step_backward.cpp, csrc/cuda/diffusion_step_backward.cu;
// kernels/diffusion_step.py is the Triton copy). The definition is the autograd of
// ddpm_fast/reference.py diffusion_step; the forward math is diffusion_step_math.h.
//
// Notation (one element of sample b; coefficient columns k[...] of diffusion_step_math.h):
//   x0_raw = a_x x + a_p pred           (epsilon: a_x = sra, a_p = -srm1; v: sab, -s1m; x0: 0, 1)
//   x0c    = clamp(x0_raw, -1, 1) or x0_raw
//   x_det  = DDPM:  post1 x0c + post2 x [+ var g]      (g: the classifier guidance gradient)
//            DDIM:  sabp x0 + dir eps                  (eps and the returned x0 per option below)
//   x_new  = x_det + scale z                           (z: the noise, a constant)
//   out    = project(x_new, x_det, x0), then clamp(out, lo, hi)
// Incoming gradients: gy of x_prev = out, gx0 of the returned pred_x0 = x0.
//
// The clamps take the subgradient PyTorch's autograd gives torch.clamp: the gradient passes where
// lo < v < hi, 0 elsewhere -- at a bound too (v == lo or hi) -- and for NaN (step_clamp_pass).
//
// The projection (groups: the channels of a pixel, or a whole sample), with d = x_det - x0,
// e = x_new - x0, R = |d|, L = |e| over the group, u = e / L and out = x0 + R u:
//   dR/dd = d / R,   du/de = (I - u u^T) / L, so with gout the gradient of out (after the clip)
//   and S = sum(gout * e) over the group:
//     g_e = (R / L) (gout - u (u . gout)) = f gout - (f S / L^2) e        (f = R / L)
//     g_d = (u . gout) d / R              = (S / (L R)) d
//     g_x0 (direct) = gout - g_e - g_d
// torch.linalg.vector_norm's backward is 0 where the norm is 0, and the reference's direction is
// the constant 0 where L = 0: then g_e = g_d = 0 (out = x0); R = 0 gives g_d = 0 (and f = 0).
// projection_grad_coefs forms (f, f S / L^2, S / (L R)) once per group.
//
// Through x_new = x_det + scale z: x_det gets g_new + g_det (g_new: the gradient reaching x_new,
// g_det: the projection's direct one), and the learned log variance lv gets
// d scale / d lv * z * g_new, with d scale / d lv = scale / 2 for noise_mode normal (scale = std =
// e^{lv/2}) and scale for squared (scale = std^2 = e^lv).
// DDPM: g(x0c) = post1 G + gx0', g(x) = post2 G, g(g) = var G, g(lv) += var g G (learned var);
//   learned_range: lv = frac lmax + (1 - frac) lmin with frac = (v + 1) / 2: dlv/dv = (lmax - lmin) / 2;
//   learned: lv = v.                                     (G = g_new + g_det, gx0' = g_x0 below)
// DDIM (x0f: the returned x0; g(x0f) = sabp G + gx0'):
//   guided:      eps = (sra x - x0c) r - s1m g, x0f = sra x - srm1 eps      (r = 1 / srm1):
//                g(eps) = dir G - srm1 g(x0f), g(x) = sra g(x0f) + sra r g(eps),
//                g(x0c) = -r g(eps), g(g) = -s1m g(eps)
//   eps_from_x0: eps = (sra x - x0c) r:  g(x) = sra r dir G, g(x0c) = g(x0f) - r dir G
//   epsilon:     eps = pred:              g(pred) = dir G, g(x0c) = g(x0f)
//   v:           eps = sab pred + s1m x:  g(pred) = sab dir G, g(x) = s1m dir G, g(x0c) = g(x0f)
//   x0:          eps = (sra x - pred) r:  g(x) = sra r dir G, g(pred) = -r dir G, g(x0c) = g(x0f)
// Finally g(x0_raw) = g(x0c) where the clamp passes, and g(x) += a_x g(x0_raw),
// g(pred) += a_p g(x0_raw).
#pragma once

#include "diffusion_step_math.h"

namespace ddpm_fast {
namespace step {

// Scalar overload (a SIMD type brings its own): g where lo < v < hi, else 0 (a bound or NaN: 0),
// the gradient torch.clamp(v, lo, hi) passes back.
DDPM_HD_INLINE float step_clamp_pass(float v, float lo, float hi, float g) { return v > lo && v < hi ? g : 0.0f; }

// Gradients of one element (or SIMD value) of the inputs: x, the model's first C channels (pred),
// its variance channel (var; 0 unless DDPM with a learned variance), the guidance gradient (guide).
template <class T>
struct Grads {
  T x;
  T pred;
  T var;
  T guide;
};

// The backward of step_element. x, pred, var_out, grad as there; z the noise (read only with
// has_noise); g_new, g_det, g_x0 the gradients reaching x_new, x_det (besides through x_new) and
// the returned x0 (see the header comment; without a projection g_det = 0).
template <class T>
DDPM_HD_INLINE Grads<T> step_element_backward(const Coefs& k, const Options& o, bool has_noise, T x, T pred,
                                              T var_out, T grad, T z, T g_new, T g_det, T g_x0) {
  const T G = g_new + g_det;
  T x0_raw = pred;
  if (o.prediction == kEpsilon) {
    x0_raw = k[kSqrtRecipAb] * x - k[kSqrtRecipm1Ab] * pred;
  } else if (o.prediction == kPredV) {
    x0_raw = k[kSqrtAb] * x - k[kSqrt1mAb] * pred;
  }
  Grads<T> r{T(0.0f), T(0.0f), T(0.0f), T(0.0f)};
  T g_x0c;
  if (o.method == kDdpm) {
    g_x0c = k[kPostCoef1] * G + g_x0;
    r.x = k[kPostCoef2] * G;
    if (o.variance == kFixedSmall || o.variance == kFixedLarge) {
      if (o.has_grad) r.guide = k[kVariance] * G;
    } else {
      T log_var = var_out;
      if (o.variance == kLearnedRange) {
        const T frac = (var_out + 1.0f) / 2.0f;
        log_var = frac * k[kLogVarMax] + (1.0f - frac) * k[kLogVarMin];
      }
      T g_log_var(0.0f);
      if (o.has_grad) {
        const T var = step_exp(log_var);
        r.guide = var * G;
        g_log_var = var * grad * G;
      }
      if (has_noise && o.noise_mode != kNoiseZero) {
        // scale = e^{lv/2} nonzero (normal) or e^{lv} nonzero (squared)
        const T scale = step_exp((o.noise_mode == kNoiseNormal ? 0.5f : 1.0f) * log_var) * k[kNonzero];
        g_log_var = g_log_var + (o.noise_mode == kNoiseNormal ? 0.5f : 1.0f) * scale * z * g_new;
      }
      r.var = o.variance == kLearnedRange ? g_log_var * (0.5f * (k[kLogVarMax] - k[kLogVarMin])) : g_log_var;
    }
  } else {
    const float dir = k[kDdimDir], rr = k.recip_sqrt_recipm1_ab, sra = k[kSqrtRecipAb];
    const T g_x0f = k[kSqrtAbPrev] * G + g_x0;
    if (o.has_grad) {
      const T g_eps = dir * G - k[kSqrtRecipm1Ab] * g_x0f;
      r.x = sra * g_x0f + (sra * rr) * g_eps;
      g_x0c = -rr * g_eps;
      r.guide = -k[kSqrt1mAb] * g_eps;
    } else if (o.eps_from_x0) {
      r.x = (sra * rr * dir) * G;
      g_x0c = g_x0f - (rr * dir) * G;
    } else {
      g_x0c = g_x0f;
      if (o.prediction == kEpsilon) {
        r.pred = dir * G;
      } else if (o.prediction == kPredV) {
        r.pred = (k[kSqrtAb] * dir) * G;
        r.x = (k[kSqrt1mAb] * dir) * G;
      } else {  // eps of the unclipped x0 = pred
        r.x = (sra * rr * dir) * G;
        r.pred = (-rr * dir) * G;
      }
    }
  }
  const T g_raw = o.clip_denoised ? step_clamp_pass(x0_raw, -1.0f, 1.0f, g_x0c) : g_x0c;
  if (o.prediction == kEpsilon) {
    r.x = r.x + k[kSqrtRecipAb] * g_raw;
    r.pred = r.pred - k[kSqrtRecipm1Ab] * g_raw;
  } else if (o.prediction == kPredV) {
    r.x = r.x + k[kSqrtAb] * g_raw;
    r.pred = r.pred - k[kSqrt1mAb] * g_raw;
  } else {
    r.pred = r.pred + g_raw;
  }
  return r;
}

// The projection's backward coefficients of one group from its sums r2 = |x_det - x0|^2,
// l2 = |x_new - x0|^2 and s = sum(gout * (x_new - x0)) (see the header comment):
//   g_e = factor gout - along_e e,   g_d = along_d d.
struct ProjectionGrad {
  float factor;   // R / L (projection_factor)
  float along_e;  // f S / L^2
  float along_d;  // S / (L R)
};

DDPM_HD_INLINE ProjectionGrad projection_grad_coefs(float r2, float l2, float s) {
  ProjectionGrad p{projection_factor(r2, l2), 0.0f, 0.0f};
  if (l2 > 0.0f) {
    p.along_e = p.factor * s / l2;
    if (r2 > 0.0f) p.along_d = s / (sqrtf(l2) * sqrtf(r2));
  }
  return p;
}

// The gradients (g_new, g_det, g_x0) one element hands to step_element_backward under a
// projection with coefficients p: gout is the gradient of out after the clip, gx0 the incoming
// gradient of the returned x0, e = x_new - x0, d = x_det - x0.
template <class T>
struct ProjectedGrads {
  T g_new;
  T g_det;
  T g_x0;
};

template <class T, class P>
DDPM_HD_INLINE ProjectedGrads<T> projection_backward(P factor, P along_e, P along_d, T gout, T gx0, T e, T d) {
  const T g_e = factor * gout - along_e * e;
  const T g_d = along_d * d;
  return ProjectedGrads<T>{g_e, g_d, gx0 + gout - g_e - g_d};
}

}  // namespace step
}  // namespace ddpm_fast
