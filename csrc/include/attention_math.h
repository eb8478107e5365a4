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

}  // namespace ddpm_fast::attention
