// CPU kernel of ddpm_fast::diffusion_step_backward: the gradients of x, model_output (every
// channel) and guidance_grad from the incoming gradients of x_prev and pred_x0 (definition: the
// autograd of ddpm_fast/reference.py diffusion_step; per-element math and its derivation:
// csrc/include/diffusion_step_backward_math.h). Nothing is saved by the forward: the backward
// recomputes the step from its inputs, redrawing in-kernel noise from (seed, step) with the same
// Philox counters (the noise is a constant of the step).
//
// Layout of the work (SIMD values and noise: csrc/cpu/diffusion_step_simd.h; the hot functions are
// compiled for AVX-512, AVX2+FMA and the baseline and chosen at run time, as in the forward):
//   * no projection: at::parallel_for over (sample, chunk of kChunk elements), one fused pass per
//     element (the forward values are recomputed only under the x_t clip, whose mask needs x_new);
//   * "pixel": over (sample, block of kPixels pixels): pass 1 stores x_new, x0, x_det and the
//     noise of every channel of the block in scratch and forms each pixel's |x_det - x0|^2 and
//     |x_new - x0|^2; pass 2 sums S = gout . (x_new - x0) per pixel; pass 3 applies the backward;
//   * "sample": over samples, the same three passes over the whole sample (kept in scratch).
// fp16 / bf16 tensors are converted to float32 around the float32 kernel; the gradients are
// returned in the dtypes of x, model_output and guidance_grad.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_isa.h"
#include "diffusion_step_args.h"
#include "diffusion_step_backward_math.h"
#include "diffusion_step_math.h"
#include "diffusion_step_simd.h"

namespace ddpm_fast {
namespace {

using step::Coefs;
using step::Options;

// ---- the call: pointers into float32 contiguous tensors and the options -----------------------------
struct Call : StepInputs {
  bool has_clip;
  float clip_lo, clip_hi;
  const float* gy;   // the gradient of x_prev, or null (zero)
  const float* gx0;  // the gradient of pred_x0, or null (zero)
  float* gx;      // the gradient of x
  float* gmo;     // of model_output (B, mo_channels, ...): its variance channels when read_var
  float* gguide;  // of guidance_grad, or null
  bool read_var;  // DDPM with a learned variance: model_output's variance channels are read
};

// One instruction set's kernels: B is the SIMD width in bytes.
template <int B>
struct Kernels {
  using V = Vec<B>;
  static constexpr int kLanes = V::kLanes;

  // Sample b's tensors from element `first` on.
  struct Row {
    const float *x, *pred, *var, *guide, *noise, *gy, *gx0;
    float *gx, *gpred, *gvar, *gguide;
  };
  static DDPM_CPU_INLINE Row row(const Call& a, int64_t b, int64_t first) {
    const int64_t at = b * a.g.numel + first, mo_at = b * a.g.mo_stride + first;
    return Row{a.x + at,
               a.model_output + mo_at,
               a.read_var ? a.model_output + mo_at + a.g.numel : nullptr,
               a.grad ? a.grad + at : nullptr,
               a.noise ? a.noise + at : nullptr,
               a.gy ? a.gy + at : nullptr,
               a.gx0 ? a.gx0 + at : nullptr,
               a.gx + at,
               a.gmo + mo_at,
               a.read_var ? a.gmo + mo_at + a.g.numel : nullptr,
               a.gguide ? a.gguide + at : nullptr};
  }

  static DDPM_CPU_INLINE V load_or_zero(const float* p, int64_t i, int n) { return p ? V::load(p + i, n) : V(0.0f); }

  // The noise of elements r0 .. r1 - 1 of the run at `first` of sample b (r1 - r0 <= kNoiseRun), as
  // a pointer indexed from r0: drawn into s.z, the given noise, or null (no noise).
  static DDPM_CPU_INLINE const float* noise_of(const Call& a, const Row& r, philox::Key key, int64_t first,
                                               int64_t r0, int64_t r1, Scratch& s) {
    if (a.seed) {
      draw_normals<B>(key, a.step, first + r0, r1 - r0, s);
      return s.z.data();
    }
    return r.noise ? r.noise + r0 : nullptr;
  }

