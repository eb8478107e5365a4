// CUDA kernels of ddpm_fast::attention: flash-style forward passes (ADM self-attention) reading q,
// k and v straight out of the qkv conv output (B, 3*C, T) with the layout's strides, no copy.
//
// Two kernels behind one launcher (dispatch_head_dim):
//   tc::attention_tc_kernel (below, "tensor-core flash attention"): fp16 / bf16, head dims 32, 64,
//     128 on sm_80+, when q, k, v can be read in 16-byte cp.async chunks along a unit stride
//     (stride_t == 1: the NCHW conv output; stride_c == 1: the channels_last view) with the base
//     and the other strides 16-byte aligned;
//   attention_fwd_kernel (scalar fp32 math): everything else (fp32, other head dims up to 256,
//     other strides, misaligned views).
// Both use a 1-D grid of (batch, head, 64-query block) blocks, the current stream and the device
// guard; the output is a new (B, C, T) contiguous tensor. ddpm_fast::attention_lse (the forward
// under autograd) runs the same kernels with AttentionParams::lse set: each row's thread (lane
// column 0; quad lane 0 on the tensor cores) also stores the row's logsumexp, (B, heads, T) fp32,
// for the backward of attention_backward.cu.
//
// The scalar kernel: one block of 256 threads computes 64 queries of one (batch, head); the grid is 1-D (axis x, limit
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
#include <cstdint>
#include <type_traits>

#include "attention_host.h"
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
  float* lse;         // (B, heads, T) fp32: each query's logsumexp (ddpm_fast::attention_lse), or null
};

