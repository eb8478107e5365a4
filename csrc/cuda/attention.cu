// CUDA kernel of ddpm_fast::attention: a flash-style forward pass (ADM self-attention) reading q,
// k and v straight out of the qkv conv output (B, 3*C, T) with the layout's strides, no copy.
//
// One block of 256 threads computes 64 queries of one (batch, head); the grid is 1-D (axis x, limit
// 2^31 - 1), block = (batch * heads + head) * query_blocks + query block, so no grid axis with a
// 65535 limit is used and consecutive blocks share one head's K and V. The threads form a 16 x 16
// grid: thread row r owns queries 4r..4r+3 of the block, thread column c owns keys c, c+16, ... of
// each key tile and output dims c, c+16, ... . Per key tile (BLOCK_N keys):
//   1. K (ch x BLOCK_N) and V (BLOCK_N x ch) are staged in shared memory as fp32 (global loads are
//      consecutive along T, the contiguous dim of qkv);
//   2. each thread computes its 4 x KEYS_PER_THREAD logits from the pre-scaled Q tile (shared);
//   3. the online-softmax update (attention_math.h) per query row, the row max / sum reduced over
//      the 16 lanes of the thread row with warp shuffles; probabilities go to shared memory;
//   4. each thread accumulates its 4 x (ch/16) outputs += P V, in fp32 registers.
// The normalised output is staged through shared memory and stored coalesced along T into the
// (B, C, T) output. Arithmetic is fp32 for every storage dtype.
//
// Head dims 32, 64 and 128 have exact instantiations; any other head dim up to 256 runs the
// generic instantiation of the next size in {16, 32, 64, 128, 256}, zero-padding q, k, v.
//
// (ATen/cuda/CUDAContext.h is avoided: it includes cusparse.h, which the build's CUDA toolkit
// lacks; the stream comes from c10/cuda/CUDAStream.h, the same current stream.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "attention_math.h"

