// CPU kernel of ddpm_fast::group_norm_scale_shift (ADM's AdaGN, see csrc/include/group_norm_math.h)
// and of its variant with statistics, ddpm_fast::group_norm_scale_shift_stats (the same passes,
// also writing each group's mean and rstd for the backward, group_norm_scale_shift_backward.cpp).
//
// Two passes over x:
//   1. statistics: per-(n, c) moments in one read (fp32 SIMD lanes of values shifted by one value
//      of the channel, flushed every few hundred elements into double; a second read shifted by the
//      mean where that value lay more than two standard deviations from it), merged per group with
//      Chan's formula in double;
//   2. apply: per (n, c) the normalisation, GroupNorm affine and AdaGN scale-shift are folded into
//      y = a * x + b, so the inner loop is one FMA (+ SiLU) per element.
// NCHW: pass 1 runs over the (n, c) planes, pass 2 too; when a group's block is small enough for
// the L2 cache both passes run per (n, group) task, the second on the cached block. Channels-last (NHWC / NDHWC / NLC): pass 1
// runs over (n, pixel chunk) with per-channel accumulators vectorised along C, pass 2 over pixel
// rows with the coefficient vectors of sample n. Both passes are parallel (at::parallel_for).
//
// SIMD: at::vec::Vectorized<float>. On x86-64 the kernel section is compiled for AVX2+FMA+F16C
// (group_norm_cpu_simd_begin.h; the CPU is checked at run time; a CPU without them gets the
// composite ATen ops); the fp32 SiLU apply has an AVX-512 variant used when the CPU has it
// (DDPM_FAST_CPU_ISA=avx2 turns it off). Everything that is not vector code is included and
// compiled before that section, for the baseline target.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/MathConstants.h>
#include <c10/util/copysign.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "group_norm_host.h"
#include "group_norm_math.h"

// ---- AVX-512 SiLU apply (fp32), compiled for AVX-512 and chosen at run time ------------------
// SiLU is what bounds the apply pass (exp + divide per element). With AVX-512: e^-y = 2^n p(r),
// n = round(-y log2 e), r = -y - n ln 2, the degree-4 polynomial the AVX2 version below uses too,
// and vscalefps for 2^n, which needs no clamping (it saturates to 0 / inf, giving SiLU's -0 / y).
// On this project's Zen 4 CPU it runs the SiLU apply in half the AVX2 time (the 16-lane divide).
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DDPM_GN_X86_AVX512 1
namespace ddpm_fast {
namespace {

using gn::kExpPoly;
using gn::kLn2;
using gn::kLog2e;

__attribute__((target("avx512f"))) inline __m512 silu_affine_avx512(__m512 x, __m512 a, __m512 b) {
  const __m512 y = _mm512_fmadd_ps(a, x, b);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(-kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmsub_ps(n, _mm512_set1_ps(kLn2), y);  // -y - n ln2
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int j = 1; j < 5; ++j) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[j]));
  return _mm512_div_ps(y, _mm512_add_ps(_mm512_scalef_ps(p, n), _mm512_set1_ps(1.0f)));
}

// y[i] = SiLU(a * x[i] + b), i < len (one NCHW plane).
__attribute__((target("avx512f"))) void silu_plane_avx512(const float* x, float* y, int64_t len, float a,
                                                          float b) {
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) _mm512_storeu_ps(y + i, silu_affine_avx512(_mm512_loadu_ps(x + i), va, vb));
  if (i < len) {
    const __mmask16 m = static_cast<__mmask16>((1u << (len - i)) - 1u);
    _mm512_mask_storeu_ps(y + i, m, silu_affine_avx512(_mm512_maskz_loadu_ps(m, x + i), va, vb));
  }
}