// (batch, head, query block) of this block (attention_math.h: 32-bit division, no stack frame).
__device__ __forceinline__ am::BlockCoords block_coords(const AttentionParams& p) {
  return am::split_block(blockIdx.x, static_cast<uint32_t>(p.query_blocks), static_cast<uint32_t>(p.heads));
}

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
  const am::BlockCoords bc = block_coords(p);
  const int64_t batch = bc.batch, head = bc.head, m0 = bc.tile * int64_t{kBlockM};

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

  // Normalise (one reciprocal per row) and stage the (D x 64) output tile in the Q buffer as
  // Os[d][m] ...
  __syncthreads();
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float inv_l = am::online_softmax_inverse(l_run[r]);
#pragma unroll
    for (int j = 0; j < DPT; ++j) {
      q_s[(tcol + kThreadCols * j) * Tile::kQLd + trow * R + r] = am::online_softmax_finish(acc[r][j], inv_l);
    }
  }
  if (p.lse != nullptr && tcol == 0) {  // the forward under autograd: the rows' logsumexp
    float* lse_g = p.lse + (batch * p.heads + head) * length + m0;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (m0 + trow * R + r < length) lse_g[trow * R + r] = am::online_softmax_lse(m_run[r], l_run[r]);
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

// ---- tensor-core flash attention (fp16 / bf16, head dims 32, 64, 128; sm_80+) ------------------
//
// One block of 4 warps computes 64 queries of one (batch, head), 16 query rows per warp; key tiles
// of 64. Per key tile, all on the tensor cores (mma.sync.m16n8k16, fp32 accumulate):
//   S (16 x 64 per warp) = Q K^T: Q's A fragments are loaded once (ldmatrix x4) and kept in
//     registers; K's B fragments come from shared memory with ldmatrix x4 (two 8-key blocks each);
//   online softmax on the S accumulator fragment in fp32, exp2 domain (attention_math.h): a thread
//     holds 2 rows (g, g+8), the row max is reduced over the 4 lanes of its quad;
//   O (16 x D) += P V: P stays in registers: the S accumulator of keys 16k..16k+15 re-packed to
//     16-bit pairs is exactly the A fragment of that k step (FA2's trick); V's B fragments by
//     ldmatrix x4.
// K and V tiles are double-buffered: cp.async (16 B, zero-fill past T) of tile j+1 overlaps the
// math of tile j. q, k and v are read straight from qkv (B, 3C, T) in either stride order:
//   CMAJOR = false (stride_c == 1, the channels_last view): shared tiles are [token][dim], each
//     16-byte chunk 8 consecutive dims of one token;
//   CMAJOR = true (stride_t == 1, the plain NCHW conv output): shared tiles are [dim][token], each
//     chunk 8 consecutive tokens of one dim.
// The two orders are the same tiles transposed, so they differ only in the cp.async mapping and
// in which ldmatrix loads transpose (Q and K when CMAJOR, V when not). Rows are padded by 8
// elements (16 B): the 8 row addresses of an ldmatrix hit 8 distinct 16-byte bank groups.
// The normalised output is staged in shared memory as [dim][token] and stored along T.
namespace tc {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;  // 64 queries per block
constexpr int kBlockN = 64;           // keys per tile
constexpr int kPad = 8;               // elements of padding per shared row

struct alignas(16) Chunk16 {  // 8 16-bit values: one vector load / store
  uint32_t w[4];
};

template <int D, bool CMAJOR>
struct Smem {
  static constexpr int kRows = CMAJOR ? D : kBlockN;         // rows of one Q, K or V tile
  static constexpr int kLd = (CMAJOR ? kBlockN : D) + kPad;  // elements per row
  static constexpr int kTile = kRows * kLd;                  // elements per tile
  static constexpr int kChunksPerRow = (CMAJOR ? kBlockN : D) / 8;
  static constexpr int kChunks = kRows * kChunksPerRow;      // 16-byte chunks per tile
  static_assert(kChunks % kThreads == 0, "a tile is a whole number of chunks per thread");
  static_assert(kBlockM == kBlockN, "Q and K/V tiles share one shape");
  // Q, then K[2], V[2] (double-buffered); the output staging [kBlockM][D + kPad] reuses the start.
  static constexpr size_t kBytes = 5 * static_cast<size_t>(kTile) * 2;
  static_assert(static_cast<size_t>(kBlockM) * (D + kPad) <= 5 * static_cast<size_t>(kTile),
                "output staging fits");
};

// ---- PTX wrappers (SIMT_HARNESS: tests/simt/simt_mma.h emulates them on the CPU) ---------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
#if defined(SIMT_HARNESS)
  return 0;
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// Four 8x8 16-bit matrices; lane 8j + r gives the address of row r of matrix j, register j gets
// matrix j's fragment (row lane/4, elements 2(lane%4), +1; of the transpose with TRANS).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
#if defined(SIMT_HARNESS)
  ::simt::ldmatrix<4, TRANS>(r, p);
#else
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
  }
#endif
}

// 16 bytes global -> shared, asynchronous; bytes past `src_bytes` (0..16) are zero-filled.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
#if defined(SIMT_HARNESS)
  ::simt::cp_async_16(dst, src, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(SIMT_HARNESS)
  ::simt::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(SIMT_HARNESS)
  ::simt::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// d += a b on one m16n8k16 tile, 16-bit inputs of type scalar_t, fp32 accumulator.
template <typename scalar_t>
__device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  static_assert(std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>);
#if defined(SIMT_HARNESS)
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    ::simt::mma_m16n8k16_f32_f16(d, a, b, d);
  } else {
    ::simt::mma_m16n8k16_f32_bf16(d, a, b, d);
  }
#else
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// Two floats as one register of 16-bit values, `lo` in the low half (the mma operand order).
template <typename scalar_t>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(scalar_t(lo).x) | static_cast<uint32_t>(scalar_t(hi).x) << 16;
}

