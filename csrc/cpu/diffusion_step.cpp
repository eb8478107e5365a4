// CPU kernel of ddpm_fast::diffusion_step: one pass over x / model_output / noise per element,
// in-kernel Philox noise, projections, clip (definition: ddpm_fast/reference.py diffusion_step).
//
// Layout of the work:
//   * the arithmetic runs on SIMD values of the register width (Vec below: GCC vector extensions)
//     through the shared per-element math (csrc/include/diffusion_step_math.h; its affine form
//     where the options allow, so that the loop has no per-element option branches); the noise
//     comes from the shared generator (csrc/include/philox.h) in loops the compiler vectorises,
//     or with AVX2 / AVX-512 from its intrinsics versions (csrc/cpu/philox_avx2.h,
//     philox_avx512.h), drawn kNoiseRun elements at a time into an L1-resident buffer;
//     the hot functions are compiled for AVX-512, AVX2+FMA and the baseline and chosen at run time
//     (DDPM_FAST_CPU_ISA=avx2|baseline caps the choice);
//   * no projection: at::parallel_for over (sample, chunk of kChunk elements);
//   * "pixel": over (sample, block of kPixels pixels), channels iterated per pixel (NCHW: channel
//     c of pixel p is element c * pixels + p);
//   * "sample": over samples; pass 1 writes x_new and x0 while summing |x_det - x0|^2 and
//     |x_new - x0|^2, pass 2 rescales x_new in place (the image is still in cache).
// fp16 / bf16 tensors are converted to float32 around the float32 kernel (this backend's fast
// path is float32; the arithmetic is fp32 in every case).
// Vector-extension values are passed between always-inlined functions only, never across an ABI
// boundary: GCC's notes on how their calling convention depends on -mavx* do not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#include "diffusion_step_args.h"
#include "diffusion_step_math.h"
#include "diffusion_step_simd.h"

namespace ddpm_fast {
namespace {

using step::Coefs;
using step::Options;

// ---- the call: pointers into float32 contiguous tensors and the options -----------------------------
struct Call : StepInputs {
  float clip_lo, clip_hi;  // the x_t clip, or -inf, inf
  float* out;  // x_prev
  float* x0;   // pred_x0, or null
};

// The forms of the per-element step in the CPU loops: step_element, or the affine form with an x term
// (kAffineX), a pred term (kAffinePred) or both in x_det.
constexpr int kGeneral = 0, kAffineX = 1, kAffinePred = 2;

// One instruction set's kernels: B is the SIMD width in bytes.
template <int B>
struct Kernels {
  using V = Vec<B>;
  static constexpr int kLanes = V::kLanes;

  // The x_t clip (clip_lo, clip_hi are -inf, inf without one: no branch in the loops).
  static DDPM_CPU_INLINE V clip(const Call& a, V v) { return step_clamp(v, a.clip_lo, a.clip_hi); }

  // The step before projection for elements first .. first + count - 1 of sample b: x_new -> x_new
  // (clipped unless kProjected), pred_x0 -> x0 (if not null), and with kProjected x_det -> x_det and
  // the sums of |x_det - x0|^2 and |x_new - x0|^2 over the run added to sums[0..1] (if not null).
  // kForm: kGeneral (step::step_element), or the options have step::affine_form, f is sample b's,
  // and kForm says which of its x_det terms exist (the loop then has no per-element option branches).
  template <int kForm, bool kProjected>
  static DDPM_CPU_INLINE void run_elements_as(const Call& a, int64_t b, int64_t first, int64_t count, float* x_new,
                                              float* x0, float* x_det, double* sums, Scratch& s,
                                              const step::Affine& f) {
    const Options o = a.o;
    const Coefs k = a.coefs[b];  // local copies: stores through float pointers cannot alias them
    const float* xb = a.x + b * a.g.numel + first;
    const float* pred = a.model_output + b * a.g.mo_stride + first;
    const bool read_var = o.method == step::kDdpm && step::learned_variance(o.variance);
    const float* var = read_var ? pred + a.g.numel : nullptr;
    const float* grad = a.grad ? a.grad + b * a.g.numel + first : nullptr;
    const philox::Key key = a.seed ? philox::key_of_seed(a.seed[b]) : philox::Key{0, 0};
    const float* noise = a.noise ? a.noise + b * a.g.numel + first : nullptr;
    V radius2(0.0f), length2(0.0f);
    for (int64_t r0 = 0; r0 < count; r0 += kNoiseRun) {
      const int64_t r1 = std::min(count, r0 + kNoiseRun);
      const float* z = noise ? noise + r0 : nullptr;  // the noise of elements r0 .. r1 - 1
      if (a.seed) {
        draw_normals<B>(key, a.step, first + r0, r1 - r0, s);
        z = s.z.data();
      }
      for (int64_t i = r0; i < r1; i += kLanes) {
        const int n = static_cast<int>(std::min<int64_t>(kLanes, r1 - i));
        const V xv = V::load(xb + i, n);
        const V pv = V::load(pred + i, n);
        step::Values<V> r;
        if constexpr (kForm != kGeneral) {
          r = step::affine_step_element<V, (kForm & kAffineX) != 0, (kForm & kAffinePred) != 0>(f, xv, pv);
        } else {
          const V vv = var ? V::load(var + i, n) : V(0.0f);
          const V gv = grad ? V::load(grad + i, n) : V(0.0f);
          r = step::step_element<V>(k, o, xv, pv, vv, gv);
        }
        const V xn = z ? r.x_det + r.scale * V::load(z + (i - r0), n) : r.x_det;
        (kProjected ? xn : clip(a, xn)).store(x_new + i, n);
        if (x0) r.x0.store(x0 + i, n);
        if constexpr (kProjected) r.x_det.store(x_det + i, n);
        if (kProjected && sums) {
          const V d = (r.x_det - r.x0).first(n), e = (xn - r.x0).first(n);
          radius2 = radius2 + d * d;
          length2 = length2 + e * e;
        }
      }
    }
    if (kProjected && sums) {
      sums[0] += radius2.sum();
      sums[1] += length2.sum();
    }
  }