// y[c] = SiLU(a[c] * x[c] + b[c]), c < channels (one channels-last pixel row).
__attribute__((target("avx512f"))) void silu_row_avx512(const float* x, float* y, int64_t channels,
                                                        const float* a, const float* b) {
  int64_t c = 0;
  for (; c + 16 <= channels; c += 16)
    _mm512_storeu_ps(y + c, silu_affine_avx512(_mm512_loadu_ps(x + c), _mm512_loadu_ps(a + c),
                                               _mm512_loadu_ps(b + c)));
  if (c < channels) {
    const __mmask16 m = static_cast<__mmask16>((1u << (channels - c)) - 1u);
    _mm512_mask_storeu_ps(y + c, m, silu_affine_avx512(_mm512_maskz_loadu_ps(m, x + c),
                                                       _mm512_maskz_loadu_ps(m, a + c),
                                                       _mm512_maskz_loadu_ps(m, b + c)));
  }
}

bool use_avx512() { return cpu_isa::level() == cpu_isa::kAvx512; }

}  // namespace
}  // namespace ddpm_fast
#endif

#include "group_norm_cpu_simd_begin.h"

namespace ddpm_fast {
namespace {

using gn::ChannelAffine;
using gn::Moments;
using namespace gn_simd;  // Vec, kVec, kStep, load2, store2, lane_sum, ...
// fp32 lanes accumulate this many steps before they are flushed into double.
constexpr int64_t kFlushSteps = 32;

template <bool kSilu>
inline Vec fused_vec(const Vec& x, const Vec& a, const Vec& b) {
  const Vec y = at::vec::fmadd(a, x, b);
  if constexpr (kSilu) return gn_simd::silu(y);
  return y;
}

// ---- pass 1: per-(n, c) moments ---------------------------------------------------------------

// Moments of one contiguous plane of `len` values (NCHW) from sums shifted by `shift`.
template <typename T>
Moments<double> plane_moments_shifted(const T* p, int64_t len, float shift) {
  const Vec vshift(shift);
  double s1 = 0.0, s2 = 0.0;
  int64_t i = 0;
  const int64_t vec_end = len - len % kStep;
  while (i < vec_end) {
    const int64_t block_end = std::min(vec_end, i + kFlushSteps * kStep);
    Vec a1(0.0f), a2(0.0f), q1(0.0f), q2(0.0f);
    for (; i < block_end; i += kStep) {
      Vec lo, hi;
      load2(p + i, lo, hi);
      lo = lo - vshift;
      hi = hi - vshift;
      a1 = a1 + lo;
      a2 = a2 + hi;
      q1 = at::vec::fmadd(lo, lo, q1);
      q2 = at::vec::fmadd(hi, hi, q2);
    }
    s1 += lane_sum(a1 + a2);
    s2 += lane_sum(q1 + q2);
  }
  for (; i < len; ++i) {
    const double d = static_cast<double>(static_cast<float>(p[i]) - shift);
    s1 += d;
    s2 += d * d;
  }
  return gn::moments_from_shifted_sums<double>(static_cast<double>(len), shift, s1, s2);
}

// Moments of one plane, shifted by its first value; again shifted by that mean when the first
// value was too far from it (gn::shift_is_far: an outlier; rare for ordinary data).
template <typename T>
Moments<double> plane_moments(const T* p, int64_t len) {
  const float shift = static_cast<float>(p[0]);
  const Moments<double> m = plane_moments_shifted(p, len, shift);
  if (!gn::shift_is_far<double>(m, shift)) return m;
  return plane_moments_shifted(p, len, static_cast<float>(m.mean));
}

template <typename T>
void channel_moments_nchw(const T* x, int64_t planes, int64_t len, Moments<double>* out) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(len, 1));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) out[nc] = plane_moments(x + nc * len, len);
  });
}