// Issue the cp.async copies of one tile: rows x chunks of 8 elements. `g` points at element
// (dim 0, token t0) of q, k or v; past T the chunk is zero-filled (src-size 0, or the part of a
// CMAJOR chunk that straddles T).
template <int D, bool CMAJOR, typename scalar_t>
__device__ __forceinline__ void load_tile(scalar_t* s, const scalar_t* g, int64_t t0, int64_t length,
                                          int64_t stride_c, int64_t stride_t) {
  using S = Smem<D, CMAJOR>;
#pragma unroll
  for (int i = 0; i < S::kChunks / kThreads; ++i) {
    const int c = static_cast<int>(threadIdx.x) + i * kThreads;
    const int row = c / S::kChunksPerRow;
    const int col = c % S::kChunksPerRow * 8;
    // CMAJOR: row = dim, col = token offset; else row = token offset, col = dim
    const int64_t t = t0 + (CMAJOR ? col : row);
    const int64_t left = length - t;  // tokens left from this chunk's first one
    const int bytes = left <= 0 ? 0 : (CMAJOR ? static_cast<int>(left < 8 ? left : 8) * 2 : 16);
    const scalar_t* src = bytes == 0 ? g
                          : CMAJOR   ? g + row * stride_c + (t - t0)
                                     : g + (t - t0) * stride_t + col;
    cp_async_16(s + row * S::kLd + col, src, bytes);
  }
}

// (min 1 block per SM: without it ptxas held the D = 32 instantiations to 96 registers on sm_90
// and spilled 4-12 bytes; with it they take about 120)
template <typename scalar_t, int D, bool CMAJOR>
__global__ void __launch_bounds__(kThreads, 1)
attention_tc_kernel(const scalar_t* __restrict__ qkv, scalar_t* __restrict__ out, const AttentionParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync.m16n8k16 / cp.async need sm_80 (the launcher only picks this on sm_80+)
#else
  using S = Smem<D, CMAJOR>;
  constexpr int kNB = kBlockN / 8;  // 8-key blocks of S per warp row
  constexpr int kDB = D / 8;        // 8-dim blocks of O
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* q_s = reinterpret_cast<scalar_t*>(smem_raw);
  scalar_t* k_s = q_s + S::kTile;      // 2 buffers
  scalar_t* v_s = k_s + 2 * S::kTile;  // 2 buffers

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;  // mma fragment row group / thread in group
  const int lr = lane % 8, lj = lane / 8;  // ldmatrix: row within a matrix / matrix index
  const int64_t length = p.length;
  const am::BlockCoords bc = block_coords(p);
  const int64_t batch = bc.batch, head = bc.head, m0 = bc.tile * int64_t{kBlockM};

  const scalar_t* base = qkv + batch * p.stride_b;
  const scalar_t* q_g = base + (p.chan.q + head * p.chan.head) * p.stride_c;
  const scalar_t* k_g = base + (p.chan.k + head * p.chan.head) * p.stride_c;
  const scalar_t* v_g = base + (p.chan.v + head * p.chan.head) * p.stride_c;
  const int64_t sc = p.stride_c, st = p.stride_t;

  load_tile<D, CMAJOR>(q_s, q_g + m0 * st, m0, length, sc, st);
  load_tile<D, CMAJOR>(k_s, k_g, 0, length, sc, st);
  load_tile<D, CMAJOR>(v_s, v_g, 0, length, sc, st);
  cp_async_commit();

  // Shared offsets (elements) of this lane's ldmatrix row addresses. Matrix lj of an x4:
  //   A (Q, 16 x 16 of rows m, cols d):      m block lj & 1, d block lj >> 1
  //   B (K^T or V, 16 x 16 of k x two n blocks): k block lj & 1, n block lj >> 1
  // [m][d] storage (not CMAJOR) is read as is, [d][m] transposed.
  const int a_m = warp * 16 + (lj & 1) * 8, a_k = (lj >> 1) * 8;
  const int b_k = (lj & 1) * 8, b_n = (lj >> 1) * 8;
  const int q_off = CMAJOR ? (a_k + lr) * S::kLd + a_m : (a_m + lr) * S::kLd + a_k;
  // K^T: k = dim, n = key.  [key][dim] storage: row key; [dim][key]: row dim (transposed).
  const int k_off = CMAJOR ? (b_k + lr) * S::kLd + b_n : (b_n + lr) * S::kLd + b_k;
  // V: k = key, n = dim.  [key][dim] storage: row key (transposed); [dim][key]: row dim.
  const int v_off = CMAJOR ? (b_n + lr) * S::kLd + b_k : (b_k + lr) * S::kLd + b_n;
  // Step of the row address per 16 along d (Q's and K's k, V's n) and per 16 keys.
  constexpr int kStepD = CMAJOR ? 16 * S::kLd : 16;
  constexpr int kStepKey = CMAJOR ? 16 : 16 * S::kLd;

  float o[kDB][4];
#pragma unroll
  for (int j = 0; j < kDB; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY};  // rows g and g + 8, scaled log2 domain
  float l_run[2] = {0.0f, 0.0f};            // this thread's part of the row sums
  const float scale = p.scale_log2;
  const int tiles = static_cast<int>((length + kBlockN - 1) / kBlockN);  // T < 2^31 (grid limit)

  cp_async_wait<0>();
  __syncthreads();  // Q and tile 0 landed
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4<CMAJOR>(qf[kk], q_s + q_off + kk * kStepD);

  for (int j = 0; j < tiles; ++j) {
    const int buf = j & 1;
    // Tile j + 1 into the other buffer (its last readers, tile j - 1's math, passed the barrier
    // at the end of the previous iteration), in flight during tile j's math.
    if (j + 1 < tiles) {
      const int64_t n1 = static_cast<int64_t>(j + 1) * kBlockN;
      load_tile<D, CMAJOR>(k_s + (buf ^ 1) * S::kTile, k_g + n1 * st, n1, length, sc, st);
      load_tile<D, CMAJOR>(v_s + (buf ^ 1) * S::kTile, v_g + n1 * st, n1, length, sc, st);
    }
    cp_async_commit();
    const scalar_t* kt = k_s + buf * S::kTile;
    const scalar_t* vt = v_s + buf * S::kTile;

    // S = Q K^T
    float s[kNB][4];
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kNB / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4<CMAJOR>(b, kt + k_off + kk * kStepD + np * kStepKey);
        mma_16816<scalar_t>(s[2 * np], qf[kk], b);
        mma_16816<scalar_t>(s[2 * np + 1], qf[kk], b + 2);
      }
    }

    // Online softmax on rows g (h = 0) and g + 8 (h = 1); keys past T get weight 0.
    const int64_t n0 = static_cast<int64_t>(j) * kBlockN;
    const bool partial = n0 + kBlockN > length;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float x = s[nb][2 * h + e] * scale;
          if (partial && n0 + nb * 8 + 2 * t4 + e >= length) x = -INFINITY;
          s[nb][2 * h + e] = x;
          tile_max = fmaxf(tile_max, x);
        }
      }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      // key n0 is valid: tile_max and m_new are finite
      const float m_new = fmaxf(m_run[h], tile_max);
      const float alpha = am::online_softmax_alpha(m_run[h], m_new);
      m_run[h] = m_new;
      float psum = 0.0f;
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float w = am::online_softmax_weight(s[nb][2 * h + e], m_new);
          s[nb][2 * h + e] = w;
          psum += w;
        }
      }
      l_run[h] = l_run[h] * alpha + psum;
