// CUDA kernel of ddpm_fast::diffusion_step_backward (definition: the autograd of
// ddpm_fast/reference.py diffusion_step; per-element math and its derivation:
// csrc/include/diffusion_step_backward_math.h). The step is recomputed from the forward's inputs
// (nothing saved), in-kernel noise redrawn with the forward's Philox counters (a constant).
//
// Every thread handles 4 consecutive elements of one sample (one Philox block) as the forward
// (csrc/cuda/diffusion_step.cu) does; grid = (ceil(numel / (4 * kThreads)), samples), launched once
// per chunk of at most the grid's y limit samples starting at Params::batch_offset.
//   * no projection: one kernel, one pass (reads x, model_output [, noise, guidance, the incoming
//     gradients], writes grad_x, grad_model_output [, grad_guidance]);
//   * "pixel": each thread takes 4 consecutive pixels and loops over the channels three times
//     (norms; S = sum(gout (x_new - x0)); the gradients), recomputing the step each time;
//   * "sample": kStats writes each block's partial sums of |x_det - x0|^2, |x_new - x0|^2 and
//     (without the x_t clip) S; sums_kernel (one block per sample) reduces them in a fixed order;
//     with the clip, whose mask needs the projection factor, kSums recomputes S and sums_kernel runs
//     again; kApply writes the gradients.
// x, the noise, the guidance and the incoming gradients are read in x's dtype S, model_output in M;
// grad_x and grad_guidance are written in S, grad_model_output in M.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "diffusion_step_args.h"
#include "diffusion_step_backward_math.h"
#include "diffusion_step_cuda.h"
#include "diffusion_step_math.h"

