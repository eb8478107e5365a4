// CPU kernel of ddpm_fast::group_norm_scale_shift_backward: the gradients of ADM's AdaGN
//   y = SiLU?( ((x - mean) * rstd * weight + bias) * (1 + scale) + shift )
// with respect to x, weight, bias, scale and shift, from grad_y and the forward's saved group
// statistics mean, rstd (N, G) fp32. The formulas are derived in csrc/include/group_norm_math.h
// ("backward"); per element they are gn::dz_element and gn::dx_element.
//
// Two passes over x and grad_y (z = a * x + b, the forward's fused map, is recomputed in both):
//   1. sums: per (n, c) A = sum_p dz and B' = sum_p dz * (x - mean) (B = rstd * B'), in fp32 SIMD
//      lanes flushed into double every few hundred elements;
//   then per (n, group) the parameter gradients of its channels (gn::channel_grads) and the
//   coefficients of dx = alpha * dz + beta * (x - mean) + gamma (gn::dx_affine);
//   2. dx (skipped when dx is not wanted).
// dweight / dbias sum the per-(n, c) terms over n afterwards, in order (deterministic).
// NCHW: when there are enough (n, group) blocks, one task per block runs pass 1, the block's
// coefficients and pass 2 while the block is still in cache; otherwise both passes run over the
// (n, c) planes in parallel. Channels-last (NHWC / NDHWC / NLC): pass 1 over (n, pixel chunk) with
// per-channel accumulators vectorised along C, pass 2 over pixel rows.
//
// SIMD: the AVX2 section of group_norm_cpu_simd_begin.h (the CPU is checked at run time); a CPU
// without AVX2/FMA/F16C gets the same math with composite ATen ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "group_norm_host.h"
#include "group_norm_math.h"

#include "group_norm_cpu_simd_begin.h"