#pragma unroll
      for (int db = 0; db < kDB; ++db) {
        o[db][2 * h] *= alpha;
        o[db][2 * h + 1] *= alpha;
      }
    }

    // O += P V, P re-packed from the S fragments: k step kk covers keys 16kk..16kk+15 =
    // S blocks 2kk (A regs 0, 1) and 2kk+1 (A regs 2, 3).
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {pack2<scalar_t>(s[2 * kk][0], s[2 * kk][1]),
                             pack2<scalar_t>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<scalar_t>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<scalar_t>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kDB / 2; ++dp) {
        uint32_t b[4];
        ldmatrix_x4<!CMAJOR>(b, vt + v_off + kk * kStepKey + dp * kStepD);
        mma_16816<scalar_t>(o[2 * dp], a, b);
        mma_16816<scalar_t>(o[2 * dp + 1], a, b + 2);
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // tile j + 1 landed for everyone; everyone is done with buffer buf
  }

  // Row sums over the quad, one reciprocal per row (the shared buffers are free: every warp passed
  // the loop's last barrier).
  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[h] = am::online_softmax_inverse(l);
    const int64_t row = m0 + warp * 16 + g + 8 * h;
    if (p.lse != nullptr && t4 == 0 && row < length) {  // the forward under autograd: logsumexp
      p.lse[(batch * p.heads + head) * length + row] = am::online_softmax_lse(m_run[h], l);
    }
  }
  // O staged as [query][dim] (32-bit stores of a thread's dim pairs), then gathered along T.
  constexpr int kOLd = D + kPad;
  scalar_t* o_s = q_s;