namespace ddpm_fast {
namespace {

using namespace step_cuda;  // NOLINT(google-build-using-namespace): the shared device helpers
using step::Coefs;
using step::Options;

enum Mode : int { kPlain = 0, kStats = 1, kSums = 2, kApply = 3 };

struct Params : StepParams {
  bool read_var;   // DDPM with a learned variance: model_output's variance channels are read
  float* partial;  // (B, blocks, 3) partial sums of the sample projection
  float* sums;     // (B, 3) their per-sample totals
  int mode;        // backward_kernel's pass (Mode)
};

template <class S, class M>
struct Tensors {
  const S* x;
  const M* model_output;
  const S* noise;  // or null
  const S* guide;  // or null
  const S* gy;     // the gradient of x_prev, or null (zero)
  const S* gx0;    // the gradient of pred_x0, or null (zero)
  S* gx;
  M* gmo;
  S* gguide;  // or null
};

// The inputs and forward values of 4 elements.
struct Element4 {
  float x[4], pred[4], var[4], guide[4], z[4];
  float x_new[4], x0[4], x_det[4];
};

// Elements at .. at + 3 of sample b (the run from `at` holds `limit` elements; zeros past it).
template <class S, class M>
__device__ __forceinline__ void load_step4(const Tensors<S, M>& t, const Params& p, const Coefs& k, int64_t b,
                                           int64_t at, int64_t limit, bool vector_io, Element4& v) {
  const Options& o = p.o;
  const int64_t n = p.numel;
  load4(t.x + b * n + at, 0, limit, vector_io, v.x);
  load4(t.model_output + b * p.mo_stride + at, 0, limit, vector_io, v.pred);
#pragma unroll
  for (int e = 0; e < 4; ++e) v.var[e] = v.guide[e] = 0.0f;
  if (p.read_var) load4(t.model_output + b * p.mo_stride + n + at, 0, limit, vector_io, v.var);
  if (o.has_grad) load4(t.guide + b * n + at, 0, limit, vector_io, v.guide);
  noise4(p.seed, p.step, t.noise != nullptr ? t.noise + b * n : nullptr, b, at, at + limit, vector_io, v.z);
  const bool has_noise = p.seed != nullptr || t.noise != nullptr;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const step::Values<float> r = step::step_element<float>(k, o, v.x[e], v.pred[e], v.var[e], v.guide[e]);
    v.x_new[e] = has_noise ? r.x_det + r.scale * v.z[e] : r.x_det;
    v.x0[e] = r.x0;
    v.x_det[e] = r.x_det;
  }
}

// The incoming gradient of 4 elements of a tensor like x (zeros when absent).
template <class S>
__device__ __forceinline__ void load_grad4(const S* g, int64_t offset, int64_t limit, bool vector_io, float v[4]) {
  if (g != nullptr) {
    load4(g + offset, 0, limit, vector_io, v);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = 0.0f;
  }
}

// The gradient of x_prev through the x_t clip of `value` (its input).
__device__ __forceinline__ float clipped(const Params& p, float value, float g) {
  return p.has_clip ? step::step_clamp_pass(value, p.clip_lo, p.clip_hi, g) : g;
}

// The gradients of the 4 elements at `at` of sample b from those reaching x_new, x_det and x0.
template <class S, class M>
__device__ __forceinline__ void backward4(const Tensors<S, M>& t, const Params& p, const Coefs& k, int64_t b,
                                          int64_t at, int64_t limit, bool vector_io, const Element4& v,
                                          const float g_new[4], const float g_det[4], const float g_x0[4]) {
  const bool has_noise = p.seed != nullptr || t.noise != nullptr;
  float gx[4], gpred[4], gvar[4], gguide[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const step::Grads<float> g = step::step_element_backward<float>(k, p.o, has_noise, v.x[e], v.pred[e], v.var[e],
                                                                    v.guide[e], v.z[e], g_new[e], g_det[e], g_x0[e]);
    gx[e] = g.x;
    gpred[e] = g.pred;
    gvar[e] = g.var;
    gguide[e] = g.guide;
  }
  const int64_t base = b * p.numel + at, mo_base = b * p.mo_stride + at;
  store4(t.gx + base, 0, limit, vector_io, gx);
  store4(t.gmo + mo_base, 0, limit, vector_io, gpred);
  if (p.read_var) store4(t.gmo + mo_base + p.numel, 0, limit, vector_io, gvar);
  if (t.gguide != nullptr) store4(t.gguide + base, 0, limit, vector_io, gguide);
}

// No projection (kPlain), or the passes of the sample projection (kStats, kSums, kApply): p.mode, a
// run-time parameter (uniform over the grid, so the block reductions below are reached by every
// thread or none): the step's forward and backward math is compiled once, not once per pass.
template <class S, class M>
__global__ void __launch_bounds__(kThreads) backward_kernel(Tensors<S, M> t, Params p) {
  __shared__ float shared[32];
  const int mode = p.mode;
  const int64_t b = p.batch_offset + blockIdx.y;
  const Coefs k = block_coefs(p.coef, b, shared);
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kPerThread;
  const float* sums = mode == kPlain ? nullptr : p.sums + b * 3;
  float r2 = 0.0f, l2 = 0.0f, s = 0.0f;
  if (first < p.numel) {
    const int64_t limit = p.numel - first;
    Element4 v;
    load_step4(t, p, k, b, first, limit, p.vector_io, v);
    float gy[4];
    load_grad4(t.gy, b * p.numel + first, limit, p.vector_io, gy);
    if (mode == kStats || mode == kSums) {
      const float factor = mode == kSums ? step::projection_factor(sums[0], sums[1]) : 0.0f;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (e < limit) {
          const float d = v.x_det[e] - v.x0[e], ev = v.x_new[e] - v.x0[e];
          r2 += d * d;
          l2 += ev * ev;
          if (mode == kSums) {
            s += clipped(p, v.x0[e] + factor * ev, gy[e]) * ev;
          } else if (!p.has_clip) {
            s += gy[e] * ev;
          }
        }
      }
    } else {
      float g_new[4], g_det[4], g_x0[4];
      load_grad4(t.gx0, b * p.numel + first, limit, p.vector_io, g_x0);
      if (mode == kApply) {
        const step::ProjectionGrad pg = step::projection_grad_coefs(sums[0], sums[1], sums[2]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float ev = v.x_new[e] - v.x0[e];
          const step::ProjectedGrads<float> g = step::projection_backward(
              pg.factor, pg.along_e, pg.along_d, clipped(p, v.x0[e] + pg.factor * ev, gy[e]), g_x0[e], ev,
              v.x_det[e] - v.x0[e]);
          g_new[e] = g.g_new;
          g_det[e] = g.g_det;
          g_x0[e] = g.g_x0;
        }
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          g_new[e] = clipped(p, v.x_new[e], gy[e]);
          g_det[e] = 0.0f;
        }
      }
      backward4(t, p, k, b, first, limit, p.vector_io, v, g_new, g_det, g_x0);
    }
  }
  if (mode == kStats || mode == kSums) {
    s = block_sum(s, shared);
    float* slot = p.partial + (b * p.blocks + blockIdx.x) * 3;
    if (mode == kStats) {
      r2 = block_sum(r2, shared);
      l2 = block_sum(l2, shared);
      if (threadIdx.x == 0) {
        slot[0] = r2;
        slot[1] = l2;
      }
    }
    if (threadIdx.x == 0) slot[2] = s;
  }
}