namespace ddpm_fast {
namespace {

using namespace gn_simd;  // Vec, kVec, kStep, load2, store2, lane_sum, sigmoid, ...
constexpr int64_t kFlushSteps = 32;  // fp32 lane steps between flushes into double

// dz = dy * SiLU'(z) (or dy) at z = a * x + b; SiLU'(z) = s (1 + z (1 - s)), s = sigmoid(z).
template <bool kSilu>
inline Vec dz_vec(const Vec& x, const Vec& dy, const Vec& a, const Vec& b) {
  if constexpr (!kSilu) return dy;
  const Vec z = at::vec::fmadd(a, x, b);
  const Vec s = gn_simd::sigmoid(z);
  return dy * s * at::vec::fmadd(z, Vec(1.0f) - s, Vec(1.0f));
}

// dx = alpha * dz + beta * (x - mean) + gamma.
inline Vec dx_vec(const Vec& x, const Vec& dz, const Vec& mean, const Vec& alpha, const Vec& beta,
                  const Vec& gamma) {
  return at::vec::fmadd(alpha, dz, at::vec::fmadd(beta, x - mean, gamma));
}

// Per-(n, c) coefficients of both passes. a, b: z = a * x + b; mean: the channel's group mean;
// alpha, beta, gamma: dx (beta and gamma are per group, stored per channel for the row loops).
struct Coefs {
  std::vector<float> a, b, mean, alpha, beta, gamma;
  explicit Coefs(int64_t nc) : a(nc), b(nc), mean(nc), alpha(nc), beta(nc), gamma(nc) {}
};

// What the passes share: the problem, the saved statistics, the per-(n, c) sums and the outputs.
struct Work {
  const gn::Problem& p;
  const float* mean;       // (N, G)
  const float* rstd;       // (N, G)
  Coefs coef;
  std::vector<double> A, B;         // (N, C): sum dz, sum dz * xhat
  std::vector<float> m_a, m_b;      // (N, C): (1 + scale) * A, (1 + scale) * B (for dbias, dweight)
  float *dscale, *dshift, *dweight, *dbias;  // fp32 outputs or nullptr
  Work(const gn::Problem& prob, const float* mu, const float* rs)
      : p(prob), mean(mu), rstd(rs), coef(prob.n * prob.c), A(prob.n * prob.c), B(prob.n * prob.c),
        m_a(prob.n * prob.c), m_b(prob.n * prob.c) {}
};

// z = a * x + b of the channels of group (n, g), from its statistics (before pass 1).
void forward_coefficients(Work& w, int64_t n, int64_t g) {
  const gn::Problem& p = w.p;
  const int64_t cg = p.c / p.groups;
  const float mean = w.mean[n * p.groups + g], rstd = w.rstd[n * p.groups + g];
  for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
    const int64_t nc = n * p.c + c;
    const gn::ChannelAffine<float> f = gn::channel_affine<float>(
        mean, rstd, p.weight ? p.weight[c] : 1.0f, p.bias ? p.bias[c] : 0.0f,
        p.scale ? p.scale[nc] : 0.0f, p.shift ? p.shift[nc] : 0.0f);
    w.coef.a[nc] = f.a;
    w.coef.b[nc] = f.b;
    w.coef.mean[nc] = mean;
  }
}

// After pass 1: the parameter gradients of group (n, g)'s channels and the dx coefficients.
// w.B holds B' = sum dz * (x - mean) on entry and B = rstd * B' on exit.
void backward_coefficients(Work& w, int64_t n, int64_t g) {
  const gn::Problem& p = w.p;
  const int64_t cg = p.c / p.groups;
  const double rstd = w.rstd[n * p.groups + g];
  double sum_dxhat = 0.0, sum_dxhat_x = 0.0;
  for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
    const int64_t nc = n * p.c + c;
    w.B[nc] *= rstd;
    const gn::ChannelGrads<double> r = gn::channel_grads<double>(
        w.A[nc], w.B[nc], p.weight ? p.weight[c] : 1.0, p.bias ? p.bias[c] : 0.0,
        p.scale ? p.scale[nc] : 0.0);
    if (w.dscale) w.dscale[nc] = static_cast<float>(r.dscale);
    if (w.dshift) w.dshift[nc] = static_cast<float>(r.dshift);
    w.m_a[nc] = static_cast<float>(r.dbias);
    w.m_b[nc] = static_cast<float>(r.dweight);
    sum_dxhat += r.dxhat;
    sum_dxhat_x += r.dxhat_x;
  }
  for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
    const int64_t nc = n * p.c + c;
    const gn::DxAffine<double> d = gn::dx_affine<double>(
        rstd, p.weight ? p.weight[c] : 1.0, p.scale ? p.scale[nc] : 0.0, sum_dxhat, sum_dxhat_x,
        static_cast<double>(cg * p.pixels));
    w.coef.alpha[nc] = static_cast<float>(d.alpha);
    w.coef.beta[nc] = static_cast<float>(d.beta);
    w.coef.gamma[nc] = static_cast<float>(d.gamma);
  }
}

// dweight[c] = sum_n m * B, dbias[c] = sum_n m * A, in order of n.
void reduce_over_samples(Work& w) {
  const gn::Problem& p = w.p;
  for (int64_t c = 0; c < p.c; ++c) {
    double dw = 0.0, db = 0.0;
    for (int64_t n = 0; n < p.n; ++n) {
      dw += w.m_b[n * p.c + c];
      db += w.m_a[n * p.c + c];
    }
    if (w.dweight) w.dweight[c] = static_cast<float>(dw);
    if (w.dbias) w.dbias[c] = static_cast<float>(db);
  }
}

// ---- NCHW: one (n, c) plane of `len` values --------------------------------------------------------

