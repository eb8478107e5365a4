// CUDA kernel of ddpm_fast::diffusion_step (definition: ddpm_fast/reference.py diffusion_step).
//
// Every thread handles 4 consecutive elements of one sample (one Philox block of in-kernel noise,
// csrc/include/philox.h) with the shared per-element math (csrc/include/diffusion_step_math.h);
// grid = (ceil(numel / (4 * kThreads)), samples), launched once per chunk of at most the grid's
// y limit (65535, queried) samples starting at Params::batch_offset.
//   * no projection: one kernel, one pass (reads x, model_output [, noise, grad], writes x_prev
//     [, pred_x0]);
//   * "pixel": each thread takes 4 consecutive pixels and loops over the channels twice (norms,
//     then the result; the second loop recomputes the step instead of keeping C values);
//   * "sample": three kernels without a host round trip. The first computes the step and writes
//     each block's partial sums of |x_det - x0|^2 and |x_new - x0|^2; the second (one block per
//     sample) reduces its sample's partials once, in a fixed order (deterministic), into the
//     sample's projection factor; the third recomputes the step and writes the projected result.
//     Recomputing reads the inputs twice but writes the outputs once, which is less traffic than
//     storing x_new / x0 in pass 1 and rescaling them in pass 2. (Each apply block reducing all of
//     its sample's partials itself made the work quadratic in the blocks per sample.)
// x / outputs and model_output have their own storage dtypes, run-time kernel parameters (a U-Net
// may run in fp16 beside an fp32 x); given noise and the guidance gradient are read in x's dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "diffusion_step_args.h"
#include "diffusion_step_cuda.h"
#include "diffusion_step_math.h"
#include "philox.h"