  static DDPM_CPU_INLINE void store(const Row& r, int64_t i, int n, const step::Grads<V>& g) {
    g.x.store(r.gx + i, n);
    g.pred.store(r.gpred + i, n);
    if (r.gvar) g.var.store(r.gvar + i, n);
    if (r.gguide) g.guide.store(r.gguide + i, n);
  }

  // No projection: work items [begin, end) of (sample, chunk).
  static DDPM_CPU_INLINE void items_plain(const Call& a, int64_t begin, int64_t end) {
    const int64_t chunks = (a.g.numel + kChunk - 1) / kChunk;
    const Options o = a.o;
    Scratch s;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, first = (item % chunks) * kChunk;
      const int64_t count = std::min(kChunk, a.g.numel - first);
      const Coefs k = a.coefs[b];  // local copies: stores through float pointers cannot alias them
      const Row r = row(a, b, first);
      const philox::Key key = a.seed ? philox::key_of_seed(a.seed[b]) : philox::Key{0, 0};
      for (int64_t r0 = 0; r0 < count; r0 += kNoiseRun) {
        const int64_t r1 = std::min(count, r0 + kNoiseRun);
        const float* z = noise_of(a, r, key, first, r0, r1, s);
        for (int64_t i = r0; i < r1; i += kLanes) {
          const int n = static_cast<int>(std::min<int64_t>(kLanes, r1 - i));
          const V x = V::load(r.x + i, n), pred = V::load(r.pred + i, n);
          const V var = load_or_zero(r.var, i, n), guide = load_or_zero(r.guide, i, n);
          const V zv = z ? V::load(z + (i - r0), n) : V(0.0f);
          V gout = load_or_zero(r.gy, i, n);
          if (a.has_clip) {  // the clip's mask needs x_new
            const step::Values<V> v = step::step_element<V>(k, o, x, pred, var, guide);
            gout = step_clamp_pass(z ? v.x_det + v.scale * zv : v.x_det, a.clip_lo, a.clip_hi, gout);
          }
          store(r, i, n,
                step::step_element_backward<V>(k, o, z != nullptr, x, pred, var, guide, zv, gout, V(0.0f),
                                               load_or_zero(r.gx0, i, n)));
        }
      }
    }
  }

  // Pass 1 of a projection over the run of `count` elements at `first` of sample b: x_new, x0,
  // x_det and the noise (zeros without one) into the scratch arrays (indexed from 0).
  static DDPM_CPU_INLINE void values_run(const Call& a, int64_t b, int64_t first, int64_t count, float* x_new,
                                         float* x0, float* x_det, float* noise, Scratch& s) {
    const Options o = a.o;
    const Coefs k = a.coefs[b];
    const Row r = row(a, b, first);
    const philox::Key key = a.seed ? philox::key_of_seed(a.seed[b]) : philox::Key{0, 0};
    for (int64_t r0 = 0; r0 < count; r0 += kNoiseRun) {
      const int64_t r1 = std::min(count, r0 + kNoiseRun);
      const float* z = noise_of(a, r, key, first, r0, r1, s);
      for (int64_t i = r0; i < r1; i += kLanes) {
        const int n = static_cast<int>(std::min<int64_t>(kLanes, r1 - i));
        const step::Values<V> v = step::step_element<V>(k, o, V::load(r.x + i, n), V::load(r.pred + i, n),
                                                         load_or_zero(r.var, i, n), load_or_zero(r.guide, i, n));
        const V zv = z ? V::load(z + (i - r0), n) : V(0.0f);
        (z ? v.x_det + v.scale * zv : v.x_det).store(x_new + i, n);
        v.x0.store(x0 + i, n);
        v.x_det.store(x_det + i, n);
        zv.store(noise + i, n);
      }
    }
  }

