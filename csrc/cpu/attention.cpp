// CPU kernel of ddpm_fast::attention: ADM self-attention on the qkv conv output, both layouts.
//
// q, k and v of every head are read through one strided view of qkv (B, 3*C, T); the attention
// itself is ATen's scaled_dot_product_attention. Its CPU flash kernel needs the head dim
// contiguous (stride 1); on the qkv views that dim has stride T, which sends SDPA to its much
// slower math path (2.5-5x slower measured at (4, 768, 256) and (1, 1536, 1024), 2 threads). So
// the view is packed once, with the fp32 cast folded in, into a (3, B, heads, T, ch) float
// buffer: an O(B*C*T) copy in front of O(B*C*T^2) work, and fp32 arithmetic for half inputs
// (which on this CPU is also faster than SDPA's bf16/fp16 kernels). The (B, heads, T, ch) result
// is written back transposed into the (B, C, T) output in qkv's dtype.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "attention_math.h"

namespace {

namespace am = ddpm_fast::attention;

at::Tensor attention_cpu(const at::Tensor& qkv, int64_t num_heads, bool legacy) {
  const int64_t ch = am::check_qkv(qkv.sizes(), qkv.scalar_type(), num_heads);
  DDPM_CHECK(qkv.device().is_cpu(), "attention: qkv must be a CPU tensor, got ", qkv.device());
  const int64_t batch = qkv.size(0);
  const int64_t channels = qkv.size(1) / 3;
  const int64_t length = qkv.size(2);
  at::Tensor out = at::empty({batch, channels, length}, qkv.options());
  if (out.numel() == 0) {
    return out;
  }

  // (3, B, heads, T, ch) view of qkv: index 0/1/2 along the first dim is q/k/v. Both layouts put
  // k exactly as far after q as v after k (ch channels in legacy, C in new).
  const am::QkvChannels at_ch = am::qkv_channels(channels, ch, legacy);
  const int64_t sb = qkv.stride(0), sc = qkv.stride(1), st = qkv.stride(2);
  at::Tensor qkv_view =
      qkv.as_strided({3, batch, num_heads, length, ch},
                     {(at_ch.k - at_ch.q) * sc, sb, at_ch.head * sc, st, sc},
                     qkv.storage_offset() + at_ch.q * sc);

  at::Tensor packed = at::empty({3, batch, num_heads, length, ch}, qkv.options().dtype(at::kFloat));
  packed.copy_(qkv_view);

  const double scale = 1.0 / std::sqrt(static_cast<double>(ch));
  at::Tensor heads_out = at::scaled_dot_product_attention(
      packed[0], packed[1], packed[2], /*attn_mask=*/std::nullopt, /*dropout_p=*/0.0,
      /*is_causal=*/false, scale);  // (B, heads, T, ch) float

  // out[b, h*ch + d, t] = heads_out[b, h, t, d]
  out.view({batch, num_heads, ch, length}).copy_(heads_out.transpose(2, 3));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("attention", &attention_cpu);
}
