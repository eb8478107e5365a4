// Host-side argument checks and geometry of ddpm_fast::diffusion_step and its backward, shared by the
// CPU and CUDA kernels (csrc/cpu/diffusion_step*.cpp, csrc/cuda/diffusion_step*.cu). User-facing checks with
// ValueErrors live in ddpm_fast/ops/diffusion_step.py; these guard direct torch.ops calls.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "diffusion_step_math.h"
#include "philox.h"

namespace ddpm_fast {
namespace step {

// Sizes of one call: x is (batch, channels, *spatial) with numel = batch * channels * pixels.
struct Geometry {
  int64_t batch;
  int64_t channels;
  int64_t pixels;     // prod(spatial)
  int64_t numel;      // channels * pixels: the elements of one sample
  int64_t mo_stride;  // elements of one sample of model_output (numel or 2 * numel)
};

inline bool is_float_type(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

inline void check_like_x(const at::Tensor& x, const at::Tensor& t, const char* name) {
  DDPM_CHECK(is_float_type(t), name, " must be float32, float16 or bfloat16; got ", t.scalar_type());
  DDPM_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  DDPM_CHECK(t.sizes() == x.sizes(), name, " must have the shape of x ", x.sizes(), "; got ", t.sizes());
}

// Checks every argument; returns the geometry and fills the options.
inline Geometry check_arguments(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& coef,
                                const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
                                const std::optional<at::Tensor>& step, const std::optional<at::Tensor>& guidance_grad,
                                int64_t method, int64_t prediction, int64_t variance, bool clip_denoised,
                                int64_t noise_mode, int64_t project_noise, const std::optional<double>& clip_lo,
                                const std::optional<double>& clip_hi, bool eps_from_x0, Options& options) {
  DDPM_CHECK(method == kDdpm || method == kDdim, "method code must be 0 (ddpm) or 1 (ddim); got ", method);
  DDPM_CHECK(prediction >= kEpsilon && prediction <= kPredV, "prediction code must be 0..2; got ", prediction);
  DDPM_CHECK(variance >= kFixedSmall && variance <= kLearned, "variance code must be 0..3; got ", variance);
  DDPM_CHECK(noise_mode >= kNoiseNormal && noise_mode <= kNoiseZero, "noise_mode code must be 0..2; got ",
             noise_mode);
  DDPM_CHECK(project_noise >= kProjectNone && project_noise <= kProjectSample,
             "project_noise code must be 0..2; got ", project_noise);
  DDPM_CHECK(clip_lo.has_value() == clip_hi.has_value(), "clip_lo and clip_hi must be given together");

  DDPM_CHECK(is_float_type(x), "x must be float32, float16 or bfloat16; got ", x.scalar_type());
  DDPM_CHECK(x.dim() >= 2, "x must have shape (B, C, *spatial); got ", x.sizes());
  Geometry g;
  g.batch = x.size(0);
  g.channels = x.size(1);
  g.pixels = 1;
  for (int64_t d = 2; d < x.dim(); ++d) g.pixels *= x.size(d);
  g.numel = g.channels * g.pixels;
  DDPM_CHECK(g.numel <= (int64_t{4} << 32), "a sample of x has ", g.numel, " elements; at most 2^34");

  DDPM_CHECK(is_float_type(model_output), "model_output must be float32, float16 or bfloat16; got ",
             model_output.scalar_type());
  DDPM_CHECK(model_output.device() == x.device(), "model_output is on ", model_output.device(), " but x is on ",
             x.device());
  DDPM_CHECK(model_output.dim() == x.dim() && model_output.size(0) == g.batch &&
                 model_output.sizes().slice(2) == x.sizes().slice(2),
             "model_output must have shape (B, C or 2C, *spatial) of x ", x.sizes(), "; got ",
             model_output.sizes());
  const int64_t mo_channels = model_output.size(1);
  if (learned_variance(static_cast<int>(variance))) {
    DDPM_CHECK(mo_channels == 2 * g.channels, "model_output must have 2C = ", 2 * g.channels,
               " channels for a learned variance; got ", mo_channels);
  } else {
    DDPM_CHECK(mo_channels == g.channels || mo_channels == 2 * g.channels, "model_output must have C = ",
               g.channels, " or 2C channels; got ", mo_channels);
  }
  g.mo_stride = mo_channels * g.pixels;

  DDPM_CHECK(coef.device() == x.device(), "coef is on ", coef.device(), " but x is on ", x.device());
  DDPM_CHECK(coef.dim() == 2 && coef.size(0) == g.batch && coef.size(1) == kNumCoefs,
             "coef must have shape (B, ", int(kNumCoefs), ") = (", g.batch, ", ", int(kNumCoefs), "); got ",
             coef.sizes());
  DDPM_CHECK(coef.is_floating_point(), "coef must be a float tensor; got ", coef.scalar_type());

  if (noise.has_value()) check_like_x(x, *noise, "noise");
  if (guidance_grad.has_value()) check_like_x(x, *guidance_grad, "guidance_grad");
  DDPM_CHECK(!(noise.has_value() && seed.has_value()), "give either noise or seed (with step), not both");
  DDPM_CHECK(seed.has_value() == step.has_value(), "seed and step must be given together");
  if (seed.has_value()) {
    DDPM_CHECK(seed->scalar_type() == at::kLong && seed->dim() == 1 && seed->size(0) == g.batch,
               "seed must be an int64 tensor of shape (", g.batch, ",); got ", seed->scalar_type(), " ",
               seed->sizes());
    DDPM_CHECK(seed->device() == x.device(), "seed is on ", seed->device(), " but x is on ", x.device());
    DDPM_CHECK(step->scalar_type() == at::kLong && step->dim() == 0, "step must be a 0-dim int64 tensor; got ",
               step->scalar_type(), " ", step->sizes());
    DDPM_CHECK(step->device() == x.device(), "step is on ", step->device(), " but x is on ", x.device());
  }

  options.method = static_cast<int>(method);
  options.prediction = static_cast<int>(prediction);
  options.variance = static_cast<int>(variance);
  options.noise_mode = static_cast<int>(noise_mode);
  options.projection = static_cast<int>(project_noise);
  options.clip_denoised = clip_denoised;
  options.eps_from_x0 = eps_from_x0;
  options.has_grad = guidance_grad.has_value();
  return g;
}

// ddpm_fast::diffusion_step_backward's extra arguments: the incoming gradients of x_prev and
// pred_x0 (either may be absent: a zero gradient) must be shaped like x.
inline void check_backward_arguments(const at::Tensor& x, const std::optional<at::Tensor>& grad_x_prev,
                                     const std::optional<at::Tensor>& grad_x0) {
  if (grad_x_prev.has_value()) check_like_x(x, *grad_x_prev, "grad_x_prev");
  if (grad_x0.has_value()) check_like_x(x, *grad_x0, "grad_x0");
}

}  // namespace step
}  // namespace ddpm_fast