namespace {

namespace am = ddpm_fast::attention;

constexpr int kThreads = 256;
constexpr int kThreadCols = 16;                      // lanes of one thread row (half a warp)
constexpr int kThreadRows = kThreads / kThreadCols;  // 16
constexpr int kRowsPerThread = 4;
constexpr int kBlockM = kThreadRows * kRowsPerThread;  // 64 queries per block
constexpr int kMaxHeadDim = 256;

// Tile geometry and shared-memory layout for a (padded) head dim D. Leading dims are padded by
// one float where the access pattern would otherwise hit one bank from many lanes.
template <int D, int KEYS_PER_THREAD>
struct TileShape {
  static_assert(D % kThreadCols == 0, "head dim tile must be a multiple of 16");
  static constexpr int kD = D;
  static constexpr int kKeysPerThread = KEYS_PER_THREAD;
  static constexpr int kDimsPerThread = D / kThreadCols;
  static constexpr int kBlockN = kThreadCols * KEYS_PER_THREAD;
  static constexpr int kQLd = kBlockM + 1;  // Qs[d][m] (also the output staging Os[d][m])
  static constexpr int kKLd = kBlockN;      // Ks[d][n]
  static constexpr int kVLd = D + 1;        // Vs[n][d]
  static constexpr int kPLd = kBlockN + 1;  // Ps[m][n]
  static constexpr int kQFloats = D * kQLd;
  static constexpr int kKFloats = D * kKLd;
  static constexpr int kVFloats = kBlockN * kVLd;
  static constexpr int kPFloats = kBlockM * kPLd;
  static constexpr size_t kSmemBytes =
      sizeof(float) * static_cast<size_t>(kQFloats + kKFloats + kVFloats + kPFloats);
};

struct AttentionParams {
  int64_t length;     // T
  int64_t head_dim;   // ch (<= the tile's D)
  int64_t heads;
  int64_t query_blocks;  // ceil(T / 64)
  int64_t channels;   // C
  int64_t stride_b;   // qkv strides, in elements
  int64_t stride_c;
  int64_t stride_t;
  am::QkvChannels chan;
  float scale_log2;   // log2(e) / sqrt(ch)
};

// Max (or sum) over the 16 lanes of a thread row: xor offsets below 16 stay inside the half warp.
__device__ __forceinline__ float row_max(float x) {
#pragma unroll
  for (int offset = kThreadCols / 2; offset > 0; offset >>= 1) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
  for (int offset = kThreadCols / 2; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

template <typename scalar_t, typename Tile, bool EXACT>
__global__ void __launch_bounds__(kThreads)
attention_fwd_kernel(const scalar_t* __restrict__ qkv, scalar_t* __restrict__ out,
                     const AttentionParams p) {
  constexpr int D = Tile::kD;
  constexpr int BN = Tile::kBlockN;
  constexpr int R = kRowsPerThread;
  constexpr int KPT = Tile::kKeysPerThread;
  constexpr int DPT = Tile::kDimsPerThread;

  extern __shared__ float smem[];
  float* q_s = smem;
  float* k_s = q_s + Tile::kQFloats;
  float* v_s = k_s + Tile::kKFloats;
  float* p_s = v_s + Tile::kVFloats;

  // With EXACT the head dim is the tile's and every `d < head_dim` test folds away.
  const int64_t head_dim = EXACT ? D : p.head_dim;
  const int64_t length = p.length;
  const int tid = threadIdx.x;
  const int trow = tid / kThreadCols;
  const int tcol = tid % kThreadCols;
  const int64_t batch_head = blockIdx.x / p.query_blocks;
  const int64_t batch = batch_head / p.heads;
  const int64_t head = batch_head % p.heads;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) % p.query_blocks * kBlockM;

  const scalar_t* base = qkv + batch * p.stride_b;
  const scalar_t* q_g = base + (p.chan.q + head * p.chan.head) * p.stride_c;
  const scalar_t* k_g = base + (p.chan.k + head * p.chan.head) * p.stride_c;
  const scalar_t* v_g = base + (p.chan.v + head * p.chan.head) * p.stride_c;

  // Q tile, scaled by log2(e)/sqrt(ch); zero beyond T and beyond the head dim.
  for (int i = tid; i < D * kBlockM; i += kThreads) {
    const int d = i / kBlockM;
    const int m = i % kBlockM;
    float x = 0.0f;
    if (d < head_dim && m0 + m < length) {
      x = static_cast<float>(q_g[d * p.stride_c + (m0 + m) * p.stride_t]) * p.scale_log2;
    }
    q_s[d * Tile::kQLd + m] = x;
  }

  float acc[R][DPT];
  float m_run[R];
  float l_run[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m_run[r] = -INFINITY;
    l_run[r] = 0.0f;
#pragma unroll
    for (int j = 0; j < DPT; ++j) acc[r][j] = 0.0f;
  }

  for (int64_t n0 = 0; n0 < length; n0 += BN) {
    __syncthreads();  // the previous tile's K, V, P are consumed (and Q is written)
    for (int i = tid; i < D * BN; i += kThreads) {
      const int d = i / BN;
      const int n = i % BN;
      float kx = 0.0f, vx = 0.0f;
      if (d < head_dim && n0 + n < length) {
        const int64_t off = d * p.stride_c + (n0 + n) * p.stride_t;
        kx = static_cast<float>(k_g[off]);
        vx = static_cast<float>(v_g[off]);
      }
      k_s[d * Tile::kKLd + n] = kx;
      v_s[n * Tile::kVLd + d] = vx;
    }
    __syncthreads();

    // Logits of queries trow*R + r against keys tcol + 16*j of this tile (log2 domain).
    float s[R][KPT];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int j = 0; j < KPT; ++j) s[r][j] = 0.0f;
    }
#pragma unroll 8
    for (int d = 0; d < D; ++d) {
      float qv[R], kv[KPT];
#pragma unroll
      for (int r = 0; r < R; ++r) qv[r] = q_s[d * Tile::kQLd + trow * R + r];
#pragma unroll
      for (int j = 0; j < KPT; ++j) kv[j] = k_s[d * Tile::kKLd + tcol + kThreadCols * j];
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int j = 0; j < KPT; ++j) s[r][j] = fmaf(qv[r], kv[j], s[r][j]);
      }
    }
#pragma unroll
    for (int j = 0; j < KPT; ++j) {
      if (n0 + tcol + kThreadCols * j >= length) {
#pragma unroll
        for (int r = 0; r < R; ++r) s[r][j] = -INFINITY;
      }
    }

    // Online softmax per query row; key n0 is always valid, so the tile max is finite.
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float tile_max = s[r][0];
#pragma unroll
      for (int j = 1; j < KPT; ++j) tile_max = fmaxf(tile_max, s[r][j]);
      const float m_new = fmaxf(m_run[r], row_max(tile_max));
      const float alpha = am::online_softmax_alpha(m_run[r], m_new);
      float psum = 0.0f;
#pragma unroll
      for (int j = 0; j < KPT; ++j) {
        const float w = am::online_softmax_weight(s[r][j], m_new);
        p_s[(trow * R + r) * Tile::kPLd + tcol + kThreadCols * j] = w;
        psum += w;
      }
      l_run[r] = l_run[r] * alpha + row_sum(psum);
      m_run[r] = m_new;
#pragma unroll
      for (int j = 0; j < DPT; ++j) acc[r][j] *= alpha;
    }
    __syncthreads();

    // acc[r][j] += sum_n P[query r][n] * V[n][dim tcol + 16*j]