// The per-sample totals of the sample p.batch_offset + blockIdx.x's p.blocks partial sums, added in
// a fixed order (thread j takes partials j, j + kThreads, ...; then block_sum).
__global__ void __launch_bounds__(kThreads) sums_kernel(Params p) {
  __shared__ float shared[32];
  const int64_t b = p.batch_offset + blockIdx.x;
  const float* partial = p.partial + b * p.blocks * 3;
  float acc[3] = {0.0f, 0.0f, 0.0f};
  for (int64_t j = threadIdx.x; j < p.blocks; j += kThreads) {
#pragma unroll
    for (int slot = 0; slot < 3; ++slot) acc[slot] += partial[j * 3 + slot];
  }
#pragma unroll
  for (int slot = 0; slot < 3; ++slot) {
    const float total = block_sum(acc[slot], shared);
    if (threadIdx.x == 0) p.sums[b * 3 + slot] = total;
  }
}

// The pixel projection: a thread takes pixels first .. first + 3 and every channel of them, in
// three passes over the channels (the norms; S; the gradients) that share one loop body, so the
// step's code is emitted once.
template <class S, class M>
__global__ void __launch_bounds__(kThreads) pixel_backward_kernel(Tensors<S, M> t, Params p) {
  __shared__ float shared[32];
  const int64_t b = p.batch_offset + blockIdx.y;
  const Coefs k = block_coefs(p.coef, b, shared);
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kPerThread;
  if (first >= p.pixels) return;
  const bool vector_io = p.vector_io && (p.pixels & 3) == 0;
  const int64_t last = p.pixels - first;  // elements of this run that exist in each channel
  float r2[4] = {0.0f, 0.0f, 0.0f, 0.0f}, l2[4] = {0.0f, 0.0f, 0.0f, 0.0f}, s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float factor[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  step::ProjectionGrad pg[4] = {};
#pragma unroll 1
  for (int pass = 0; pass < 3; ++pass) {
#pragma unroll 1
    for (int64_t c = 0; c < p.channels; ++c) {
      const int64_t at = c * p.pixels + first;
      Element4 v;
      load_step4(t, p, k, b, at, last, vector_io, v);
      if (pass == 0) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          r2[e] += (v.x_det[e] - v.x0[e]) * (v.x_det[e] - v.x0[e]);
          l2[e] += (v.x_new[e] - v.x0[e]) * (v.x_new[e] - v.x0[e]);
        }
        continue;
      }
      float gy[4];
      load_grad4(t.gy, b * p.numel + at, last, vector_io, gy);
      if (pass == 1) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float ev = v.x_new[e] - v.x0[e];
          s[e] += clipped(p, v.x0[e] + factor[e] * ev, gy[e]) * ev;
        }
        continue;
      }
      float g_new[4], g_det[4], g_x0[4];
      load_grad4(t.gx0, b * p.numel + at, last, vector_io, g_x0);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float ev = v.x_new[e] - v.x0[e];
        const step::ProjectedGrads<float> g = step::projection_backward(
            pg[e].factor, pg[e].along_e, pg[e].along_d, clipped(p, v.x0[e] + pg[e].factor * ev, gy[e]), g_x0[e], ev,
            v.x_det[e] - v.x0[e]);
        g_new[e] = g.g_new;
        g_det[e] = g.g_det;
        g_x0[e] = g.g_x0;
      }
      backward4(t, p, k, b, at, last, vector_io, v, g_new, g_det, g_x0);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (pass == 0) factor[e] = step::projection_factor(r2[e], l2[e]);
      if (pass == 1) pg[e] = step::projection_grad_coefs(r2[e], l2[e], s[e]);
    }
  }
}