// Channels-last: x is (N, P, C) dense. Each task sums one chunk of pixels of one sample into
// per-channel shifted sums (shift: the sample's first pixel), which are added up afterwards; a
// channel whose first pixel lay too far from its mean (gn::shift_is_far) is summed again in double.
template <typename T>
void channel_moments_nhwc(const T* x, int64_t n_samples, int64_t pixels, int64_t channels,
                          Moments<double>* out) {
  const int64_t chunk_px = std::max<int64_t>(1, 32768 / channels);
  const int64_t chunks = (pixels + chunk_px - 1) / chunk_px;
  const int64_t cvec_end = channels - channels % kStep;
  std::vector<float> shift(n_samples * channels);
  for (int64_t n = 0; n < n_samples; ++n)
    for (int64_t c = 0; c < channels; ++c)
      shift[n * channels + c] = static_cast<float>(x[n * pixels * channels + c]);
  // partial[(n * chunks + k) * 2 * C + {0, C} + c]: s1, s2 of chunk k
  std::vector<double> partial(n_samples * chunks * 2 * channels);

  // Pixel blocks small enough to stay in L1 (<= ~32 KiB of fp32); within a block each chunk of
  // 2 * kVec channels runs down the block's pixels with its sums in registers.
  const int64_t block_px = std::clamp<int64_t>(16384 / channels, 1, 2 * kFlushSteps);
  at::parallel_for(0, n_samples * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, k = task % chunks;
      const int64_t p_begin = k * chunk_px, p_end = std::min(pixels, p_begin + chunk_px);
      const float* sh = shift.data() + n * channels;
      double* d1 = partial.data() + task * 2 * channels;
      double* d2 = d1 + channels;
      for (int64_t p0 = p_begin; p0 < p_end; p0 += block_px) {
        const int64_t p1 = std::min(p_end, p0 + block_px);
        const T* rows = x + (n * pixels + p0) * channels;
        int64_t c = 0;
        for (; c < cvec_end; c += kStep) {
          const Vec sh_lo = Vec::loadu(sh + c), sh_hi = Vec::loadu(sh + c + kVec);
          Vec a_lo(0.0f), a_hi(0.0f), q_lo(0.0f), q_hi(0.0f);
          const T* px = rows + c;
          for (int64_t p = p0; p < p1; ++p, px += channels) {
            Vec lo, hi;
            load2(px, lo, hi);
            lo = lo - sh_lo;
            hi = hi - sh_hi;
            a_lo = a_lo + lo;
            a_hi = a_hi + hi;
            q_lo = at::vec::fmadd(lo, lo, q_lo);
            q_hi = at::vec::fmadd(hi, hi, q_hi);
          }
          gn_simd::add_lanes(d1 + c, d2 + c, a_lo, a_hi, q_lo, q_hi);
        }
        for (; c < channels; ++c) {
          float s1 = 0.0f, s2 = 0.0f;
          for (int64_t p = p0; p < p1; ++p) {
            const float d = static_cast<float>(rows[(p - p0) * channels + c]) - sh[c];
            s1 += d;
            s2 += d * d;
          }
          d1[c] += s1;
          d2[c] += s2;
        }
      }
    }
  });

  std::vector<int64_t> far;  // channels of sample n whose first pixel lay too far from their mean
  for (int64_t n = 0; n < n_samples; ++n) {
    far.clear();
    for (int64_t c = 0; c < channels; ++c) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t k = 0; k < chunks; ++k) {
        const double* d = partial.data() + (n * chunks + k) * 2 * channels;
        s1 += d[c];
        s2 += d[channels + c];
      }
      const float sh = shift[n * channels + c];
      out[n * channels + c] = gn::moments_from_shifted_sums<double>(static_cast<double>(pixels), sh, s1, s2);
      if (gn::shift_is_far<double>(out[n * channels + c], sh)) far.push_back(c);
    }
    if (far.empty()) continue;
    // those channels again in double, shifted by their mean, in one pass over the sample's rows
    std::vector<double> t1(far.size(), 0.0), t2(far.size(), 0.0);
    std::vector<float> mean(far.size());
    for (size_t j = 0; j < far.size(); ++j) mean[j] = static_cast<float>(out[n * channels + far[j]].mean);
    for (int64_t p = 0; p < pixels; ++p) {
      const T* row = x + (n * pixels + p) * channels;
      for (size_t j = 0; j < far.size(); ++j) {
        const double d = static_cast<double>(static_cast<float>(row[far[j]]) - mean[j]);
        t1[j] += d;
        t2[j] += d * d;
      }
    }
    for (size_t j = 0; j < far.size(); ++j)
      out[n * channels + far[j]] =
          gn::moments_from_shifted_sums<double>(static_cast<double>(pixels), mean[j], t1[j], t2[j]);
  }
}