  // The gradient of the projected result after the clip, from the stored values (factor f).
  template <class P>
  static DDPM_CPU_INLINE V clipped_gout(const Call& a, const Row& r, int64_t i, int n, P f, V x0, V e) {
    const V gy = load_or_zero(r.gy, i, n);
    return a.has_clip ? step_clamp_pass(x0 + f * e, a.clip_lo, a.clip_hi, gy) : gy;
  }

  // Pass 3 of a projection over a run (as values_run): the gradients, with the group coefficients
  // f, along_e, along_d per lane (kPerLane: arrays indexed like the run, the pixel projection) or
  // one per run (the sample projection).
  template <bool kPerLane>
  static DDPM_CPU_INLINE void backward_run(const Call& a, int64_t b, int64_t first, int64_t count,
                                           const float* x_new, const float* x0, const float* x_det,
                                           const float* noise, const float* f, const float* along_e,
                                           const float* along_d) {
    const Options o = a.o;
    const Coefs k = a.coefs[b];
    const Row r = row(a, b, first);
    const bool has_noise = a.seed || a.noise;
    for (int64_t i = 0; i < count; i += kLanes) {
      const int n = static_cast<int>(std::min<int64_t>(kLanes, count - i));
      const V fv = kPerLane ? V::load(f + i, n) : V(f[0]);
      const V ae = kPerLane ? V::load(along_e + i, n) : V(along_e[0]);
      const V ad = kPerLane ? V::load(along_d + i, n) : V(along_d[0]);
      const V x0v = V::load(x0 + i, n), e = V::load(x_new + i, n) - x0v, d = V::load(x_det + i, n) - x0v;
      const step::ProjectedGrads<V> p =
          step::projection_backward(fv, ae, ad, clipped_gout(a, r, i, n, fv, x0v, e), load_or_zero(r.gx0, i, n), e, d);
      store(r, i, n,
            step::step_element_backward<V>(k, o, has_noise, V::load(r.x + i, n), V::load(r.pred + i, n),
                                           load_or_zero(r.var, i, n), load_or_zero(r.guide, i, n),
                                           V::load(noise + i, n), p.g_new, p.g_det, p.g_x0));
    }
  }

  // Projection "pixel": work items [begin, end) of (sample, block of kPixels pixels); channel c of
  // pixel p is element c * pixels + p, stored at c * kPixels + (p - p0) in the scratch arrays.
  static DDPM_CPU_INLINE void items_pixel(const Call& a, int64_t begin, int64_t end) {
    const int64_t c_count = a.g.channels, hw = a.g.pixels;
    const int64_t blocks = (hw + kPixels - 1) / kPixels, plane = c_count * kPixels;
    Scratch s(4 * plane + 5 * kPixels);
    float* x_new = s.buf.data();
    float* x0 = x_new + plane;
    float* x_det = x0 + plane;
    float* noise = x_det + plane;
    float* radius2 = noise + plane;
    float* length2 = radius2 + kPixels;
    float* factor = length2 + kPixels;
    float* along_e = factor + kPixels;
    float* along_d = along_e + kPixels;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, p0 = (item % blocks) * kPixels;
      const int64_t count = std::min(kPixels, hw - p0);
      for (int64_t c = 0; c < c_count; ++c) {
        values_run(a, b, c * hw + p0, count, x_new + c * kPixels, x0 + c * kPixels, x_det + c * kPixels,
                   noise + c * kPixels, s);
      }
      for (int64_t i = 0; i < count; i += kLanes) {  // the norms, then f per pixel
        const int n = static_cast<int>(std::min<int64_t>(kLanes, count - i));
        V r2(0.0f), l2(0.0f);
        for (int64_t c = 0; c < c_count; ++c) {
          const V x0v = V::load(x0 + c * kPixels + i, n);
          const V d = V::load(x_det + c * kPixels + i, n) - x0v, e = V::load(x_new + c * kPixels + i, n) - x0v;
          r2 = r2 + d * d;
          l2 = l2 + e * e;
        }
        r2.store(radius2 + i, n);
        l2.store(length2 + i, n);
      }
      for (int64_t i = 0; i < count; ++i) factor[i] = step::projection_factor(radius2[i], length2[i]);
      for (int64_t i = 0; i < count; i += kLanes) {  // S per pixel
        const int n = static_cast<int>(std::min<int64_t>(kLanes, count - i));
        const V fv = V::load(factor + i, n);
        V sum(0.0f);
        for (int64_t c = 0; c < c_count; ++c) {
          const Row r = row(a, b, c * hw + p0);
          const V x0v = V::load(x0 + c * kPixels + i, n), e = V::load(x_new + c * kPixels + i, n) - x0v;
          sum = sum + clipped_gout(a, r, i, n, fv, x0v, e) * e;
        }
        sum.store(along_e + i, n);  // S, until the coefficients replace it
      }
      for (int64_t i = 0; i < count; ++i) {
        const step::ProjectionGrad pg = step::projection_grad_coefs(radius2[i], length2[i], along_e[i]);
        along_e[i] = pg.along_e;
        along_d[i] = pg.along_d;
      }
      for (int64_t c = 0; c < c_count; ++c) {
        backward_run<true>(a, b, c * hw + p0, count, x_new + c * kPixels, x0 + c * kPixels, x_det + c * kPixels,
                           noise + c * kPixels, factor, along_e, along_d);
      }
    }
  }

