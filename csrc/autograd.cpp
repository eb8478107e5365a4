// Autograd of the C++ ops (CPU and CUDA kernels alike), registered for the Autograd dispatch key:
// group_norm_scale_shift[_stats] and attention[_lse]. The formulas are the backward ops'
// (group_norm_scale_shift_backward, attention_backward), dispatched to the inputs' backend; this
// file only saves what they need and routes the gradients. C++ rather than
// torch.library.register_autograd (a Python autograd.Function) because the Python route cost
// ~60 us per forward and ~190 us per backward of every call on the CPU, more than the kernels
// themselves at a classifier's or the digits model's sizes (and ~20 us even for calls that record
// nothing); and because a C++ node knows which inputs the current backward needs
// (Node::task_should_compute_output: torch.autograd.grad(loss, x) skips the parameter sums).
// The Triton ops (Python custom ops) keep Python autograd: ddpm_fast/ops/<op>.py.
//
// Under autograd the plain forwards run their statistics variant (the same kernels, also writing
// mean/rstd or logsumexp), so a backward never recomputes the forward; when nothing records
// (no grad mode, or no input requires grad) they run as they are.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace ddpm_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

bool requires_grad(const OptTensor& t) { return present(t) && t->requires_grad(); }

// True when autograd would record a call with these tensor arguments.
template <class... Ts>
bool records(const Ts&... tensors) {
  return at::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

// ---- group_norm_scale_shift ----------------------------------------------------------------------

const auto& gn_stats_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ddpm_fast::group_norm_scale_shift_stats", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, int64_t, const OptTensor&,
                                                                      const OptTensor&, const OptTensor&,
                                                                      const OptTensor&, double, bool)>();
  return op;
}

const auto& gn_plain_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ddpm_fast::group_norm_scale_shift", "")
                             .typed<Tensor(const Tensor&, int64_t, const OptTensor&, const OptTensor&,
                                           const OptTensor&, const OptTensor&, double, bool)>();
  return op;
}

const auto& gn_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ddpm_fast::group_norm_scale_shift_backward", "")
          .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, int64_t, const OptTensor&, const OptTensor&, const OptTensor&,
              const OptTensor&, const Tensor&, const Tensor&, bool, std::array<bool, 5>)>();
  return op;
}

OptTensor optional_of(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class GroupNormScaleShift : public torch::autograd::Function<GroupNormScaleShift> {
 public:
  // Outputs (y, mean, rstd); mean and rstd are not differentiable.
  static variable_list forward(AutogradContext* ctx, const Tensor& x, int64_t num_groups, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& scale, const OptTensor& shift, double eps,
                               bool silu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = gn_stats_op().call(x, num_groups, weight, bias, scale, shift, eps, silu);
    ctx->mark_non_differentiable({mean, rstd});
    ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor()), scale.value_or(Tensor()),
                            shift.value_or(Tensor()), mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["silu"] = silu;
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &mean = saved[5], &rstd = saved[6];
    // needs_input_grad counts the tensors the forward got (absent optionals have no edge).
    std::array<bool, 5> mask{};
    size_t edge = 0;
    for (int i = 0; i < 5; ++i) mask[i] = saved[i].defined() && ctx->needs_input_grad(edge++);
    Tensor dx, dw, db, ds, dt;
    if (mask[0] || mask[1] || mask[2] || mask[3] || mask[4]) {
      std::tie(dx, dw, db, ds, dt) =
          gn_backward_op().call(grads[0], x, ctx->saved_data["num_groups"].toInt(), optional_of(saved[1]),
                                optional_of(saved[2]), optional_of(saved[3]), optional_of(saved[4]), mean, rstd,
                                ctx->saved_data["silu"].toBool(), mask);
    }
    const auto kept = [&](int i, const Tensor& g) { return mask[i] ? g : Tensor(); };
    return {kept(0, dx), Tensor(), kept(1, dw), kept(2, db), kept(3, ds), kept(4, dt), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> group_norm_scale_shift_stats_autograd(const Tensor& x, int64_t num_groups,
                                                                         const OptTensor& weight,
                                                                         const OptTensor& bias, const OptTensor& scale,
                                                                         const OptTensor& shift, double eps,
                                                                         bool silu) {
  const variable_list out = GroupNormScaleShift::apply(x, num_groups, weight, bias, scale, shift, eps, silu);
  return {out[0], out[1], out[2]};
}

Tensor group_norm_scale_shift_autograd(const Tensor& x, int64_t num_groups, const OptTensor& weight,
                                       const OptTensor& bias, const OptTensor& scale, const OptTensor& shift,
                                       double eps, bool silu) {
  if (!records(OptTensor(x), weight, bias, scale, shift)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return gn_plain_op().call(x, num_groups, weight, bias, scale, shift, eps, silu);
  }
  return GroupNormScaleShift::apply(x, num_groups, weight, bias, scale, shift, eps, silu)[0];
}

// ---- attention -----------------------------------------------------------------------------------

const auto& attention_lse_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ddpm_fast::attention_lse", "")
                             .typed<std::tuple<Tensor, Tensor>(const Tensor&, int64_t, bool)>();
  return op;
}

const auto& attention_plain_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ddpm_fast::attention", "")
                             .typed<Tensor(const Tensor&, int64_t, bool)>();
  return op;
}

const auto& attention_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("ddpm_fast::attention_backward", "")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, bool)>();
  return op;
}

class Attention : public torch::autograd::Function<Attention> {
 public:
  // Outputs (out, lse); lse is not differentiable.
  static variable_list forward(AutogradContext* ctx, const Tensor& qkv, int64_t num_heads, bool legacy) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = attention_lse_op().call(qkv, num_heads, legacy);
    ctx->mark_non_differentiable({lse});
    ctx->save_for_backward({qkv, out, lse});
    ctx->saved_data["num_heads"] = num_heads;
    ctx->saved_data["legacy"] = legacy;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor grad_qkv = attention_backward_op().call(grads[0], saved[0], saved[1], saved[2],
                                                         ctx->saved_data["num_heads"].toInt(),
                                                         ctx->saved_data["legacy"].toBool());
    return {grad_qkv, Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> attention_lse_autograd(const Tensor& qkv, int64_t num_heads, bool legacy) {
  const variable_list out = Attention::apply(qkv, num_heads, legacy);
  return {out[0], out[1]};
}

Tensor attention_autograd(const Tensor& qkv, int64_t num_heads, bool legacy) {
  if (!records(OptTensor(qkv))) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return attention_plain_op().call(qkv, num_heads, legacy);
  }
  return Attention::apply(qkv, num_heads, legacy)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, Autograd, m) {
  m.impl("group_norm_scale_shift", &group_norm_scale_shift_autograd);
  m.impl("group_norm_scale_shift_stats", &group_norm_scale_shift_stats_autograd);
  m.impl("attention", &attention_autograd);
  m.impl("attention_lse", &attention_lse_autograd);
}

}  // namespace ddpm_fast