#pragma unroll 4
    for (int n = 0; n < BN; ++n) {
      float pv[R], vv[DPT];
#pragma unroll
      for (int r = 0; r < R; ++r) pv[r] = p_s[(trow * R + r) * Tile::kPLd + n];
#pragma unroll
      for (int j = 0; j < DPT; ++j) vv[j] = v_s[n * Tile::kVLd + tcol + kThreadCols * j];
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int j = 0; j < DPT; ++j) acc[r][j] = fmaf(pv[r], vv[j], acc[r][j]);
      }
    }
  }

  // Normalise and stage the (D x 64) output tile in the Q buffer as Os[d][m] ...
  __syncthreads();
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int j = 0; j < DPT; ++j) {
      q_s[(tcol + kThreadCols * j) * Tile::kQLd + trow * R + r] =
          am::online_softmax_finish(acc[r][j], l_run[r]);
    }
  }
  __syncthreads();
  // ... then store it coalesced along T: out[b, head*ch + d, t].
  scalar_t* o_g = out + (batch * p.channels + head * head_dim) * length;
  for (int i = tid; i < D * kBlockM; i += kThreads) {
    const int d = i / kBlockM;
    const int m = i % kBlockM;
    if (d < head_dim && m0 + m < length) {
      o_g[d * length + m0 + m] = static_cast<scalar_t>(q_s[d * Tile::kQLd + m]);
    }
  }
}

template <typename scalar_t, int D, int KEYS_PER_THREAD, bool EXACT>
void launch(const at::Tensor& qkv, at::Tensor& out, const AttentionParams& params) {
  using Tile = TileShape<D, KEYS_PER_THREAD>;
  auto* kernel = &attention_fwd_kernel<scalar_t, Tile, EXACT>;
  constexpr size_t smem = Tile::kSmemBytes;
  int device = 0;
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  DDPM_CHECK(smem <= static_cast<size_t>(smem_optin), "attention: head dim ", params.head_dim,
             " needs ", smem, " bytes of shared memory per block; the GPU allows ", smem_optin);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  int max_grid_x = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_grid_x, cudaDevAttrMaxGridDimX, device));
  const int64_t blocks = out.size(0) * params.heads * params.query_blocks;
  DDPM_CHECK(blocks <= max_grid_x, "attention: B * heads * ceil(T / ", kBlockM, ") = ", blocks,
             " blocks exceed the grid limit ", max_grid_x);
  const dim3 grid(static_cast<unsigned>(blocks));
  kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      qkv.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void dispatch_head_dim(const at::Tensor& qkv, at::Tensor& out, const AttentionParams& params) {
  switch (params.head_dim) {
    case 32: return launch<scalar_t, 32, 4, true>(qkv, out, params);
    case 64: return launch<scalar_t, 64, 4, true>(qkv, out, params);
    case 128: return launch<scalar_t, 128, 4, true>(qkv, out, params);
    default: break;
  }
  // Generic: the next tile size, zero-padded.
  if (params.head_dim <= 16) return launch<scalar_t, 16, 4, false>(qkv, out, params);
  if (params.head_dim <= 32) return launch<scalar_t, 32, 4, false>(qkv, out, params);
  if (params.head_dim <= 64) return launch<scalar_t, 64, 4, false>(qkv, out, params);
  if (params.head_dim <= 128) return launch<scalar_t, 128, 4, false>(qkv, out, params);
  return launch<scalar_t, kMaxHeadDim, 2, false>(qkv, out, params);
}

at::Tensor attention_cuda(const at::Tensor& qkv, int64_t num_heads, bool legacy) {
  const int64_t ch = am::check_qkv(qkv.sizes(), qkv.scalar_type(), num_heads);
  DDPM_CHECK(qkv.is_cuda(), "attention: qkv must be a CUDA tensor, got ", qkv.device());
  DDPM_CHECK(ch <= kMaxHeadDim, "attention: head dim C/num_heads=", ch,
             " is larger than the CUDA kernel's maximum ", kMaxHeadDim);
  const c10::cuda::CUDAGuard guard(qkv.device());
  const int64_t batch = qkv.size(0);
  const int64_t channels = qkv.size(1) / 3;
  const int64_t length = qkv.size(2);
  at::Tensor out = at::empty({batch, channels, length}, qkv.options());
  if (out.numel() == 0) {
    return out;
  }
  AttentionParams params;
  params.length = length;
  params.head_dim = ch;
  params.heads = num_heads;
  params.query_blocks = (length + kBlockM - 1) / kBlockM;
  params.channels = channels;
  params.stride_b = qkv.stride(0);
  params.stride_c = qkv.stride(1);
  params.stride_t = qkv.stride(2);
  params.chan = am::qkv_channels(channels, ch, legacy);
  params.scale_log2 = am::softmax_scale_log2(ch);
  AT_DISPATCH_SWITCH(qkv.scalar_type(), "ddpm_fast_attention",
                     AT_DISPATCH_CASE(at::kFloat, [&] { dispatch_head_dim<scalar_t>(qkv, out, params); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { dispatch_head_dim<scalar_t>(qkv, out, params); })
                     AT_DISPATCH_CASE(at::kBFloat16,
                                      [&] { dispatch_head_dim<scalar_t>(qkv, out, params); }));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("attention", &attention_cuda);
}