// ---- pass 2: y = a * x + b (+ SiLU) -----------------------------------------------------------

// A contiguous run of `len` elements sharing one (a, b).
template <typename T, bool kSilu>
void apply_plane(const T* x, T* y, int64_t len, float a, float b) {
#ifdef DDPM_GN_X86_AVX512
  if constexpr (kSilu && std::is_same_v<T, float>) {
    if (use_avx512()) return silu_plane_avx512(x, y, len, a, b);
  }
#endif
  const Vec va(a), vb(b);
  const int64_t vec_end = len - len % kStep;
  int64_t i = 0;
  for (; i < vec_end; i += kStep) {
    Vec lo, hi;
    load2(x + i, lo, hi);
    store2(y + i, fused_vec<kSilu>(lo, va, vb), fused_vec<kSilu>(hi, va, vb));
  }
  for (; i < len; ++i)
    y[i] = static_cast<T>(gn::apply_element(static_cast<float>(x[i]), a, b, kSilu));
}

// One pixel row of `channels` elements with per-channel coefficients a[c], b[c].
template <typename T, bool kSilu>
void apply_row(const T* x, T* y, int64_t channels, const float* a, const float* b) {
#ifdef DDPM_GN_X86_AVX512
  if constexpr (kSilu && std::is_same_v<T, float>) {
    if (use_avx512()) return silu_row_avx512(x, y, channels, a, b);
  }
#endif
  const int64_t vec_end = channels - channels % kStep;
  int64_t c = 0;
  for (; c < vec_end; c += kStep) {
    Vec lo, hi;
    load2(x + c, lo, hi);
    store2(y + c, fused_vec<kSilu>(lo, Vec::loadu(a + c), Vec::loadu(b + c)),
           fused_vec<kSilu>(hi, Vec::loadu(a + c + kVec), Vec::loadu(b + c + kVec)));
  }
  for (; c < channels; ++c)
    y[c] = static_cast<T>(gn::apply_element(static_cast<float>(x[c]), a[c], b[c], kSilu));
}

template <typename T, bool kSilu>
void apply_nchw(const T* x, T* y, int64_t planes, int64_t len, const float* a, const float* b) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(len, 1));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc)
      apply_plane<T, kSilu>(x + nc * len, y + nc * len, len, a[nc], b[nc]);
  });
}

template <typename T, bool kSilu>
void apply_nhwc(const T* x, T* y, int64_t n_samples, int64_t pixels, int64_t channels,
                const float* a, const float* b) {
  const int64_t grain = std::max<int64_t>(1, 32768 / channels);
  at::parallel_for(0, n_samples * pixels, grain, [&](int64_t begin, int64_t end) {
    int64_t n = begin / pixels, p = begin % pixels;  // no division per row
    for (int64_t row = begin; row < end; ++row) {
      apply_row<T, kSilu>(x + row * channels, y + row * channels, channels, a + n * channels,
                          b + n * channels);
      if (++p == pixels) {
        p = 0;
        ++n;
      }
    }
  });
}

// ---- the whole op on a dense NCHW-contiguous or channels-last-dense x -------------------------

using gn::Problem;