// Pass 1 of plane nc: w.A[nc] = sum dz, w.B[nc] = sum dz * (x - mean); dz itself into dz_out[0..len)
// when given (pass 2 then need not evaluate SiLU' again).
template <typename T, bool kSilu>
void plane_sums(Work& w, const T* x, const T* dy, int64_t nc, float* dz_out = nullptr) {
  const int64_t len = w.p.pixels;
  const float a = w.coef.a[nc], b = w.coef.b[nc], mean = w.coef.mean[nc];
  const Vec va(a), vb(b), vmean(mean);
  double sa = 0.0, sb = 0.0;
  int64_t i = 0;
  const int64_t vec_end = len - len % kStep;
  while (i < vec_end) {
    const int64_t block_end = std::min(vec_end, i + kFlushSteps * kStep);
    Vec acc_a(0.0f), acc_b(0.0f);
    for (; i < block_end; i += kStep) {
      Vec x0, x1, g0, g1;
      load2(x + i, x0, x1);
      load2(dy + i, g0, g1);
      const Vec d0 = dz_vec<kSilu>(x0, g0, va, vb), d1 = dz_vec<kSilu>(x1, g1, va, vb);
      if (dz_out) store2(dz_out + i, d0, d1);
      acc_a = acc_a + d0 + d1;
      acc_b = at::vec::fmadd(d0, x0 - vmean, acc_b);
      acc_b = at::vec::fmadd(d1, x1 - vmean, acc_b);
    }
    sa += lane_sum(acc_a);
    sb += lane_sum(acc_b);
  }
  for (; i < len; ++i) {
    const float xv = static_cast<float>(x[i]);
    const float dz = gn::dz_element(xv, static_cast<float>(dy[i]), a, b, kSilu);
    if (dz_out) dz_out[i] = dz;
    sa += dz;
    sb += static_cast<double>(dz) * (xv - mean);
  }
  w.A[nc] = sa;
  w.B[nc] = sb;
}

// Pass 2 of plane nc; with kCached dz comes from pass 1's dz_out (`dz`), not from dy.
template <typename T, bool kSilu, bool kCached = false>
void plane_dx(const Work& w, const T* x, const T* dy, T* dx, int64_t nc, const float* dz = nullptr) {
  const int64_t len = w.p.pixels;
  const Coefs& k = w.coef;
  const Vec va(k.a[nc]), vb(k.b[nc]), vmean(k.mean[nc]), valpha(k.alpha[nc]), vbeta(k.beta[nc]),
      vgamma(k.gamma[nc]);
  int64_t i = 0;
  const int64_t vec_end = len - len % kStep;
  for (; i < vec_end; i += kStep) {
    Vec x0, x1, d0, d1;
    load2(x + i, x0, x1);
    if constexpr (kCached) {
      load2(dz + i, d0, d1);
    } else {
      Vec g0, g1;
      load2(dy + i, g0, g1);
      d0 = dz_vec<kSilu>(x0, g0, va, vb);
      d1 = dz_vec<kSilu>(x1, g1, va, vb);
    }
    store2(dx + i, dx_vec(x0, d0, vmean, valpha, vbeta, vgamma), dx_vec(x1, d1, vmean, valpha, vbeta, vgamma));
  }
  for (; i < len; ++i) {
    const float xv = static_cast<float>(x[i]);
    const float d = kCached ? dz[i] : gn::dz_element(xv, static_cast<float>(dy[i]), k.a[nc], k.b[nc], kSilu);
    dx[i] = static_cast<T>(gn::dx_element(xv, d, k.mean[nc], k.alpha[nc], k.beta[nc], k.gamma[nc]));
  }
}

// One task per (n, group) when there are enough of them: the block's second read hits the cache.
bool use_group_tasks(const gn::Problem& p) { return p.n * p.groups >= 4 * at::get_num_threads(); }

template <typename T, bool kSilu>
void run_nchw(Work& w, const T* x, const T* dy, T* dx) {
  const gn::Problem& p = w.p;
  const int64_t cg = p.c / p.groups, len = p.pixels;
  if (use_group_tasks(p)) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cg * len, 1));
    // with SiLU the block's dz (pass 1) is kept for pass 2: SiLU' (an exp and a division per
    // element) is evaluated once
    const bool cache = kSilu && dx != nullptr;
    at::parallel_for(0, p.n * p.groups, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> dz(cache ? cg * len : 0);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / p.groups, g = task % p.groups, first = n * p.c + g * cg;
        const auto buf = [&](int64_t nc) { return cache ? dz.data() + (nc - first) * len : nullptr; };
        forward_coefficients(w, n, g);
        for (int64_t nc = first; nc < first + cg; ++nc)
          plane_sums<T, kSilu>(w, x + nc * len, dy + nc * len, nc, buf(nc));
        backward_coefficients(w, n, g);
        for (int64_t nc = first; dx && nc < first + cg; ++nc) {
          if (cache)
            plane_dx<T, kSilu, true>(w, x + nc * len, nullptr, dx + nc * len, nc, buf(nc));
          else
            plane_dx<T, kSilu>(w, x + nc * len, dy + nc * len, dx + nc * len, nc);
        }
      }
    });
    return;
  }
  for (int64_t ng = 0; ng < p.n * p.groups; ++ng) forward_coefficients(w, ng / p.groups, ng % p.groups);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1));
  at::parallel_for(0, p.n * p.c, grain, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) plane_sums<T, kSilu>(w, x + nc * len, dy + nc * len, nc);
  });
  for (int64_t ng = 0; ng < p.n * p.groups; ++ng) backward_coefficients(w, ng / p.groups, ng % p.groups);
  if (!dx) return;
  at::parallel_for(0, p.n * p.c, grain, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc)
      plane_dx<T, kSilu>(w, x + nc * len, dy + nc * len, dx + nc * len, nc);
  });
}

