// CPU kernel of ddpm_fast::attention: ADM self-attention on the qkv conv output, both layouts.
//
// q, k and v of every head are one strided (3, B, heads, ch, T) view of qkv (B, 3*C, T); the
// output is written as (B, C, T) in qkv's dtype, arithmetic in fp32 (half inputs are widened
// once: on this CPU SDPA's fp32 kernel is also faster than its bf16/fp16 ones). Two paths:
//   T <  512: two batched GEMMs on the views themselves (no copy) around a softmax;
//   T >= 512: ATen's scaled_dot_product_attention (its CPU flash kernel), on a packed copy of
//             the views, since the flash kernel needs the head dim contiguous (on the views SDPA
//             takes its math path, measured 2.5-5x slower than packing + flash).
// ddpm_fast::attention_lse (the forward under autograd) also returns the per-query logsumexp,
// (B, heads, T) fp32, for the backward of csrc/cpu/attention_backward.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "attention_host.h"
#include "attention_math.h"

namespace {

namespace am = ddpm_fast::attention;
using am::qkv_heads_view;

// Short sequences: two batched GEMMs on the (batch x heads) views (BLAS reads the transposed
// operands in place) around an in-place softmax of the (T, T) logits.
// heads: (3, B, heads, ch, T) fp32 view; out: (B, C, T) fp32 contiguous; lse: undefined, or the
// (B, heads, T) fp32 logsumexp of each query's scaled logits to fill (the backward's statistic:
// then P = exp(logits - lse), the softmax written through its logsumexp).
void attention_gemm(const at::Tensor& heads, at::Tensor& out, double scale, const at::Tensor& lse) {
  const int64_t batch = heads.size(1), num_heads = heads.size(2), ch = heads.size(3),
                length = heads.size(4);
  const int64_t chunk = am::samples_per_chunk(batch, num_heads, length);
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t nb = std::min(chunk, batch - b0);
    const int64_t bh = nb * num_heads;
    const at::Tensor q = am::head_chunk(heads, 0, b0, nb);
    const at::Tensor k = am::head_chunk(heads, 1, b0, nb);
    const at::Tensor v = am::head_chunk(heads, 2, b0, nb);
    at::Tensor logits = at::empty({bh, length, length}, heads.options());
    logits.baddbmm_(q.transpose(1, 2), k, /*beta=*/0.0, /*alpha=*/scale);  // [t, s] = q_t . k_s
    if (lse.defined()) {
      // lse = m - log(max P), m the row's max logit: P there is exp(0) / sum exp(logits - m), so the
      // softmax's own normaliser is read back from P (two vectorised max reductions, cheaper than a
      // logsumexp pass and a separate exp).
      const at::Tensor row_max = at::amax(logits, -1, /*keepdim=*/true);
      at::_softmax_out(logits, logits, -1, /*half_to_float=*/false);  // in place
      at::Tensor lse_b = lse.narrow(0, b0, nb).view({bh, length, 1});
      at::sub_out(lse_b, row_max, at::amax(logits, -1, /*keepdim=*/true).log_());
    } else {
      at::_softmax_out(logits, logits, -1, /*half_to_float=*/false);  // in place
    }
    at::Tensor out_b = out.narrow(0, b0, nb).view({bh, ch, length});
    at::bmm_out(out_b, v, logits.transpose(1, 2));  // [c, t] = sum_s v[c, s] p[t, s]
  }
}

