// CPU kernel of ddpm_fast::attention: ADM self-attention on the qkv conv output, both layouts.
//
// q, k and v of every head are one strided (3, B, heads, ch, T) view of qkv (B, 3*C, T); the
// output is written as (B, C, T) in qkv's dtype, arithmetic in fp32 (half inputs are widened
// once: on this CPU SDPA's fp32 kernel is also faster than its bf16/fp16 ones). Two paths:
//   T <  512: two batched GEMMs on the views themselves (no copy) around a softmax;
//   T >= 512: ATen's scaled_dot_product_attention (its CPU flash kernel), on a packed copy of
//             the views, since the flash kernel needs the head dim contiguous (on the views SDPA
//             takes its math path, measured 2.5-5x slower than packing + flash).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "attention_math.h"

namespace {

namespace am = ddpm_fast::attention;

// (3, B, heads, ch, T) view of qkv (B, 3*C, T), no copy: index 0/1/2 of the first dim is q/k/v.
// Both layouts put k exactly as far after q as v after k (ch channels in legacy, C in new).
at::Tensor qkv_heads_view(const at::Tensor& qkv, int64_t num_heads, int64_t ch, bool legacy) {
  const int64_t channels = qkv.size(1) / 3;
  const am::QkvChannels at_ch = am::qkv_channels(channels, ch, legacy);
  const int64_t sb = qkv.stride(0), sc = qkv.stride(1), st = qkv.stride(2);
  return qkv.as_strided({3, qkv.size(0), num_heads, ch, qkv.size(2)},
                        {(at_ch.k - at_ch.q) * sc, sb, at_ch.head * sc, sc, st},
                        qkv.storage_offset() + at_ch.q * sc);
}

// Short sequences: two batched GEMMs on the (batch x heads) views (BLAS reads the transposed
// operands in place) around an in-place softmax of the (T, T) logits.
// heads: (3, B, heads, ch, T) fp32 view; out: (B, C, T) fp32 contiguous.
void attention_gemm(const at::Tensor& heads, at::Tensor& out, double scale) {
  const int64_t batch = heads.size(1), num_heads = heads.size(2), ch = heads.size(3),
                length = heads.size(4);
  // Batched GEMMs over (batch x heads) at once — a loop of small per-sample GEMMs on strided
  // views is slower than one large call — in chunks of samples bounding the (T x T) buffers.
  constexpr int64_t kMaxLogitBytes = int64_t(64) << 20;
  const int64_t per_sample = num_heads * length * length * int64_t(sizeof(float));
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(batch, kMaxLogitBytes / per_sample));
  for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
    const int64_t nb = std::min(chunk, batch - b0);
    const int64_t bh = nb * num_heads;
    // (nb, heads, ch, T) -> (nb * heads, ch, T): a view for the legacy layout, one copy otherwise
    const at::Tensor q = heads[0].narrow(0, b0, nb).reshape({bh, ch, length});
    const at::Tensor k = heads[1].narrow(0, b0, nb).reshape({bh, ch, length});
    const at::Tensor v = heads[2].narrow(0, b0, nb).reshape({bh, ch, length});
    at::Tensor logits = at::empty({bh, length, length}, heads.options());
    logits.baddbmm_(q.transpose(1, 2), k, /*beta=*/0.0, /*alpha=*/scale);  // [t, s] = q_t . k_s
    at::_softmax_out(logits, logits, -1, /*half_to_float=*/false);          // in place
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
void attention_sdpa(const at::Tensor& heads, at::Tensor& out, double scale) {
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
  const at::Tensor result = at::scaled_dot_product_attention(
      packed[0], packed[1], packed[2], /*attn_mask=*/std::nullopt, /*dropout_p=*/0.0,
      /*is_causal=*/false, scale);  // (B, heads, T, ch)
  out.view({batch, num_heads, ch, length}).copy_(result.transpose(2, 3));
}

// From this T on the flash kernel wins: measured on 1 thread (ch = 64), GEMM vs SDPA path:
// T = 64: 1.3 vs 2.7 ms (B = 16, 4 heads), T = 256: 7.8 vs 8.7 ms (B = 4), T = 512: even,
// T = 1024: 122 vs 63 ms (B = 1, 8 heads); the GEMM path also holds (heads, T, T) logits.
constexpr int64_t kSdpaMinLength = 512;

at::Tensor attention_cpu(const at::Tensor& qkv, int64_t num_heads, bool legacy) {
  const int64_t ch = am::check_qkv(qkv.sizes(), qkv.scalar_type(), num_heads);
  DDPM_CHECK(qkv.device().is_cpu(), "attention: qkv must be a CPU tensor, got ", qkv.device());
  // A forward-only kernel: its internal ops (in-place softmax, out= GEMMs, copies into the
  // packed buffer) must not record autograd even when qkv requires grad. The public op
  // (ddpm_fast.ops.attention) sends inputs that require grad to the differentiable reference.
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
    attention_sdpa(heads, out32, scale);
  } else {
    attention_gemm(heads, out32, scale);
  }
  if (!is_float) {
    out.copy_(out32);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("attention", &attention_cpu);
}