// ---- channels-last: x, dy (N, P, C) dense ----------------------------------------------------------

// Pass 1: each task sums one chunk of pixels of one sample into per-channel partials, added up
// in chunk order afterwards.
template <typename T, bool kSilu>
void sums_nhwc(Work& w, const T* x, const T* dy) {
  const gn::Problem& p = w.p;
  const int64_t channels = p.c, pixels = p.pixels;
  const int64_t chunk_px = std::max<int64_t>(1, 16384 / channels);
  const int64_t chunks = (pixels + chunk_px - 1) / chunk_px;
  const int64_t cvec_end = channels - channels % kStep;
  // partial[(n * chunks + k) * 2 * C + {0, C} + c]: sum dz, sum dz * (x - mean) of chunk k
  std::vector<double> partial(p.n * chunks * 2 * channels, 0.0);
  const int64_t block_px = std::clamp<int64_t>(8192 / channels, 1, kFlushSteps);
  at::parallel_for(0, p.n * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, k = task % chunks;
      const int64_t p_begin = k * chunk_px, p_end = std::min(pixels, p_begin + chunk_px);
      const float* a = w.coef.a.data() + n * channels;
      const float* b = w.coef.b.data() + n * channels;
      const float* mu = w.coef.mean.data() + n * channels;
      double* sa = partial.data() + task * 2 * channels;
      double* sb = sa + channels;
      for (int64_t p0 = p_begin; p0 < p_end; p0 += block_px) {
        const int64_t p1 = std::min(p_end, p0 + block_px);
        const int64_t row0 = (n * pixels + p0) * channels;
        int64_t c = 0;
        for (; c < cvec_end; c += kStep) {
          const Vec a0 = Vec::loadu(a + c), a1 = Vec::loadu(a + c + kVec);
          const Vec b0 = Vec::loadu(b + c), b1 = Vec::loadu(b + c + kVec);
          const Vec m0 = Vec::loadu(mu + c), m1 = Vec::loadu(mu + c + kVec);
          Vec acc_a0(0.0f), acc_a1(0.0f), acc_b0(0.0f), acc_b1(0.0f);
          for (int64_t i = row0 + c; i < row0 + (p1 - p0) * channels; i += channels) {
            Vec x0, x1, g0, g1;
            load2(x + i, x0, x1);
            load2(dy + i, g0, g1);
            const Vec d0 = dz_vec<kSilu>(x0, g0, a0, b0), d1 = dz_vec<kSilu>(x1, g1, a1, b1);
            acc_a0 = acc_a0 + d0;
            acc_a1 = acc_a1 + d1;
            acc_b0 = at::vec::fmadd(d0, x0 - m0, acc_b0);
            acc_b1 = at::vec::fmadd(d1, x1 - m1, acc_b1);
          }
          gn_simd::add_lanes(sa + c, sb + c, acc_a0, acc_a1, acc_b0, acc_b1);
        }
        for (; c < channels; ++c) {
          for (int64_t i = row0 + c; i < row0 + (p1 - p0) * channels; i += channels) {
            const float xv = static_cast<float>(x[i]);
            const float dz = gn::dz_element(xv, static_cast<float>(dy[i]), a[c], b[c], kSilu);
            sa[c] += dz;
            sb[c] += static_cast<double>(dz) * (xv - mu[c]);
          }
        }
      }
    }
  });
  for (int64_t n = 0; n < p.n; ++n)
    for (int64_t c = 0; c < channels; ++c) {
      double ta = 0.0, tb = 0.0;
      for (int64_t k = 0; k < chunks; ++k) {
        const double* d = partial.data() + (n * chunks + k) * 2 * channels;
        ta += d[c];
        tb += d[channels + c];
      }
      w.A[n * channels + c] = ta;
      w.B[n * channels + c] = tb;
    }
}

