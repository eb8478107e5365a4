// Host-side pieces of group_norm_scale_shift shared by the CPU and CUDA kernels: argument checks
// (for direct calls of torch.ops.ddpm_fast.group_norm_scale_shift; the public wrapper checks first
// and raises ValueError), the choice of memory layout the kernels run on, and the description of
// one call (Problem) both kernels take.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>

#include "ddpm_fast_common.h"

namespace ddpm_fast {
namespace gn {

inline void check_args(const at::Tensor& x, int64_t num_groups,
                       const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& scale,
                       const std::optional<at::Tensor>& shift, double eps) {
  DDPM_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                 x.scalar_type() == at::kBFloat16,
             "group_norm_scale_shift: x must be float32, float16 or bfloat16, got ",
             x.scalar_type());
  DDPM_CHECK(x.dim() >= 2, "group_norm_scale_shift: x must be (N, C, *spatial), got ",
             x.sizes());
  const int64_t n = x.size(0), c = x.size(1);
  DDPM_CHECK(num_groups >= 1 && c % num_groups == 0, "group_norm_scale_shift: num_groups=",
             num_groups, " must divide C=", c);
  DDPM_CHECK(eps > 0, "group_norm_scale_shift: eps must be > 0, got ", eps);
  auto check = [&](const std::optional<at::Tensor>& t, const char* name,
                   std::initializer_list<int64_t> shape) {
    if (!t.has_value()) return;
    DDPM_CHECK(t->sizes().equals(shape), "group_norm_scale_shift: ", name, " must have shape ",
               at::IntArrayRef(shape), ", got ", t->sizes());
    DDPM_CHECK(t->device() == x.device(), "group_norm_scale_shift: ", name, " is on ",
               t->device(), " but x is on ", x.device());
    DDPM_CHECK(at::isFloatingType(t->scalar_type()), "group_norm_scale_shift: ", name,
               " must be a floating tensor, got ", t->scalar_type());
  };
  check(weight, "weight", {c});
  check(bias, "bias", {c});
  check(scale, "scale", {n, c});
  check(shift, "shift", {n, c});
}

// weight/bias/scale/shift as contiguous fp32 (they are tiny: C or N*C values).
inline std::optional<at::Tensor> as_float(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->to(at::kFloat).contiguous();
}

// True when a tensor (dims N, C, *spatial) is dense with the channel dim innermost and the
// spatial dims in row-major order: NHWC, NDHWC, or (N, L, C) memory for 1-D spatial. Dims of
// size 1 may have any stride.
inline bool is_channels_last_dense(const at::Tensor& t) {
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  const int64_t ndim = t.dim();
  if (ndim < 2) return false;
  int64_t expected = 1;
  auto matches = [&](int64_t d) {
    if (sizes[d] != 1 && strides[d] != expected) return false;
    expected *= sizes[d];
    return true;
  };
  if (!matches(1)) return false;
  for (int64_t d = ndim - 1; d >= 2; --d)
    if (!matches(d)) return false;
  return matches(0);
}

// Where a kernel reads and writes. `out` is laid out like x (at::empty_like(x), the same tensor
// the fake implementation returns); the kernel reads `input` (dense, NCHW-contiguous or
// channels-last-dense as `channels_last` says) and writes `result`, which is `out` itself unless
// x's layout is neither, in which case the caller copies `result` into `out`.
struct Layout {
  at::Tensor input;
  at::Tensor result;
  at::Tensor out;
  bool channels_last;
};

inline Layout plan_layout(const at::Tensor& x) {
  Layout l;
  l.out = at::empty_like(x);
  if (l.out.is_contiguous()) {
    l.input = x.contiguous();
    l.result = l.out;
    l.channels_last = false;
  } else if (is_channels_last_dense(l.out)) {
    if (is_channels_last_dense(x)) {
      l.input = x;
    } else {
      l.input = at::empty_like(l.out);
      l.input.copy_(x);
    }
    l.result = l.out;
    l.channels_last = true;
  } else {  // another dense permutation: compute NCHW, then lay the result out like x
    l.input = x.contiguous();
    l.result = at::empty(x.sizes(), x.options());
    l.channels_last = false;
  }
  return l;
}

// Copies the kernel's result into the x-shaped output when they differ; returns the output.
inline at::Tensor finish_layout(Layout& l) {
  if (!l.result.is_same(l.out)) l.out.copy_(l.result);
  return l.out;
}

// One call as the kernels see it: sizes, options and fp32 parameter pointers (or nullptr).
struct Problem {
  int64_t n, c, pixels, groups;
  double eps;
  bool silu, channels_last;
  const float *weight, *bias, *scale, *shift;  // (C,), (C,), (N, C), (N, C)
};

// A checked call ready to launch: its layout, the fp32 copies of the small parameters (kept alive
// here) and the Problem pointing into them.
struct Call {
  Layout layout;
  std::optional<at::Tensor> weight, bias, scale, shift;
  Problem p;
};

// For x with numel() > 0 that passed check_args.
inline Call prepare_call(const at::Tensor& x, int64_t num_groups,
                         const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& shift, double eps, bool silu) {
  Call call{plan_layout(x), as_float(weight), as_float(bias), as_float(scale), as_float(shift), {}};
  const auto ptr = [](const std::optional<at::Tensor>& t) {
    return t ? t->const_data_ptr<float>() : nullptr;
  };
  Problem& p = call.p;
  p.n = x.size(0);
  p.c = x.size(1);
  p.pixels = x.numel() / (p.n * p.c);
  p.groups = num_groups;
  p.eps = eps;
  p.silu = silu;
  p.channels_last = call.layout.channels_last;
  p.weight = ptr(call.weight);
  p.bias = ptr(call.bias);
  p.scale = ptr(call.scale);
  p.shift = ptr(call.shift);
  return call;
}

}  // namespace gn
}  // namespace ddpm_fast