#pragma unroll
  for (int db = 0; db < kDB; ++db) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = warp * 16 + g + 8 * h;
      *reinterpret_cast<uint32_t*>(o_s + m * kOLd + db * 8 + 2 * t4) =
          pack2<scalar_t>(am::online_softmax_finish(o[db][2 * h], inv[h]),
                          am::online_softmax_finish(o[db][2 * h + 1], inv[h]));
    }
  }
  __syncthreads();
  scalar_t* o_g = out + (batch * p.channels + head * D) * length + m0;
  const int64_t rows_left = length - m0;
  if (rows_left >= kBlockM && length % 8 == 0) {  // whole 16-byte chunks along T, aligned
#pragma unroll
    for (int i = 0; i < D * kBlockM / 8 / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int d = c / (kBlockM / 8), m = c % (kBlockM / 8) * 8;
      Chunk16 chunk;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        chunk.w[k] = static_cast<uint32_t>(o_s[(m + 2 * k) * kOLd + d].x) |
                     static_cast<uint32_t>(o_s[(m + 2 * k + 1) * kOLd + d].x) << 16;
      }
      *reinterpret_cast<Chunk16*>(o_g + d * length + m) = chunk;
    }
  } else {
    for (int c = tid; c < D * kBlockM; c += kThreads) {
      const int d = c / kBlockM, m = c % kBlockM;
      if (m < rows_left) o_g[d * length + m] = o_s[m * kOLd + d];
    }
  }
#endif
}

}  // namespace tc

static_assert(tc::kBlockM == kBlockM, "both kernels share the grid's query blocks");

