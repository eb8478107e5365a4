// Host-side pieces of group_norm_scale_shift shared by the CPU and CUDA kernels: argument checks
// (for direct calls of torch.ops.ddpm_fast.group_norm_scale_shift; the public wrapper checks first
// and raises ValueError), the choice of memory layout the kernels run on, and the description of
// one call (Problem) both kernels take.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <initializer_list>
#include <tuple>
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
  float *mean_out = nullptr, *rstd_out = nullptr;  // (N, G): where the forward with statistics
                                                   // writes them (nullptr: the plain forward)
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

// ---- the statistics of the forward under autograd, and the backward ------------------------------

// mean and rstd (N, G) fp32 as the forward with statistics returns them; for empty x the values
// of an empty group (mean 0, rstd 1 / sqrt(eps)).
struct Stats {
  at::Tensor mean, rstd;
};

// (N, G) fp32 buffers for a kernel to fill.
inline Stats stats_buffers(const at::Tensor& x, int64_t num_groups) {
  const auto opts = x.options().dtype(at::kFloat);
  return Stats{at::empty({x.size(0), num_groups}, opts), at::empty({x.size(0), num_groups}, opts)};
}

inline Stats empty_stats(const at::Tensor& x, int64_t num_groups, double eps) {
  const auto opts = x.options().dtype(at::kFloat);
  return Stats{at::zeros({x.size(0), num_groups}, opts),
               at::full({x.size(0), num_groups}, 1.0 / std::sqrt(eps), opts)};
}

// Checks of the backward's own arguments (the rest as check_args); for direct calls of
// torch.ops.ddpm_fast.group_norm_scale_shift_backward.
inline void check_backward_args(const at::Tensor& grad_y, const at::Tensor& x, int64_t num_groups,
                                const at::Tensor& mean, const at::Tensor& rstd) {
  DDPM_CHECK(grad_y.sizes().equals(x.sizes()) && grad_y.scalar_type() == x.scalar_type() &&
                 grad_y.device() == x.device(),
             "group_norm_scale_shift_backward: grad_y must be like x ", x.sizes(), " ",
             x.scalar_type(), " on ", x.device(), ", got ", grad_y.sizes(), " ", grad_y.scalar_type(),
             " on ", grad_y.device());
  for (const auto* t : {&mean, &rstd}) {
    const char* name = t == &mean ? "mean" : "rstd";
    DDPM_CHECK(t->sizes().equals({x.size(0), num_groups}) && t->scalar_type() == at::kFloat &&
                   t->device() == x.device(),
               "group_norm_scale_shift_backward: ", name, " must be (N, num_groups) = (", x.size(0),
               ", ", num_groups, ") float32 on ", x.device(), ", got ", t->sizes(), " ",
               t->scalar_type(), " on ", t->device());
  }
}

// grad_y as the kernels read it: laid out like the layout's input (NCHW-contiguous or
// channels-last-dense).
inline at::Tensor grad_like_input(const Layout& l, const at::Tensor& grad_y) {
  if (!l.channels_last) return grad_y.contiguous();
  if (is_channels_last_dense(grad_y)) return grad_y;
  at::Tensor g = at::empty_like(l.input);
  g.copy_(grad_y);
  return g;
}

// The gradients the backward returns, in the order of its schema: dx (like x), dweight, dbias (C,),
// dscale, dshift (N, C) in their parameter's dtype; an empty tensor where output_mask says no
// (or the parameter is absent). The kernels accumulate the parameter gradients in fp32 buffers
// (ParamGrads[kDweight..kDshift]; undefined where not wanted).
enum GradIndex { kDx = 0, kDweight, kDbias, kDscale, kDshift, kGrads };

using ParamGrads = std::array<at::Tensor, kGrads>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Whether gradient i is wanted: requested and its parameter present.
inline std::array<bool, kGrads> wanted_grads(const std::array<bool, kGrads>& mask,
                                             const std::optional<at::Tensor>& weight,
                                             const std::optional<at::Tensor>& bias,
                                             const std::optional<at::Tensor>& scale,
                                             const std::optional<at::Tensor>& shift) {
  return {mask[kDx], mask[kDweight] && weight.has_value(), mask[kDbias] && bias.has_value(),
          mask[kDscale] && scale.has_value(), mask[kDshift] && shift.has_value()};
}

// fp32 buffers for the wanted parameter gradients, zero-filled (an empty x leaves them so).
inline ParamGrads param_grad_buffers(const at::Tensor& x, const std::array<bool, kGrads>& want) {
  ParamGrads g;
  const auto opts = x.options().dtype(at::kFloat);
  const int64_t n = x.size(0), c = x.size(1);
  if (want[kDweight]) g[kDweight] = at::zeros({c}, opts);
  if (want[kDbias]) g[kDbias] = at::zeros({c}, opts);
  if (want[kDscale]) g[kDscale] = at::zeros({n, c}, opts);
  if (want[kDshift]) g[kDshift] = at::zeros({n, c}, opts);
  return g;
}

inline float* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<float>() : nullptr;
}

// The schema's 5-tuple: dx, then each parameter gradient cast to its parameter's dtype.
inline Grads grads_tuple(const at::Tensor& x, at::Tensor dx, const ParamGrads& g,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift) {
  const auto cast = [&](int i, const std::optional<at::Tensor>& p) {
    if (!g[i].defined()) return at::empty({0}, x.options());
    return g[i].to(p->scalar_type());
  };
  if (!dx.defined()) dx = at::empty({0}, x.options());
  return {dx, cast(kDweight, weight), cast(kDbias, bias), cast(kDscale, scale), cast(kDshift, shift)};
}

// The common start of a backend's backward: the argument checks, the wanted gradients and their
// fp32 buffers.
struct BackwardStart {
  std::array<bool, kGrads> want;
  ParamGrads grads;
};

inline BackwardStart begin_backward(const at::Tensor& grad_y, const at::Tensor& x, int64_t num_groups,
                                    const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& scale,
                                    const std::optional<at::Tensor>& shift, const at::Tensor& mean,
                                    const at::Tensor& rstd, const std::array<bool, kGrads>& output_mask) {
  check_args(x, num_groups, weight, bias, scale, shift, /*eps=*/1.0);
  check_backward_args(grad_y, x, num_groups, mean, rstd);
  const auto want = wanted_grads(output_mask, weight, bias, scale, shift);
  return {want, param_grad_buffers(x, want)};
}

// The schema's entry points of a backend's forward kForward(x, ..., eps, silu, Stats* or nullptr):
// the plain op and the op with statistics (y, mean, rstd).
using ForwardFn = at::Tensor (*)(const at::Tensor&, int64_t, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, double, bool, Stats*);

template <ForwardFn kForward>
at::Tensor forward_plain(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& shift, double eps, bool silu) {
  return kForward(x, num_groups, weight, bias, scale, shift, eps, silu, nullptr);
}

template <ForwardFn kForward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_stats(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, double eps, bool silu) {
  Stats stats;
  at::Tensor y = kForward(x, num_groups, weight, bias, scale, shift, eps, silu, &stats);
  return {y, stats.mean, stats.rstd};
}

}  // namespace gn
}  // namespace ddpm_fast