namespace ddpm_fast {
namespace {

using namespace step_cuda;  // NOLINT(google-build-using-namespace): the shared device helpers
using step::Coefs;
using step::Options;

enum Mode : int { kPlain = 0, kStats = 1, kApply = 2 };

struct Params : StepParams {
  float* partial;  // (B, blocks, 2) partial sums of the sample projection
  float* factor;   // (B,) its per-sample factors
};

// The tensors of one launch, stored as `s` (x, noise, guidance gradient, outputs) and `m`
// (model_output): run-time dtypes, one instantiation of each kernel for every pair.
struct Tensors {
  const void* x;
  const void* model_output;
  const void* noise;  // or null
  const void* grad;   // or null
  void* out;
  void* x0;  // or null
  Storage s, m;
};

// The step of elements first .. first + 3 of sample b (any alignment), before projection and clip.
__device__ __forceinline__ void step4(const Tensors& t, const Params& p, const Coefs& k, int64_t b, int64_t first,
                                      bool vector_io, float x_new[4], float x0[4], float x_det[4]) {
  const Options& o = p.o;
  const int64_t n = p.numel;
  float x[4], pred[4], var[4] = {0.0f, 0.0f, 0.0f, 0.0f}, grad[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float z[4];
  load4(t.x, t.s, b * n, first, n, vector_io, x);
  load4(t.model_output, t.m, b * p.mo_stride, first, n, vector_io, pred);
  if (o.method == step::kDdpm && step::learned_variance(o.variance)) {
    load4(t.model_output, t.m, b * p.mo_stride + n, first, n, vector_io, var);
  }
  if (o.has_grad) load4(t.grad, t.s, b * n, first, n, vector_io, grad);
  const bool has_noise = p.seed != nullptr || t.noise != nullptr;
  if (p.seed == nullptr && t.noise != nullptr) {
    load4(t.noise, t.s, b * n, first, n, vector_io, z);
  } else {
    noise4(p.seed, p.step, static_cast<const float*>(nullptr), b, first, n, vector_io, z);
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const step::Values<float> v = step::step_element<float>(k, o, x[e], pred[e], var[e], grad[e]);
    x_new[e] = has_noise ? v.x_det + v.scale * z[e] : v.x_det;
    x0[e] = v.x0;
    x_det[e] = v.x_det;
  }
}

__device__ __forceinline__ float clip_value(const Params& p, float v) {
  return p.has_clip ? step::step_clamp(v, p.clip_lo, p.clip_hi) : v;
}

// No projection (kPlain), or the two passes of the sample projection (kStats, kApply).
template <int kMode>
__global__ void __launch_bounds__(kThreads) step_kernel(Tensors t, Params p) {
  __shared__ float shared[32];
  const int64_t b = p.batch_offset + blockIdx.y;
  const Coefs k = block_coefs(p.coef, b, shared);
  const float factor = kMode == kApply ? p.factor[b] : 0.0f;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kPerThread;
  float r2 = 0.0f, l2 = 0.0f;
  if (first < p.numel) {
    float x_new[4], x0[4], x_det[4];
    step4(t, p, k, b, first, p.vector_io, x_new, x0, x_det);
    const int64_t base = b * p.numel;
    if (kMode == kStats) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (first + e < p.numel) {
          r2 += (x_det[e] - x0[e]) * (x_det[e] - x0[e]);
          l2 += (x_new[e] - x0[e]) * (x_new[e] - x0[e]);
        }
      }
    } else {
      float out[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        out[e] = clip_value(p, kMode == kApply ? x0[e] + factor * (x_new[e] - x0[e]) : x_new[e]);
      }
      store4(t.out, t.s, base, first, p.numel, p.vector_io, out);
      if (t.x0 != nullptr) store4(t.x0, t.s, base, first, p.numel, p.vector_io, x0);
    }
  }
  if (kMode == kStats) {
    r2 = block_sum(r2, shared);
    l2 = block_sum(l2, shared);
    if (threadIdx.x == 0) {
      p.partial[(b * p.blocks + blockIdx.x) * 2] = r2;
      p.partial[(b * p.blocks + blockIdx.x) * 2 + 1] = l2;
    }
  }
}

// The sample projection's factor of sample p.batch_offset + blockIdx.x from its p.blocks partial
// sums, added in a fixed order (thread j takes partials j, j + kThreads, ...; then block_sum).
__global__ void __launch_bounds__(kThreads) factor_kernel(Params p) {
  __shared__ float shared[32];
  const int64_t b = p.batch_offset + blockIdx.x;
  const float* partial = p.partial + b * p.blocks * 2;
  float r2 = 0.0f, l2 = 0.0f;
  for (int64_t j = threadIdx.x; j < p.blocks; j += kThreads) {
    r2 += partial[j * 2];
    l2 += partial[j * 2 + 1];
  }
  r2 = block_sum(r2, shared);
  l2 = block_sum(l2, shared);
  if (threadIdx.x == 0) p.factor[b] = step::projection_factor(r2, l2);
}

// The pixel projection: a thread takes pixels first .. first + 3 and every channel of them, in
// two passes over the channels (the norms, then the result, recomputing the step) that share one
// loop body: the step's code is emitted once (two copies made the kernel ~340 KB of SASS that
// spilled around the division's slow-path calls).
__global__ void __launch_bounds__(kThreads) pixel_kernel(Tensors t, Params p) {
  __shared__ float shared[32];
  const int64_t b = p.batch_offset + blockIdx.y;
  const Coefs k = block_coefs(p.coef, b, shared);
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kPerThread;
  if (first >= p.pixels) return;
  const bool vector_io = p.vector_io && (p.pixels & 3) == 0;
  const int64_t last = p.pixels - first;  // elements of this run that exist in each channel
  float r2[4] = {0.0f, 0.0f, 0.0f, 0.0f}, l2[4] = {0.0f, 0.0f, 0.0f, 0.0f}, factor[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 1
  for (int pass = 0; pass < 2; ++pass) {
#pragma unroll 1
    for (int64_t c = 0; c < p.channels; ++c) {
      const int64_t offset = c * p.pixels + first;
      float x_new[4], x0[4], x_det[4];
      step4(t, p, k, b, offset, vector_io, x_new, x0, x_det);
      if (pass == 0) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          r2[e] += (x_det[e] - x0[e]) * (x_det[e] - x0[e]);
          l2[e] += (x_new[e] - x0[e]) * (x_new[e] - x0[e]);
        }
      } else {
        float out[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) out[e] = clip_value(p, x0[e] + factor[e] * (x_new[e] - x0[e]));
        // bounded by the run's end: pixels of this channel only
        store4(t.out, t.s, b * p.numel + offset, 0, last, vector_io, out);
        if (t.x0 != nullptr) store4(t.x0, t.s, b * p.numel + offset, 0, last, vector_io, x0);
      }
    }
    if (pass == 0) {
#pragma unroll
      for (int e = 0; e < 4; ++e) factor[e] = step::projection_factor(r2[e], l2[e]);
    }
  }
}