template <class S, class M>
void launch(const Tensors<S, M>& t, Params p, int64_t batch, const at::Tensor& x) {
  const size_t pack = 4 * sizeof(S), pack_m = 4 * sizeof(M);
  p.vector_io = p.numel % 4 == 0 && aligned(t.x, pack) && aligned(t.model_output, pack_m) && aligned(t.gx, pack) &&
                aligned(t.gmo, pack_m) && (t.noise == nullptr || aligned(t.noise, pack)) &&
                (t.guide == nullptr || aligned(t.guide, pack)) && (t.gy == nullptr || aligned(t.gy, pack)) &&
                (t.gx0 == nullptr || aligned(t.gx0, pack)) && (t.gguide == nullptr || aligned(t.gguide, pack));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  if (p.o.projection == step::kProjectSample) {
    partial = at::empty({batch * (p.blocks + 1) * 3}, x.options().dtype(at::kFloat));
    p.partial = partial.data_ptr<float>();
    p.sums = p.partial + batch * p.blocks * 3;
  }
  for_each_batch_chunk(p, batch, [&](const dim3 grid) {
    if (p.o.projection == step::kProjectPixel) {
      pixel_backward_kernel<S, M><<<grid, kThreads, 0, stream>>>(t, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (p.o.projection == step::kProjectSample) {
      p.mode = kStats;
      backward_kernel<S, M><<<grid, kThreads, 0, stream>>>(t, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sums_kernel<<<grid.y, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (p.has_clip) {  // S again, through the clip's mask (it needs the factor of the sums above)
        p.mode = kSums;
        backward_kernel<S, M><<<grid, kThreads, 0, stream>>>(t, p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        sums_kernel<<<grid.y, kThreads, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      p.mode = kApply;
      backward_kernel<S, M><<<grid, kThreads, 0, stream>>>(t, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      p.mode = kPlain;
      backward_kernel<S, M><<<grid, kThreads, 0, stream>>>(t, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> diffusion_step_backward_cuda(
    const std::optional<at::Tensor>& grad_x_prev, const std::optional<at::Tensor>& grad_x0, const at::Tensor& x,
    const at::Tensor& model_output, const at::Tensor& coef, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& step,
    const std::optional<at::Tensor>& guidance_grad, int64_t method, int64_t prediction, int64_t variance,
    bool clip_denoised, int64_t noise_mode, int64_t project_noise, std::optional<double> clip_lo,
    std::optional<double> clip_hi, bool eps_from_x0) {
  Params p{};
  const step::Geometry g =
      step::check_arguments(x, model_output, coef, noise, seed, step, guidance_grad, method, prediction, variance,
                            clip_denoised, noise_mode, project_noise, clip_lo, clip_hi, eps_from_x0, p.o);
  step::check_backward_arguments(x, grad_x_prev, grad_x0);
  DDPM_CHECK(x.is_cuda(), "the CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());

  // The kernels are instantiated for float32 storage only (each dtype and every mixed pair would
  // multiply the device code, and the compile time, of a pass that is not on the sampling path):
  // fp16 / bf16 inputs run on exact float32 copies (the kernels compute in float32 from the loaded
  // values either way) and the gradients round to their inputs' dtypes once, below.
  const auto dtype = at::kFloat;
  const auto like_x = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->to(dtype).contiguous() : at::Tensor();
  };
  const at::Tensor xc = x.to(dtype).contiguous(), moc = model_output.to(dtype).contiguous();
  const at::Tensor coefc = coef.to(at::kFloat).contiguous();
  const at::Tensor noisec = like_x(noise), guidec = like_x(guidance_grad), gyc = like_x(grad_x_prev),
                   gx0c = like_x(grad_x0);
  const at::Tensor seedc = seed.has_value() ? seed->contiguous() : at::Tensor();
  p.read_var = p.o.method == step::kDdpm && step::learned_variance(p.o.variance);
  at::Tensor gx = at::empty(x.sizes(), xc.options().memory_format(at::MemoryFormat::Contiguous));
  // the variance channels of model_output get 0 unless the kernel writes them (read_var)
  at::Tensor gmo = moc.size(1) != g.channels && !p.read_var ? at::zeros_like(moc) : at::empty_like(moc);
  at::Tensor gguide = guidance_grad.has_value() ? at::empty_like(gx) : at::empty({0}, x.options());

  set_inputs(p, g, coefc, seedc, step, clip_lo, clip_hi);
  if (g.batch > 0 && g.numel > 0) {
    using S = float;
    const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<S>() : nullptr; };
    const Tensors<S, S> t{xc.data_ptr<S>(),
                          moc.data_ptr<S>(),
                          ptr(noisec),
                          ptr(guidec),
                          ptr(gyc),
                          ptr(gx0c),
                          gx.data_ptr<S>(),
                          gmo.data_ptr<S>(),
                          guidance_grad.has_value() ? gguide.data_ptr<S>() : nullptr};
    launch(t, p, g.batch, x);
  }
  gx = gx.to(x.scalar_type());
  gmo = gmo.to(model_output.scalar_type());
  if (guidance_grad.has_value() && guidance_grad->scalar_type() != dtype) {
    gguide = gguide.to(guidance_grad->scalar_type());
  }
  return {gx, gmo, gguide};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { m.impl("diffusion_step_backward", &diffusion_step_backward_cuda); }

}  // namespace ddpm_fast