// One block per (batch, head, 64 queries) on the 1-D grid, the current stream; `smem` bytes of
// dynamic shared memory (opted in past 48 KiB).
template <typename scalar_t>
void launch_1d(void (*kernel)(const scalar_t*, scalar_t*, AttentionParams), size_t smem, int threads,
               int device, const at::Tensor& qkv, at::Tensor& out, const AttentionParams& params) {
  int smem_optin = 0;
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
#if defined(SIMT_HARNESS)
  ::simt::cp_async_new_launch();  // tests/simt/simt_mma.h: no copy of an earlier launch is pending
#endif
  kernel<<<grid, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      qkv.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int D, int KEYS_PER_THREAD, bool EXACT>
void launch(int device, const at::Tensor& qkv, at::Tensor& out, const AttentionParams& params) {
  using Tile = TileShape<D, KEYS_PER_THREAD>;
  launch_1d<scalar_t>(&attention_fwd_kernel<scalar_t, Tile, EXACT>, Tile::kSmemBytes, kThreads, device, qkv,
                      out, params);
}

template <typename scalar_t, int D>
void launch_tc(bool cmajor, int device, const at::Tensor& qkv, at::Tensor& out, const AttentionParams& params) {
  if (cmajor) {
    launch_1d<scalar_t>(&tc::attention_tc_kernel<scalar_t, D, true>, tc::Smem<D, true>::kBytes, tc::kThreads,
                        device, qkv, out, params);
  } else {
    launch_1d<scalar_t>(&tc::attention_tc_kernel<scalar_t, D, false>, tc::Smem<D, false>::kBytes, tc::kThreads,
                        device, qkv, out, params);
  }
}

// Whether the tensor-core kernel takes this call: fp16/bf16, head dim 32/64/128, sm_80+, and q, k, v
// readable in 16-byte chunks along a unit stride: T (stride_t == 1, chunks of tokens: `cmajor`) or
// the channels (stride_c == 1, chunks of dims), with the base and the other strides 16-byte aligned.
bool use_tensor_cores(const at::Tensor& qkv, const AttentionParams& p, int device, bool* cmajor) {
  if (qkv.scalar_type() != at::kHalf && qkv.scalar_type() != at::kBFloat16) return false;
  if (p.head_dim != 32 && p.head_dim != 64 && p.head_dim != 128) return false;
#if defined(SIMT_HARNESS)
  const int major = 9;
  (void)device;
#else
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
#endif
  if (major < 8) return false;
  if (reinterpret_cast<uintptr_t>(qkv.const_data_ptr()) % 16 != 0) return false;
  if (qkv.size(0) > 1 && p.stride_b % 8 != 0) return false;
  if (p.stride_t == 1 && p.stride_c % 8 == 0) {
    *cmajor = true;
    return true;
  }
  if (p.stride_c == 1 && p.stride_t % 8 == 0) {
    *cmajor = false;
    return true;
  }
  return false;
}

template <typename scalar_t>
void dispatch_head_dim(const at::Tensor& qkv, at::Tensor& out, const AttentionParams& params) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if constexpr (!std::is_same_v<scalar_t, float>) {
    bool cmajor = false;
    if (use_tensor_cores(qkv, params, device, &cmajor)) {
      switch (params.head_dim) {
        case 32: return launch_tc<scalar_t, 32>(cmajor, device, qkv, out, params);
        case 64: return launch_tc<scalar_t, 64>(cmajor, device, qkv, out, params);
        default: return launch_tc<scalar_t, 128>(cmajor, device, qkv, out, params);
      }
    }
  }
  switch (params.head_dim) {
    case 32: return launch<scalar_t, 32, 4, true>(device, qkv, out, params);
    case 64: return launch<scalar_t, 64, 4, true>(device, qkv, out, params);
    case 128: return launch<scalar_t, 128, 4, true>(device, qkv, out, params);
    default: break;
  }
  // Generic: the next tile size, zero-padded.
  if (params.head_dim <= 16) return launch<scalar_t, 16, 4, false>(device, qkv, out, params);
  if (params.head_dim <= 32) return launch<scalar_t, 32, 4, false>(device, qkv, out, params);
  if (params.head_dim <= 64) return launch<scalar_t, 64, 4, false>(device, qkv, out, params);
  if (params.head_dim <= 128) return launch<scalar_t, 128, 4, false>(device, qkv, out, params);
  return launch<scalar_t, kMaxHeadDim, 2, false>(device, qkv, out, params);
}

// The forward on CUDA tensors; fills `lse` ((B, heads, T) fp32 contiguous) when it is defined.
at::Tensor attention_forward(const at::Tensor& qkv, int64_t num_heads, bool legacy, const at::Tensor& lse) {
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
  params.lse = lse.defined() ? lse.mutable_data_ptr<float>() : nullptr;
  AT_DISPATCH_SWITCH(qkv.scalar_type(), "ddpm_fast_attention",
                     AT_DISPATCH_CASE(at::kFloat, [&] { dispatch_head_dim<scalar_t>(qkv, out, params); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { dispatch_head_dim<scalar_t>(qkv, out, params); })
                     AT_DISPATCH_CASE(at::kBFloat16,
                                      [&] { dispatch_head_dim<scalar_t>(qkv, out, params); }));
  return out;
}

at::Tensor attention_cuda(const at::Tensor& qkv, int64_t num_heads, bool legacy) {
  return attention_forward(qkv, num_heads, legacy, at::Tensor());
}

// The forward that also returns lse (B, heads, T) fp32, lse[b, h, t] = log sum_s exp(q_t . k_s /
// sqrt(ch)): what the backward (attention_backward.cu) recomputes P from.
std::tuple<at::Tensor, at::Tensor> attention_lse_cuda(const at::Tensor& qkv, int64_t num_heads, bool legacy) {
  return am::forward_with_lse(attention_forward, qkv, num_heads, legacy);
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("attention", &attention_cuda);
  m.impl("attention_lse", &attention_lse_cuda);
}