// Pass 2 over pixel rows with the coefficient vectors of the row's sample.
template <typename T, bool kSilu>
void dx_nhwc(const Work& w, const T* x, const T* dy, T* dx) {
  const gn::Problem& p = w.p;
  const int64_t channels = p.c, pixels = p.pixels;
  const int64_t cvec_end = channels - channels % kVec;
  const int64_t grain = std::max<int64_t>(1, 16384 / channels);
  at::parallel_for(0, p.n * pixels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t off = (row / pixels) * channels;
      const Coefs& k = w.coef;
      const T* xr = x + row * channels;
      const T* gr = dy + row * channels;
      T* out = dx + row * channels;
      int64_t c = 0;
      for (; c + kStep <= cvec_end; c += kStep) {
        Vec x0, x1, g0, g1;
        load2(xr + c, x0, x1);
        load2(gr + c, g0, g1);
        const int64_t q = off + c;
        const auto one = [&](const Vec& xv, const Vec& gv, int64_t at) {
          const Vec dz = dz_vec<kSilu>(xv, gv, Vec::loadu(&k.a[at]), Vec::loadu(&k.b[at]));
          return dx_vec(xv, dz, Vec::loadu(&k.mean[at]), Vec::loadu(&k.alpha[at]), Vec::loadu(&k.beta[at]),
                        Vec::loadu(&k.gamma[at]));
        };
        store2(out + c, one(x0, g0, q), one(x1, g1, q + kVec));
      }
      for (; c < channels; ++c) {
        const int64_t q = off + c;
        const float xv = static_cast<float>(xr[c]);
        const float dz = gn::dz_element(xv, static_cast<float>(gr[c]), k.a[q], k.b[q], kSilu);
        out[c] = static_cast<T>(gn::dx_element(xv, dz, k.mean[q], k.alpha[q], k.beta[q], k.gamma[q]));
      }
    }
  });
}

template <typename T, bool kSilu>
void run_nhwc(Work& w, const T* x, const T* dy, T* dx) {
  const gn::Problem& p = w.p;
  for (int64_t ng = 0; ng < p.n * p.groups; ++ng) forward_coefficients(w, ng / p.groups, ng % p.groups);
  sums_nhwc<T, kSilu>(w, x, dy);
  for (int64_t ng = 0; ng < p.n * p.groups; ++ng) backward_coefficients(w, ng / p.groups, ng % p.groups);
  if (dx) dx_nhwc<T, kSilu>(w, x, dy, dx);
}

template <typename T>
void run_typed(Work& w, const at::Tensor& x, const at::Tensor& dy, at::Tensor* dx) {
  const T* xp = x.const_data_ptr<T>();
  const T* gp = dy.const_data_ptr<T>();
  T* dp = dx ? dx->mutable_data_ptr<T>() : nullptr;
  if (w.p.channels_last) {
    w.p.silu ? run_nhwc<T, true>(w, xp, gp, dp) : run_nhwc<T, false>(w, xp, gp, dp);
  } else {
    w.p.silu ? run_nchw<T, true>(w, xp, gp, dp) : run_nchw<T, false>(w, xp, gp, dp);
  }
  reduce_over_samples(w);
}

void run_dispatch(Work& w, const at::Tensor& x, const at::Tensor& dy, at::Tensor* dx) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return run_typed<float>(w, x, dy, dx);
    case at::kHalf:
      return run_typed<c10::Half>(w, x, dy, dx);
    case at::kBFloat16:
      return run_typed<c10::BFloat16>(w, x, dy, dx);
    default:
      DDPM_CHECK(false, "group_norm_scale_shift_backward: x must be float32, float16 or bfloat16");
  }
}

}  // namespace
}  // namespace ddpm_fast

#include "group_norm_cpu_simd_end.h"

