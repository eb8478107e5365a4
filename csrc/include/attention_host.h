// ATen host helpers of the attention kernels, unlike attention_math.h not for device code: the
// forward-with-logsumexp entry point of the CPU and CUDA forwards (csrc/cpu/attention.cpp,
// csrc/cuda/attention.cu), and for the CPU kernels (forward and csrc/cpu/attention_backward.cpp)
// the per-head view of a qkv-shaped tensor and the chunking of the batched GEMMs over samples.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "attention_math.h"

namespace ddpm_fast::attention {

// (3, B, heads, ch, T) view of a (B, 3*C, T) tensor (qkv, or its gradient), no copy: index 0/1/2
// of the first dim is q/k/v. Both layouts put k exactly as far after q as v after k (ch channels
// in legacy, C in new), so one stride covers the three.
inline at::Tensor qkv_heads_view(const at::Tensor& qkv, int64_t num_heads, int64_t ch, bool legacy) {
  const int64_t channels = qkv.size(1) / 3;
  const QkvChannels at_ch = qkv_channels(channels, ch, legacy);
  const int64_t sb = qkv.stride(0), sc = qkv.stride(1), st = qkv.stride(2);
  return qkv.as_strided({3, qkv.size(0), num_heads, ch, qkv.size(2)},
                        {(at_ch.k - at_ch.q) * sc, sb, at_ch.head * sc, sc, st},
                        qkv.storage_offset() + at_ch.q * sc);
}

// Samples per batched-GEMM call: batched GEMMs over (samples x heads) at once -- a loop of small
// per-sample GEMMs on strided views is slower than one large call -- in chunks of samples that
// bound each (heads, T, T) fp32 buffer to 64 MiB.
inline int64_t samples_per_chunk(int64_t batch, int64_t num_heads, int64_t length) {
  constexpr int64_t kMaxLogitBytes = int64_t(64) << 20;
  const int64_t per_sample = num_heads * length * length * int64_t(sizeof(float));
  return std::max<int64_t>(1, std::min<int64_t>(batch, kMaxLogitBytes / std::max<int64_t>(per_sample, 1)));
}

// q, k or v (`which` = 0, 1, 2) of samples b0 .. b0 + nb of a (3, B, heads, ch, T) view, as the
// (nb * heads, ch, T) batch of the GEMMs: a view for the legacy layout, one copy otherwise.
inline at::Tensor head_chunk(const at::Tensor& heads, int64_t which, int64_t b0, int64_t nb) {
  return heads[which].narrow(0, b0, nb).reshape({nb * heads.size(2), heads.size(3), heads.size(4)});
}

// ddpm_fast::attention_lse on one backend: `forward(qkv, num_heads, legacy, lse)` fills lse, a new
// (B, heads, T) fp32 tensor, with each query's logsumexp and returns the output.
template <typename Forward>
std::tuple<at::Tensor, at::Tensor> forward_with_lse(Forward forward, const at::Tensor& qkv, int64_t num_heads,
                                                    bool legacy) {
  const int64_t ch = check_qkv(qkv.sizes(), qkv.scalar_type(), num_heads);
  at::Tensor lse = at::empty({qkv.size(0), qkv.size(1) / 3 / ch, qkv.size(2)}, qkv.options().dtype(at::kFloat));
  at::Tensor out = forward(qkv, num_heads, legacy, lse);
  return {out, lse};
}

}  // namespace ddpm_fast::attention