  // Projection "sample": whole samples [begin, end), the three passes over the sample in scratch.
  static DDPM_CPU_INLINE void items_sample(const Call& a, int64_t begin, int64_t end) {
    const int64_t numel = a.g.numel;
    Scratch s(4 * numel);
    float* x_new = s.buf.data();
    float* x0 = x_new + numel;
    float* x_det = x0 + numel;
    float* noise = x_det + numel;
    for (int64_t b = begin; b < end; ++b) {
      double r2 = 0.0, l2 = 0.0, sum = 0.0;
      for (int64_t first = 0; first < numel; first += kChunk) {  // pass 1 and the norms
        const int64_t count = std::min(kChunk, numel - first);
        values_run(a, b, first, count, x_new + first, x0 + first, x_det + first, noise + first, s);
        V r2v(0.0f), l2v(0.0f);
        for (int64_t i = first; i < first + count; i += kLanes) {
          const int n = static_cast<int>(std::min<int64_t>(kLanes, first + count - i));
          const V x0v = V::load(x0 + i, n);
          const V d = V::load(x_det + i, n) - x0v, e = V::load(x_new + i, n) - x0v;
          r2v = r2v + d * d;
          l2v = l2v + e * e;
        }
        r2 += r2v.sum();
        l2 += l2v.sum();
      }
      const float f = step::projection_factor(static_cast<float>(r2), static_cast<float>(l2));
      const Row r = row(a, b, 0);
      for (int64_t first = 0; first < numel; first += kChunk) {  // pass 2: S
        const int64_t count = std::min(kChunk, numel - first);
        V sv(0.0f);
        for (int64_t i = first; i < first + count; i += kLanes) {
          const int n = static_cast<int>(std::min<int64_t>(kLanes, first + count - i));
          const V x0v = V::load(x0 + i, n), e = V::load(x_new + i, n) - x0v;
          sv = sv + clipped_gout(a, r, i, n, f, x0v, e) * e;
        }
        sum += sv.sum();
      }
      const step::ProjectionGrad pg =
          step::projection_grad_coefs(static_cast<float>(r2), static_cast<float>(l2), static_cast<float>(sum));
      backward_run<false>(a, b, 0, numel, x_new, x0, x_det, noise, &pg.factor, &pg.along_e, &pg.along_d);
    }
  }
};