// ---- host entry (baseline target) --------------------------------------------------------------
namespace ddpm_fast {
namespace {

// Without AVX2/FMA/F16C: the same formulas with composite ATen ops, in fp32.
void composite(const at::Tensor& dy, const at::Tensor& x, int64_t groups,
               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
               const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
               const at::Tensor& mean,
               const at::Tensor& rstd, bool silu, at::Tensor* dx, gn::ParamGrads& g) {
  const int64_t n = x.size(0), c = x.size(1);
  std::vector<int64_t> per_channel(x.dim(), 1), spatial;
  per_channel[0] = n;
  per_channel[1] = c;
  for (int64_t d = 2; d < x.dim(); ++d) spatial.push_back(d);
  const auto chan = [&](const std::optional<at::Tensor>& t, double absent) {
    return t ? gn::as_float(t)->expand({n, c}).reshape(per_channel)
             : at::full(per_channel, absent, x.options().dtype(at::kFloat));
  };
  const at::Tensor w = chan(weight, 1.0), b = chan(bias, 0.0), m = chan(scale, 0.0) + 1.0;
  const auto per_group = [&](const at::Tensor& t) { return t.reshape({n, groups, -1}); };
  const at::Tensor xhat =
      ((per_group(x.to(at::kFloat)) - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(x.sizes());
  at::Tensor dz = dy.to(at::kFloat);
  if (silu) {
    const at::Tensor z = (xhat * w + b) * m + chan(shift, 0.0);
    const at::Tensor s = at::sigmoid(z);
    dz = dz * s * (1.0 + z * (1.0 - s));
  }
  const at::Tensor A = spatial.empty() ? dz : dz.sum(spatial, true);
  const at::Tensor B = spatial.empty() ? dz * xhat : (dz * xhat).sum(spatial, true);
  const auto store = [&](int i, const at::Tensor& v) {
    if (g[i].defined()) g[i].copy_(v.reshape(g[i].sizes()));
  };
  store(gn::kDscale, w * B + b * A);
  store(gn::kDshift, A);
  store(gn::kDweight, (m * B).sum(0));
  store(gn::kDbias, (m * A).sum(0));
  if (dx) {
    const at::Tensor dxhat = per_group(dz * m * w), xh = per_group(xhat);
    const at::Tensor r = (dxhat - dxhat.mean(-1, true) - xh * (dxhat * xh).mean(-1, true)) * rstd.unsqueeze(-1);
    dx->copy_(r.reshape(x.sizes()));
  }
}

gn::Grads group_norm_scale_shift_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                          int64_t num_groups, const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& scale,
                                          const std::optional<at::Tensor>& shift, const at::Tensor& mean,
                                          const at::Tensor& rstd, bool silu,
                                          std::array<bool, 5> output_mask) {
  auto [want, g] = gn::begin_backward(grad_y, x, num_groups, weight, bias, scale, shift, mean, rstd, output_mask);
  if (x.numel() == 0)
    return gn::grads_tuple(x, want[gn::kDx] ? at::empty_like(x) : at::Tensor(), g, weight, bias, scale, shift);
  if (!gn_simd::supported()) {
    at::Tensor dx = want[gn::kDx] ? at::empty_like(x) : at::Tensor();
    composite(grad_y, x, num_groups, weight, bias, scale, shift, mean.contiguous(), rstd.contiguous(), silu,
              want[gn::kDx] ? &dx : nullptr, g);
    return gn::grads_tuple(x, dx, g, weight, bias, scale, shift);
  }
  gn::Call call = gn::prepare_call(x, num_groups, weight, bias, scale, shift, /*eps=*/1.0, silu);
  const at::Tensor dy = gn::grad_like_input(call.layout, grad_y);
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  Work w(call.p, mean_c.const_data_ptr<float>(), rstd_c.const_data_ptr<float>());
  w.dscale = gn::data_or_null(g[gn::kDscale]);
  w.dshift = gn::data_or_null(g[gn::kDshift]);
  w.dweight = gn::data_or_null(g[gn::kDweight]);
  w.dbias = gn::data_or_null(g[gn::kDbias]);
  run_dispatch(w, call.layout.input, dy, want[gn::kDx] ? &call.layout.result : nullptr);
  at::Tensor dx = want[gn::kDx] ? gn::finish_layout(call.layout) : at::Tensor();
  return gn::grads_tuple(x, dx, g, weight, bias, scale, shift);
}

}  // namespace
}  // namespace ddpm_fast

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("group_norm_scale_shift_backward", &ddpm_fast::group_norm_scale_shift_backward_cpu);
}