  template <bool kProjected>
  static DDPM_CPU_INLINE void run_elements(const Call& a, int64_t b, int64_t first, int64_t count, float* x_new,
                                           float* x0, float* x_det, double* sums, Scratch& s) {
    if (!step::has_affine_form(a.o)) {
      run_elements_as<kGeneral, kProjected>(a, b, first, count, x_new, x0, x_det, sums, s, step::Affine{});
      return;
    }
    const step::Affine f = step::affine_form(a.coefs[b], a.o);
    switch ((f.uses_x ? kAffineX : 0) | (f.uses_pred ? kAffinePred : 0)) {
      case kAffineX:
        run_elements_as<kAffineX, kProjected>(a, b, first, count, x_new, x0, x_det, sums, s, f);
        break;
      case kAffinePred:
        run_elements_as<kAffinePred, kProjected>(a, b, first, count, x_new, x0, x_det, sums, s, f);
        break;
      default:
        run_elements_as<kAffineX | kAffinePred, kProjected>(a, b, first, count, x_new, x0, x_det, sums, s, f);
    }
  }

  // No projection: work items [begin, end) of (sample, chunk).
  static DDPM_CPU_INLINE void items_plain(const Call& a, int64_t begin, int64_t end) {
    const int64_t chunks = (a.g.numel + kChunk - 1) / kChunk;
    Scratch s;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, first = (item % chunks) * kChunk;
      const int64_t count = std::min(kChunk, a.g.numel - first);
      const int64_t offset = b * a.g.numel + first;
      run_elements<false>(a, b, first, count, a.out + offset, a.x0 ? a.x0 + offset : nullptr, nullptr, nullptr, s);
    }
  }

  // Projection "pixel": work items [begin, end) of (sample, block of kPixels pixels); channel c of
  // pixel p is element c * pixels + p.
  static DDPM_CPU_INLINE void items_pixel(const Call& a, int64_t begin, int64_t end) {
    const int64_t c_count = a.g.channels, hw = a.g.pixels;
    const int64_t blocks = (hw + kPixels - 1) / kPixels;
    Scratch s(3 * c_count * kPixels + 3 * kPixels);
    float* x_new = s.buf.data();
    float* x0 = x_new + c_count * kPixels;
    float* x_det = x0 + c_count * kPixels;
    float* radius2 = x_det + c_count * kPixels;
    float* length2 = radius2 + kPixels;
    float* factor = length2 + kPixels;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, p0 = (item % blocks) * kPixels;
      const int64_t count = std::min(kPixels, hw - p0);
      for (int64_t c = 0; c < c_count; ++c) {
        run_elements<true>(a, b, c * hw + p0, count, x_new + c * kPixels, x0 + c * kPixels, x_det + c * kPixels,
                           nullptr, s);
      }
      for (int64_t i = 0; i < count; i += kLanes) {
        const int n = static_cast<int>(std::min<int64_t>(kLanes, count - i));
        V r2(0.0f), l2(0.0f);
        for (int64_t c = 0; c < c_count; ++c) {
          const V x0v = V::load(x0 + c * kPixels + i, n);
          const V d = V::load(x_det + c * kPixels + i, n) - x0v;
          const V e = V::load(x_new + c * kPixels + i, n) - x0v;
          r2 = r2 + d * d;
          l2 = l2 + e * e;
        }
        r2.store(radius2 + i, n);
        l2.store(length2 + i, n);
      }
      for (int64_t i = 0; i < count; ++i) {  // vectorised by the compiler (no libm calls)
        const float l2 = length2[i];
        const float ratio = radius2[i] / (l2 > 0.0f ? l2 : 1.0f);
        factor[i] = l2 > 0.0f && ratio > 0.0f ? philox::sqrt_positive(ratio) : 0.0f;
      }
      for (int64_t c = 0; c < c_count; ++c) {
        const int64_t offset = b * a.g.numel + c * hw + p0;
        for (int64_t i = 0; i < count; i += kLanes) {
          const int n = static_cast<int>(std::min<int64_t>(kLanes, count - i));
          const V x0v = V::load(x0 + c * kPixels + i, n);
          const V xn = V::load(x_new + c * kPixels + i, n);
          clip(a, x0v + V::load(factor + i, n) * (xn - x0v)).store(a.out + offset + i, n);
          if (a.x0) x0v.store(a.x0 + offset + i, n);
        }
      }
    }
  }