// Long sequences: ATen's scaled_dot_product_attention. Its CPU flash kernel needs the head dim
// contiguous (stride 1); on the qkv views it has stride T, which sends SDPA to its much slower
// math path. So q, k, v are packed once into a (3, B, heads, T, ch) buffer, an O(B*C*T) copy in
// front of O(B*C*T^2) work: one 2-D (ch, T) -> (T, ch) transpose per q/k/v of each head, on
// which copy_ runs its cache-blocked transpose (2.8x faster than one 5-D strided copy at
// T = 1024, ch = 64). The (B, heads, T, ch) result is written back transposed into (B, C, T).
// With `lse` defined ((B, heads, T) fp32) the flash kernel's entry point that also returns the
// per-query logsumexp runs instead (same kernel).
void attention_sdpa(const at::Tensor& heads, at::Tensor& out, double scale, const at::Tensor& lse) {
  const int64_t batch = heads.size(1), num_heads = heads.size(2), ch = heads.size(3),
                length = heads.size(4);
  at::Tensor packed = at::empty({3, batch, num_heads, length, ch}, heads.options());
  const int64_t slices = 3 * batch * num_heads;
  at::Tensor dst = packed.view({slices, length, ch});
  // The workers of at::parallel_for do not inherit the caller's thread-local state: under
  // torch.inference_mode() `packed` is an inference tensor, which a worker outside InferenceMode
  // may not write. Each worker runs with the caller's state (InferenceMode, grad mode, dispatch
  // key sets) for the duration of its range.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t which = i / (batch * num_heads);
      const int64_t b = (i / num_heads) % batch;
      const int64_t h = i % num_heads;
      dst[i].copy_(heads[which][b][h].transpose(0, 1));
    }
  });
  at::Tensor result;  // (B, heads, T, ch)
  if (lse.defined()) {
    at::Tensor lse_result;
    std::tie(result, lse_result) = at::_scaled_dot_product_flash_attention_for_cpu(
        packed[0], packed[1], packed[2], /*dropout_p=*/0.0, /*is_causal=*/false,
        /*attn_mask=*/std::nullopt, scale);
    lse.copy_(lse_result);
  } else {
    result = at::scaled_dot_product_attention(packed[0], packed[1], packed[2], /*attn_mask=*/std::nullopt,
                                              /*dropout_p=*/0.0, /*is_causal=*/false, scale);
  }
  out.view({batch, num_heads, ch, length}).copy_(result.transpose(2, 3));
}

// From this T on the flash kernel wins: measured on 1 thread (ch = 64), GEMM vs SDPA path:
// T = 64: 1.3 vs 2.7 ms (B = 16, 4 heads), T = 256: 7.8 vs 8.7 ms (B = 4), T = 512: even,
// T = 1024: 122 vs 63 ms (B = 1, 8 heads); the GEMM path also holds (heads, T, T) logits.
constexpr int64_t kSdpaMinLength = 512;

// The forward on CPU tensors; fills `lse` ((B, heads, T) fp32) when it is defined.
at::Tensor attention_forward(const at::Tensor& qkv, int64_t num_heads, bool legacy, const at::Tensor& lse) {
  const int64_t ch = am::check_qkv(qkv.sizes(), qkv.scalar_type(), num_heads);
  DDPM_CHECK(qkv.device().is_cpu(), "attention: qkv must be a CPU tensor, got ", qkv.device());
  // The kernel's internal ops (in-place softmax, out= GEMMs, copies into the packed buffer) must
  // not record autograd even when qkv requires grad: the op's own autograd formula (registered
  // in ddpm_fast/ops/attention.py, backward in attention_backward.cpp) sits above this kernel.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t batch = qkv.size(0);
  const int64_t channels = qkv.size(1) / 3;
  const int64_t length = qkv.size(2);
  at::Tensor out = at::empty({batch, channels, length}, qkv.options());
  if (out.numel() == 0) {
    return out;
  }
  // fp32 arithmetic for every dtype: half inputs are widened once (an O(B*C*T) copy).
  const bool is_float = qkv.scalar_type() == at::kFloat;
  const at::Tensor qkv32 = is_float ? qkv : qkv.to(at::kFloat);
  at::Tensor out32 = is_float ? out : at::empty(out.sizes(), out.options().dtype(at::kFloat));
  const at::Tensor heads = qkv_heads_view(qkv32, num_heads, ch, legacy);
  const double scale = 1.0 / std::sqrt(static_cast<double>(ch));
  if (length >= kSdpaMinLength) {
    attention_sdpa(heads, out32, scale, lse);
  } else {
    attention_gemm(heads, out32, scale, lse);
  }
  if (!is_float) {
    out.copy_(out32);
  }
  return out;
}

at::Tensor attention_cpu(const at::Tensor& qkv, int64_t num_heads, bool legacy) {
  return attention_forward(qkv, num_heads, legacy, at::Tensor());
}

// The forward that also returns the (B, heads, T) fp32 logsumexp of each query's scaled logits,
// lse[b, h, t] = log sum_s exp(q_t . k_s / sqrt(ch)): what the backward needs to recompute P.
std::tuple<at::Tensor, at::Tensor> attention_lse_cpu(const at::Tensor& qkv, int64_t num_heads, bool legacy) {
  return am::forward_with_lse(attention_forward, qkv, num_heads, legacy);
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_lse", &attention_lse_cpu);
}