// The coefficients (a, b) of the cg channels of group g of sample n from their moments chan[0..cg)
// (and the group's mean and rstd into p.mean_out / p.rstd_out when given).
void group_coefficients(const Problem& p, int64_t n, int64_t g, const Moments<double>* chan, float* a,
                        float* b) {
  const int64_t cg = p.c / p.groups;
  Moments<double> m = gn::moments_empty<double>();
  for (int64_t j = 0; j < cg; ++j) m = gn::moments_merge(m, chan[j]);
  const double rstd = gn::group_rstd<double>(m, p.eps);
  if (p.mean_out) {
    p.mean_out[n * p.groups + g] = static_cast<float>(m.mean);
    p.rstd_out[n * p.groups + g] = static_cast<float>(rstd);
  }
  for (int64_t j = 0; j < cg; ++j) {
    const int64_t c = g * cg + j, nc = n * p.c + c;
    const ChannelAffine<double> f = gn::channel_affine<double>(
        m.mean, rstd, p.weight ? p.weight[c] : 1.0, p.bias ? p.bias[c] : 0.0,
        p.scale ? p.scale[nc] : 0.0, p.shift ? p.shift[nc] : 0.0);
    a[j] = static_cast<float>(f.a);
    b[j] = static_cast<float>(f.b);
  }
}

// Group statistics from the per-channel moments, then the per-(n, c) coefficients.
void fold_coefficients(const Problem& p, const Moments<double>* chan, float* a, float* b) {
  const int64_t cg = p.c / p.groups;
  for (int64_t n = 0; n < p.n; ++n)
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t first = n * p.c + g * cg;
      group_coefficients(p, n, g, chan + first, a + first, b + first);
    }
}

// NCHW with groups that fit in the L2 cache: one task per (n, group) reads its contiguous
// cg * pixels block for the statistics and applies the coefficients while the block is still in
// cache (one read of x from memory instead of two, one parallel region instead of two).
constexpr int64_t kCachedGroupBytes = 256 * 1024;

template <typename T>
bool use_cached_groups(const Problem& p) {
  const int64_t group_bytes = (p.c / p.groups) * p.pixels * static_cast<int64_t>(sizeof(T));
  return !p.channels_last && group_bytes <= kCachedGroupBytes &&
         p.n * p.groups >= 4 * at::get_num_threads();
}

template <typename T, bool kSilu>
void run_cached_groups(const Problem& p, const T* x, T* y) {
  const int64_t cg = p.c / p.groups, len = p.pixels;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cg * len, 1));
  at::parallel_for(0, p.n * p.groups, grain, [&](int64_t begin, int64_t end) {
    std::vector<Moments<double>> chan(cg);
    std::vector<float> a(cg), b(cg);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / p.groups, g = task % p.groups;
      const int64_t first = (n * p.c + g * cg) * len;
      for (int64_t j = 0; j < cg; ++j) chan[j] = plane_moments(x + first + j * len, len);
      group_coefficients(p, n, g, chan.data(), a.data(), b.data());
      for (int64_t j = 0; j < cg; ++j)
        apply_plane<T, kSilu>(x + first + j * len, y + first + j * len, len, a[j], b[j]);
    }
  });
}

template <typename T>
void run_dense(const Problem& p, const T* x, T* y) {
  if (use_cached_groups<T>(p)) {
    if (p.silu)
      run_cached_groups<T, true>(p, x, y);
    else
      run_cached_groups<T, false>(p, x, y);
    return;
  }
  std::vector<Moments<double>> chan(p.n * p.c);
  if (p.channels_last)
    channel_moments_nhwc(x, p.n, p.pixels, p.c, chan.data());
  else
    channel_moments_nchw(x, p.n * p.c, p.pixels, chan.data());
  std::vector<float> a(p.n * p.c), b(p.n * p.c);
  fold_coefficients(p, chan.data(), a.data(), b.data());
  if (p.channels_last) {
    if (p.silu)
      apply_nhwc<T, true>(x, y, p.n, p.pixels, p.c, a.data(), b.data());
    else
      apply_nhwc<T, false>(x, y, p.n, p.pixels, p.c, a.data(), b.data());
  } else {
    if (p.silu)
      apply_nchw<T, true>(x, y, p.n * p.c, p.pixels, a.data(), b.data());
    else
      apply_nchw<T, false>(x, y, p.n * p.c, p.pixels, a.data(), b.data());
  }
}

