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

// A (C,) or (N, C) parameter read where it lies: element (n, c) at
// data[n * stride_n + c * stride_c] (stride_n = 0 for (C,)), of dtype float, half or bfloat16.
// AdaGN's scale and shift are emb_out.chunk(2, 1): (N, C) views with stride_n = 2C, read in place.
struct Param {
  const void* data = nullptr;  // nullptr: absent
  int64_t stride_n = 0, stride_c = 0;
  at::ScalarType dtype = at::kFloat;
};

// One call as the kernels see it: sizes, options and the parameters, as fp32 contiguous pointers
// (or nullptr; prepare_call's default, the CPU kernel's) or, with in-place parameters (the CUDA
// kernel), as Params only (the pointers are then nullptr).
struct Problem {
  int64_t n, c, pixels, groups;
  double eps;
  bool silu, channels_last;
  const float *weight, *bias, *scale, *shift;  // (C,), (C,), (N, C), (N, C)
  Param weight_p, bias_p, scale_p, shift_p;     // the same (also set for fp32 copies)
};

// A parameter as a kernel that reads float/half/bfloat16 with strides takes it: other floating
// dtypes (float64) become an fp32 copy.
inline std::optional<at::Tensor> as_readable(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  const auto s = t->scalar_type();
  if (s == at::kFloat || s == at::kHalf || s == at::kBFloat16) return t;
  return t->to(at::kFloat);
}

inline Param param_of(const std::optional<at::Tensor>& t) {
  Param r;
  if (!t.has_value()) return r;
  r.data = t->const_data_ptr();
  r.dtype = t->scalar_type();
  if (t->dim() == 1) {
    r.stride_c = t->stride(0);
  } else {
    r.stride_n = t->stride(0);
    r.stride_c = t->stride(1);
  }
  return r;
}

// A checked call ready to launch: its layout, the parameters (fp32 contiguous copies, or the
// given tensors, kept alive here) and the Problem pointing into them.
struct Call {
  Layout layout;
  std::optional<at::Tensor> weight, bias, scale, shift;
  Problem p;
};

// For x with numel() > 0 that passed check_args. in_place_params: keep weight/bias/scale/shift
// as given (no copies; Problem's Params only), for a kernel that reads them with their strides.
inline Call prepare_call(const at::Tensor& x, int64_t num_groups,
                         const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& shift, double eps, bool silu,
                         bool in_place_params = false) {
  const auto prep = [&](const std::optional<at::Tensor>& t) {
    return in_place_params ? as_readable(t) : as_float(t);
  };
  Call call{plan_layout(x), prep(weight), prep(bias), prep(scale), prep(shift), {}};
  const auto ptr = [&](const std::optional<at::Tensor>& t) {
    return t && !in_place_params ? t->const_data_ptr<float>() : nullptr;
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
  p.weight_p = param_of(call.weight);
  p.bias_p = param_of(call.bias);
  p.scale_p = param_of(call.scale);
  p.shift_p = param_of(call.shift);
  return call;
}

}  // namespace gn
}  // namespace ddpm_fast