// Returns (grad_x in x's dtype, grad_model_output shaped and typed like model_output, grad_guidance
// in guidance_grad's dtype or an empty tensor without one).
std::tuple<at::Tensor, at::Tensor, at::Tensor> diffusion_step_backward_cpu(
    const std::optional<at::Tensor>& grad_x_prev, const std::optional<at::Tensor>& grad_x0, const at::Tensor& x,
    const at::Tensor& model_output, const at::Tensor& coef, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& step,
    const std::optional<at::Tensor>& guidance_grad, int64_t method, int64_t prediction, int64_t variance,
    bool clip_denoised, int64_t noise_mode, int64_t project_noise, std::optional<double> clip_lo,
    std::optional<double> clip_hi, bool eps_from_x0) {
  Call a{};
  a.g = step::check_arguments(x, model_output, coef, noise, seed, step, guidance_grad, method, prediction, variance,
                              clip_denoised, noise_mode, project_noise, clip_lo, clip_hi, eps_from_x0, a.o);
  step::check_backward_arguments(x, grad_x_prev, grad_x0);
  DDPM_CHECK(x.device().is_cpu(), "the CPU kernel got x on ", x.device());

  const auto as_float = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
  };
  const at::Tensor xf = as_float(x), mof = as_float(model_output), coeff = as_float(coef);
  at::Tensor noisef, guidef, gyf, gx0f;
  if (noise.has_value()) noisef = as_float(*noise);
  if (guidance_grad.has_value()) guidef = as_float(*guidance_grad);
  if (grad_x_prev.has_value()) gyf = as_float(*grad_x_prev);
  if (grad_x0.has_value()) gx0f = as_float(*grad_x0);
  a.read_var = a.o.method == step::kDdpm && step::learned_variance(a.o.variance);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor gx = at::empty(x.sizes(), f32);
  // the variance channels of model_output get 0 unless the kernel writes them (read_var)
  at::Tensor gmo = model_output.size(1) != x.size(1) && !a.read_var ? at::zeros(model_output.sizes(), f32)
                                                                     : at::empty(model_output.sizes(), f32);
  at::Tensor gguide = guidance_grad.has_value() ? at::empty(x.sizes(), f32) : at::Tensor();

  std::vector<Coefs> coefs(a.g.batch);
  const float* rows = coeff.data_ptr<float>();
  for (int64_t b = 0; b < a.g.batch; ++b) coefs[b] = step::load_coefs(rows + b * step::kNumCoefs);

  a.x = xf.data_ptr<float>();
  a.model_output = mof.data_ptr<float>();
  a.noise = noise.has_value() ? noisef.data_ptr<float>() : nullptr;
  a.grad = guidance_grad.has_value() ? guidef.data_ptr<float>() : nullptr;
  a.coefs = coefs.data();
  const at::Tensor seedc = seed.has_value() ? seed->contiguous() : at::Tensor();
  a.seed = seed.has_value() ? seedc.data_ptr<int64_t>() : nullptr;
  a.step = philox::step_words(step.has_value() ? *step->const_data_ptr<int64_t>() : 0);
  a.has_clip = clip_lo.has_value();
  a.clip_lo = a.has_clip ? static_cast<float>(*clip_lo) : 0.0f;
  a.clip_hi = a.has_clip ? static_cast<float>(*clip_hi) : 0.0f;
  a.gy = grad_x_prev.has_value() ? gyf.data_ptr<float>() : nullptr;
  a.gx0 = grad_x0.has_value() ? gx0f.data_ptr<float>() : nullptr;
  a.gx = gx.data_ptr<float>();
  a.gmo = gmo.data_ptr<float>();
  a.gguide = guidance_grad.has_value() ? gguide.data_ptr<float>() : nullptr;

  run_parallel<Kernels>(a);

  const auto in_dtype = [](const at::Tensor& t, at::ScalarType dtype) {
    return t.scalar_type() == dtype ? t : t.to(dtype);
  };
  return {in_dtype(gx, x.scalar_type()), in_dtype(gmo, model_output.scalar_type()),
          guidance_grad.has_value() ? in_dtype(gguide, guidance_grad->scalar_type()) : at::empty({0}, x.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("diffusion_step_backward", &diffusion_step_backward_cpu); }

}  // namespace ddpm_fast
