// ADM self-attention, math shared by the CPU (csrc/cpu/attention.cpp) and CUDA
// (csrc/cuda/attention.cu) kernels: where q, k and v of each head sit inside the qkv tensor, and
// the per-row online-softmax update of a flash-style forward pass.
//
// qkv is (B, 3*C, T) as ADM's 1x1 qkv conv produces it; C = heads * ch.
//   legacy (QKVAttentionLegacy): channels [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], each block ch wide
//   new    (QKVAttention):       channels [q_0 q_1 ... | k_0 k_1 ... | v_0 v_1 ...]
// Channel of dim d (0 <= d < ch) of head h of q is  q + h * head + d  (likewise k, v).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cmath>
#include <cstdint>

#include "ddpm_fast_common.h"

namespace ddpm_fast::attention {

// Channel offsets (in channels, not elements) of head 0's q, k, v and the step between heads.
struct QkvChannels {
  int64_t q;
  int64_t k;
  int64_t v;
  int64_t head;
};

DDPM_HD QkvChannels qkv_channels(int64_t channels, int64_t head_dim, bool legacy) {
  if (legacy) {
    return {0, head_dim, 2 * head_dim, 3 * head_dim};
  }
  return {0, channels, 2 * channels, head_dim};
}

// log2(e) / sqrt(ch): logits q.k are multiplied by this so the softmax can use exp2.
DDPM_HD float softmax_scale_log2(int64_t head_dim) {
  return 1.4426950408889634f / sqrtf(static_cast<float>(head_dim));
}

// Online softmax over key tiles, in the log2 domain. A row keeps its running max m (of the scaled
// logits seen so far) and running sum l of exp2(s - m); on a new tile with max `tile_max`:
//   m' = max(m, tile_max), alpha = exp2(m - m'), l' = l * alpha + sum exp2(s - m'),
//   acc' = acc * alpha + sum exp2(s - m') v.
// `alpha` is 0 for the first tile (m = -inf); m' is finite once one valid key was seen.
DDPM_HD float online_softmax_alpha(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.0f : exp2f(m_old - m_new);
}

DDPM_HD float online_softmax_weight(float s, float m_new) {
  return s == -INFINITY ? 0.0f : exp2f(s - m_new);
}

// The natural-log logsumexp of a row's logits z (= s / log2(e)) from its final online-softmax
// state: sum exp(z) = 2^m * l, so lse = ln(2) * (m + log2(l)). Saved by the forward under autograd
// (ddpm_fast::attention_lse); the backward recomputes P = exp2(s - lse * log2(e)) from it.
DDPM_HD float online_softmax_lse(float m, float l) {
  return (m + log2f(l)) * 0.6931471805599453f;
}

// Final normalisation of a row's accumulator: acc / l as acc * online_softmax_inverse(l), one
// reciprocal per row. l >= 1 (the row max contributes exp2(0) = 1), so on the GPU the fast
// reciprocal (__fdividef: MUFU.RCP, 2 ulp in this range) replaces IEEE division, whose slow-path
// subroutine CALLs cost the scalar kernel register saves on the stack (issue 16).
DDPM_HD float online_softmax_inverse(float l) {
#if defined(__CUDA_ARCH__)
  return __fdividef(1.0f, l);
#else
  return 1.0f / l;
#endif
}

DDPM_HD float online_softmax_finish(float acc, float inv_l) {
  return acc * inv_l;
}

// (batch, head, tile) of block `block` of the CUDA kernels' 1-D grids, ordered
// block = (batch * heads + head) * tiles + tile (consecutive blocks share one head's K and V).
// 32-bit unsigned division (the grid is below 2^31 blocks): int64 division is a subroutine CALL,
// whose register saves gave the scalar kernel a stack frame (issue 16).
struct BlockCoords {
  uint32_t batch, head, tile;
};

DDPM_HD BlockCoords split_block(uint32_t block, uint32_t tiles, uint32_t heads) {
  const uint32_t batch_head = block / tiles;
  return {batch_head / heads, batch_head % heads, block % tiles};
}

// Host-side checks of a direct torch.ops.ddpm_fast.attention call (the Python wrapper raises
// ValueError first); shared by the CPU and CUDA kernels. Returns the head dim ch.
inline int64_t check_qkv(c10::IntArrayRef sizes, c10::ScalarType dtype, int64_t num_heads) {
  DDPM_CHECK(sizes.size() == 3, "attention: qkv must be (B, 3*C, T), got ", sizes.size(), " dims");
  DDPM_CHECK(dtype == c10::kFloat || dtype == c10::kHalf || dtype == c10::kBFloat16,
             "attention: qkv must be float32, float16 or bfloat16, got ", dtype);
  DDPM_CHECK(num_heads >= 1, "attention: num_heads must be >= 1, got ", num_heads);
  DDPM_CHECK(sizes[1] % 3 == 0, "attention: qkv's channel count ", sizes[1],
             " must be a multiple of 3 (q, k and v)");
  const int64_t channels = sizes[1] / 3;
  DDPM_CHECK(channels % num_heads == 0, "attention: num_heads=", num_heads, " must divide C=",
             channels);
  return channels / num_heads;
}

// Host-side checks of a direct torch.ops.ddpm_fast.attention_backward call, after check_qkv:
// grad_out and out (B, C, T), lse (B, heads, T) float32.
inline void check_backward_args(c10::IntArrayRef grad_out, c10::IntArrayRef out, c10::IntArrayRef lse,
                                c10::ScalarType lse_dtype, int64_t batch, int64_t channels, int64_t num_heads,
                                int64_t length) {
  const int64_t want_out[] = {batch, channels, length};
  const int64_t want_lse[] = {batch, num_heads, length};
  DDPM_CHECK(grad_out.equals(want_out), "attention_backward: grad_out must be (B, C, T) = ", c10::IntArrayRef(want_out),
             ", got ", grad_out);
  DDPM_CHECK(out.equals(want_out), "attention_backward: out must be (B, C, T) = ", c10::IntArrayRef(want_out),
             ", got ", out);
  DDPM_CHECK(lse.equals(want_lse), "attention_backward: lse must be (B, heads, T) = ", c10::IntArrayRef(want_lse),
             ", got ", lse);
  DDPM_CHECK(lse_dtype == c10::kFloat, "attention_backward: lse must be float32, got ", lse_dtype);
}

}  // namespace ddpm_fast::attention