  // Projection "sample": whole samples [begin, end). Pass 1 writes x_new to out (and x0) and sums
  // the two squared norms; pass 2 rescales out in place while the sample is still in cache.
  static DDPM_CPU_INLINE void items_sample(const Call& a, int64_t begin, int64_t end) {
    const int64_t numel = a.g.numel;
    Scratch s(kChunk + (a.x0 ? 0 : numel));
    float* x_det = s.buf.data();
    for (int64_t b = begin; b < end; ++b) {
      float* out = a.out + b * numel;
      float* x0 = a.x0 ? a.x0 + b * numel : x_det + kChunk;
      double sums[2] = {0.0, 0.0};
      for (int64_t first = 0; first < numel; first += kChunk) {
        const int64_t count = std::min(kChunk, numel - first);
        run_elements<true>(a, b, first, count, out + first, x0 + first, x_det, sums, s);
      }
      const float f = step::projection_factor(static_cast<float>(sums[0]), static_cast<float>(sums[1]));
      for (int64_t i = 0; i < numel; i += kLanes) {
        const int n = static_cast<int>(std::min<int64_t>(kLanes, numel - i));
        const V x0v = V::load(x0 + i, n);
        clip(a, x0v + f * (V::load(out + i, n) - x0v)).store(out + i, n);
      }
    }
  }
};

std::tuple<at::Tensor, at::Tensor> diffusion_step_cpu(
    const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& coef,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
    const std::optional<at::Tensor>& step, const std::optional<at::Tensor>& guidance_grad, int64_t method,
    int64_t prediction, int64_t variance, bool clip_denoised, int64_t noise_mode, int64_t project_noise,
    std::optional<double> clip_lo, std::optional<double> clip_hi, bool eps_from_x0, bool return_x0) {
  Call a{};
  a.g = step::check_arguments(x, model_output, coef, noise, seed, step, guidance_grad, method, prediction, variance,
                              clip_denoised, noise_mode, project_noise, clip_lo, clip_hi, eps_from_x0, a.o);
  DDPM_CHECK(x.device().is_cpu(), "the CPU kernel got x on ", x.device());

  // (already float32 and contiguous: the tensor itself, without a dispatcher round trip per call)
  const auto as_float = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
  };
  const at::Tensor xf = as_float(x), mof = as_float(model_output), coeff = as_float(coef);
  at::Tensor noisef, gradf;
  if (noise.has_value()) noisef = as_float(*noise);
  if (guidance_grad.has_value()) gradf = as_float(*guidance_grad);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  at::Tensor x0 = return_x0 ? at::empty(x.sizes(), x.options().dtype(at::kFloat)) : at::Tensor();

  std::vector<Coefs> coefs(a.g.batch);
  const float* rows = coeff.data_ptr<float>();
  for (int64_t b = 0; b < a.g.batch; ++b) coefs[b] = step::load_coefs(rows + b * step::kNumCoefs);

  a.x = xf.data_ptr<float>();
  a.model_output = mof.data_ptr<float>();
  a.noise = noise.has_value() ? noisef.data_ptr<float>() : nullptr;
  a.grad = guidance_grad.has_value() ? gradf.data_ptr<float>() : nullptr;
  a.coefs = coefs.data();
  const at::Tensor seedc = seed.has_value() ? seed->contiguous() : at::Tensor();
  a.seed = seed.has_value() ? seedc.data_ptr<int64_t>() : nullptr;
  a.step = philox::step_words(step.has_value() ? *step->const_data_ptr<int64_t>() : 0);  // a 0-dim CPU int64
  a.clip_lo = clip_lo.has_value() ? static_cast<float>(*clip_lo) : -INFINITY;
  a.clip_hi = clip_hi.has_value() ? static_cast<float>(*clip_hi) : INFINITY;
  a.out = out.data_ptr<float>();
  a.x0 = return_x0 ? x0.data_ptr<float>() : nullptr;

  run_parallel<Kernels>(a);

  const auto dtype = x.scalar_type();
  if (dtype != at::kFloat) {
    out = out.to(dtype);
    if (return_x0) x0 = x0.to(dtype);
  }
  return {out, return_x0 ? x0 : at::empty({0}, x.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("diffusion_step", &diffusion_step_cpu); }

}  // namespace ddpm_fast