void run_dense_dispatch(const Problem& p, const at::Tensor& x, at::Tensor& y) {
  switch (x.scalar_type()) {
    case at::kFloat:
      run_dense<float>(p, x.const_data_ptr<float>(), y.mutable_data_ptr<float>());
      break;
    case at::kHalf:
      run_dense<c10::Half>(p, x.const_data_ptr<c10::Half>(), y.mutable_data_ptr<c10::Half>());
      break;
    case at::kBFloat16:
      run_dense<c10::BFloat16>(p, x.const_data_ptr<c10::BFloat16>(),
                               y.mutable_data_ptr<c10::BFloat16>());
      break;
    default:
      DDPM_CHECK(false, "group_norm_scale_shift: x must be float32, float16 or bfloat16");
  }
}

}  // namespace
}  // namespace ddpm_fast

#include "group_norm_cpu_simd_end.h"

// ---- host entry (baseline target) --------------------------------------------------------------
namespace ddpm_fast {
namespace {

// Without AVX2/FMA/F16C: the same math with composite ATen ops (statistics into `stats` when given).
at::Tensor composite(const at::Tensor& x, int64_t groups, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                     const std::optional<at::Tensor>& shift, double eps, bool silu, gn::Stats* stats) {
  std::vector<int64_t> per_channel(x.dim(), 1);
  per_channel[0] = x.size(0);
  per_channel[1] = x.size(1);
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor h = at::group_norm(xf, groups, gn::as_float(weight), gn::as_float(bias), eps);
  if (stats) {
    auto [var, mean] = at::var_mean(xf.reshape({x.size(0), groups, -1}), {2}, /*correction=*/0);
    *stats = gn::Stats{mean, (var + eps).rsqrt()};
  }
  if (scale.has_value()) h = h * (gn::as_float(scale)->reshape(per_channel) + 1.0);
  if (shift.has_value()) h = h + gn::as_float(shift)->reshape(per_channel);
  if (silu) h = at::silu(h);
  at::Tensor out = at::empty_like(x);
  out.copy_(h);
  return out;
}

// The forward; with `stats`, also the group statistics (N, G) fp32.
at::Tensor forward(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                   const std::optional<at::Tensor>& shift, double eps, bool silu, gn::Stats* stats) {
  gn::check_args(x, num_groups, weight, bias, scale, shift, eps);
  if (x.numel() == 0) {
    if (stats) *stats = gn::empty_stats(x, num_groups, eps);
    return at::empty_like(x);
  }
  if (!gn_simd::supported()) return composite(x, num_groups, weight, bias, scale, shift, eps, silu, stats);

  gn::Call call = gn::prepare_call(x, num_groups, weight, bias, scale, shift, eps, silu);
  if (stats) {
    *stats = gn::stats_buffers(x, num_groups);
    call.p.mean_out = stats->mean.mutable_data_ptr<float>();
    call.p.rstd_out = stats->rstd.mutable_data_ptr<float>();
  }
  run_dense_dispatch(call.p, call.layout.input, call.layout.result);
  return gn::finish_layout(call.layout);
}

}  // namespace
}  // namespace ddpm_fast

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("group_norm_scale_shift", &ddpm_fast::gn::forward_plain<&ddpm_fast::forward>);
  m.impl("group_norm_scale_shift_stats", &ddpm_fast::gn::forward_stats<&ddpm_fast::forward>);
}