void launch(const Tensors& t, Params p, int64_t batch, const at::Tensor& x) {
  const size_t pack = 4 * storage_bytes(t.s), pack_m = 4 * storage_bytes(t.m);
  p.vector_io = p.numel % 4 == 0 && aligned(t.x, pack) && aligned(t.out, pack) && aligned(t.model_output, pack_m) &&
                (t.noise == nullptr || aligned(t.noise, pack)) && (t.grad == nullptr || aligned(t.grad, pack)) &&
                (t.x0 == nullptr || aligned(t.x0, pack));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  if (p.o.projection == step::kProjectSample) {
    partial = at::empty({batch * (p.blocks * 2 + 1)}, x.options().dtype(at::kFloat));
    p.partial = partial.data_ptr<float>();
    p.factor = p.partial + batch * p.blocks * 2;
  }
  for_each_batch_chunk(p, batch, [&](const dim3 grid) {
    if (p.o.projection == step::kProjectPixel) {
      pixel_kernel<<<grid, kThreads, 0, stream>>>(t, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (p.o.projection == step::kProjectSample) {
      step_kernel<kStats><<<grid, kThreads, 0, stream>>>(t, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      factor_kernel<<<grid.y, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      step_kernel<kApply><<<grid, kThreads, 0, stream>>>(t, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      step_kernel<kPlain><<<grid, kThreads, 0, stream>>>(t, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

std::tuple<at::Tensor, at::Tensor> diffusion_step_cuda(
    const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& coef,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
    const std::optional<at::Tensor>& step, const std::optional<at::Tensor>& guidance_grad, int64_t method,
    int64_t prediction, int64_t variance, bool clip_denoised, int64_t noise_mode, int64_t project_noise,
    std::optional<double> clip_lo, std::optional<double> clip_hi, bool eps_from_x0, bool return_x0) {
  Params p{};
  const step::Geometry g =
      step::check_arguments(x, model_output, coef, noise, seed, step, guidance_grad, method, prediction, variance,
                            clip_denoised, noise_mode, project_noise, clip_lo, clip_hi, eps_from_x0, p.o);
  DDPM_CHECK(x.is_cuda(), "the CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());

  const at::Tensor xc = x.contiguous(), moc = model_output.contiguous();
  const at::Tensor coefc = coef.to(at::kFloat).contiguous();
  at::Tensor noisec, gradc, seedc;
  if (noise.has_value()) noisec = noise->to(x.scalar_type()).contiguous();
  if (guidance_grad.has_value()) gradc = guidance_grad->to(x.scalar_type()).contiguous();
  if (seed.has_value()) seedc = seed->contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor x0 = return_x0 ? at::empty_like(out) : at::empty({0}, x.options());

  set_inputs(p, g, coefc, seedc, step, clip_lo, clip_hi);
  if (g.batch == 0 || g.numel == 0) return {out, x0};

  const Tensors t{xc.data_ptr(),
                  moc.data_ptr(),
                  noise.has_value() ? noisec.data_ptr() : nullptr,
                  guidance_grad.has_value() ? gradc.data_ptr() : nullptr,
                  out.data_ptr(),
                  return_x0 ? x0.data_ptr() : nullptr,
                  storage_of(x.scalar_type()),
                  storage_of(model_output.scalar_type())};
  launch(t, p, g.batch, x);
  return {out, x0};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { m.impl("diffusion_step", &diffusion_step_cuda); }

}  // namespace ddpm_fast
