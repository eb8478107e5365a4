// CUDA kernels of ddpm_fast::attention_backward: the flash-attention backward of ADM
// self-attention, reading q, k, v straight out of qkv (B, 3*C, T) through its strides (both
// layouts) and writing dq, dk, dv straight into grad_qkv (B, 3*C, T) contiguous.
//
// Math, per (sample, head) with q, k, v (ch, T), s = 1/sqrt(ch), the forward's logits
// Z[t, u] = s q_t . k_u, P = softmax_u(Z) = exp(Z - lse) (lse: the per-query logsumexp the
// forward saved, ddpm_fast::attention_lse) and output O = v P^T, given dO (ch, T):
//   dV = dO P,   dP = dO^T v,   dZ = P * (dP - delta),   delta[t] = sum_c dO[c, t] O[c, t],
//   dq = s k dZ^T,   dk = s q dZ
// (the row softmax's Jacobian gives dZ[t, u] = P[t, u] (dP[t, u] - sum_u' P[t, u'] dP[t, u']),
// and sum_u' P[t, u'] dP[t, u'] = dO_t . O_t). P is recomputed per tile in the log2 domain,
// P = exp2(q.k * log2(e)/sqrt(ch) - lse * log2(e)); nothing (T x T) is stored.
//
// Three kernels, FlashAttention-2's split (deterministic: no atomics), fp32 arithmetic and
// accumulation for every storage dtype, on CUDA cores (scalar fp32 FMAs; no tensor-core path):
//   delta_kernel: one thread per (sample, head, query): delta, (B, heads, T) fp32;
//   dkdv_kernel:  one block per (sample, head, 16*R keys); walks the query tiles (32 queries):
//                 per tile S^T and dP^T (keys x queries) from shared K, V, Q, dO tiles, P^T and
//                 dZ^T to shared memory, then dV += P^T dO and dK += dZ^T Q in registers;
//   dq_kernel:    one block per (sample, head, 16*R queries); walks the key tiles (32 keys):
//                 S and dP, dZ to shared memory, then dQ += dZ K in registers.
// 256 threads as a 16 x 16 grid: thread row r owns R rows of the block (keys, resp. queries),
// thread column c the tile's columns c, c+16 and the head dims c, c+16, ... . Shared tiles are
// [dim][token] with rows padded by one float, so that both the column reads of the products
// (lanes along tokens) and the dim reads of the accumulations (lanes along dims, stride 33 or
// 16R+1 floats) hit distinct banks. Results are staged through shared memory and stored along T
// (coalesced). Head dims up to 256 run the tile of the next power of 2 in {16, ..., 256}, q, k, v
// zero-padded; R = 4 rows per thread (64 per block), 2 for the 256 tile (registers: dK and dV
// accumulators R x D/16 each). Shared memory: up to 118 KB (dK/dV, head dim 128) and 144 KB
// (head dim 256): sm_80 / sm_90 class GPUs; the launcher checks the opt-in limit.
//
// (ATen/cuda/CUDAContext.h is avoided, as in attention.cu: the stream comes from
// c10/cuda/CUDAStream.h.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "attention_math.h"

namespace {

namespace am = ddpm_fast::attention;

constexpr int kThreads = 256;
constexpr int kCols = 16;  // lanes of one thread row (half a warp); also the thread rows
constexpr int kTileCols = 2;  // tile columns per thread: 32 queries (dK/dV) or keys (dQ) per tile
constexpr int kTile = kCols * kTileCols;
constexpr int kTileLd = kTile + 1;  // [dim][token] tiles of the walked tokens; [row][token] P, dZ
constexpr int kMaxHeadDim = 256;
constexpr float kLog2e = 1.4426950408889634f;

struct BackwardParams {
  int64_t length;    // T
  int64_t head_dim;  // ch (<= the tile's D)
  int64_t heads;
  int64_t channels;  // C
  int64_t stride_b;  // qkv strides, in elements
  int64_t stride_c;
  int64_t stride_t;
  am::QkvChannels chan;
  int64_t row_blocks;  // ceil(T / rows per block)
  float scale_log2;    // log2(e) / sqrt(ch)
  float scale;         // 1 / sqrt(ch)
};

// Tile geometry of a (padded) head dim D with R rows per thread.
template <int D, int R>
struct Shape {
  static_assert(D % kCols == 0, "head dim tile must be a multiple of 16");
  static constexpr int kD = D;
  static constexpr int kR = R;
  static constexpr int kRows = kCols * R;     // rows (keys or queries) per block
  static constexpr int kRowLd = kRows + 1;    // [dim][row] tiles of the block's own rows
};

template <int D, int R>
constexpr size_t dkdv_smem_bytes() {
  using S = Shape<D, R>;  // K, V [D][rows]; Q, dO [D][tile]; lse2, delta [tile]; P, dZ [rows][tile]
  return sizeof(float) * (2 * D * S::kRowLd + 2 * D * kTileLd + 2 * kTile + 2 * S::kRows * kTileLd);
}

template <int D, int R>
constexpr size_t dq_smem_bytes() {
  using S = Shape<D, R>;  // Q, dO [D][rows]; K, V [D][tile]; dZ [rows][tile]
  return sizeof(float) * (2 * D * S::kRowLd + 2 * D * kTileLd + S::kRows * kTileLd);
}

// dst[d * LD + n] = src[d * sc + n * st] as fp32 for d < D, n < N, src pointing at token t0: zero
// beyond T and beyond the head dim. Loads are consecutive along n (T), the contiguous dim of an
// NCHW qkv / of dO.
template <int D, int N, int LD, typename scalar_t>
__device__ __forceinline__ void stage(float* dst, const scalar_t* src, int64_t t0, const BackwardParams& p,
                                      int64_t sc, int64_t st) {
  for (int i = threadIdx.x; i < D * N; i += kThreads) {
    const int d = i / N;
    const int n = i % N;
    float x = 0.0f;
    if (d < p.head_dim && t0 + n < p.length) x = static_cast<float>(src[d * sc + n * st]);
    dst[d * LD + n] = x;
  }
}

// dst[d * T + t0 + n] = src[d * LD + n] (a head's slice of the contiguous gradient), coalesced
// along T; only d < head dim and t0 + n < T.
template <int D, int N, int LD, typename scalar_t>
__device__ __forceinline__ void unstage(scalar_t* dst, const float* src, int64_t t0, const BackwardParams& p) {
  for (int i = threadIdx.x; i < D * N; i += kThreads) {
    const int d = i / N;
    const int n = i % N;
    if (d < p.head_dim && t0 + n < p.length) dst[d * p.length + t0 + n] = static_cast<scalar_t>(src[d * LD + n]);
  }
}

// Pointers of one (sample, head): q, k, v in qkv; dq, dk, dv in the contiguous grad (B, 3C, T);
// dO in grad_out (B, C, T) contiguous; the (B, heads, T) row offset of lse and delta.
template <typename scalar_t>
struct Head {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  scalar_t* dq;
  scalar_t* dk;
  scalar_t* dv;
  const scalar_t* d_o;
  int64_t row;
};

template <typename scalar_t>
__device__ __forceinline__ Head<scalar_t> head_of(const scalar_t* qkv, const scalar_t* grad_out, scalar_t* grad,
                                                  int64_t batch, int64_t head, const BackwardParams& p) {
  const scalar_t* base = qkv + batch * p.stride_b;
  scalar_t* gbase = grad + batch * 3 * p.channels * p.length;
  const int64_t cq = p.chan.q + head * p.chan.head, ck = p.chan.k + head * p.chan.head,
                cv = p.chan.v + head * p.chan.head;
  return {base + cq * p.stride_c, base + ck * p.stride_c, base + cv * p.stride_c,
          gbase + cq * p.length, gbase + ck * p.length, gbase + cv * p.length,
          grad_out + (batch * p.channels + head * p.head_dim) * p.length, (batch * p.heads + head) * p.length};
}

// delta[b, h, t] = sum_d O[b, h*ch + d, t] dO[b, h*ch + d, t]; one thread per (b, h, t),
// i = (b * heads + h) * T + t < rows < 2^31 (checked by the launcher): 32-bit division.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
attention_bwd_delta_kernel(const scalar_t* __restrict__ out, const scalar_t* __restrict__ grad_out,
                           float* __restrict__ delta, uint32_t rows, const BackwardParams p) {
  const uint32_t i = blockIdx.x * static_cast<uint32_t>(kThreads) + threadIdx.x;
  if (i >= rows) return;
  const uint32_t length = static_cast<uint32_t>(p.length);
  const uint32_t bh = i / length, t = i % length;
  const int64_t base = static_cast<int64_t>(bh) * p.head_dim * p.length + t;  // (b*C + h*ch)*T + t
  float acc = 0.0f;
  for (int64_t d = 0; d < p.head_dim; ++d) {
    acc = fmaf(static_cast<float>(out[base + d * p.length]), static_cast<float>(grad_out[base + d * p.length]), acc);
  }
  delta[i] = acc;
}

// The two products of a tile over the head dims for this thread's R rows and kTileCols columns:
//   s[r][j] = sum_d row_a[d][trow*R + r] col_a[d][tcol + 16j],  dp[r][j] likewise from row_b, col_b
// (row_*: [D][ROW_LD] tiles of the block's own rows, col_*: [D][kTileLd] tiles of the walked tokens;
// the row reads are broadcast within a thread row, the column reads consecutive across its lanes).
template <int D, int R, int ROW_LD>
__device__ __forceinline__ void tile_products(float (&s)[R][kTileCols], float (&dp)[R][kTileCols], const float* row_a,
                                              const float* col_a, const float* row_b, const float* col_b, int trow,
                                              int tcol) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int j = 0; j < kTileCols; ++j) s[r][j] = dp[r][j] = 0.0f;
  }
#pragma unroll 4
  for (int d = 0; d < D; ++d) {
    float ra[R], rb[R], ca[kTileCols], cb[kTileCols];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      ra[r] = row_a[d * ROW_LD + trow * R + r];
      rb[r] = row_b[d * ROW_LD + trow * R + r];
    }
#pragma unroll
    for (int j = 0; j < kTileCols; ++j) {
      ca[j] = col_a[d * kTileLd + tcol + kCols * j];
      cb[j] = col_b[d * kTileLd + tcol + kCols * j];
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int j = 0; j < kTileCols; ++j) {
        s[r][j] = fmaf(ra[r], ca[j], s[r][j]);
        dp[r][j] = fmaf(rb[r], cb[j], dp[r][j]);
      }
    }
  }
}

// acc[r][c] += sum_m rows[trow*R + r][m] dims[tcol + 16c][m] over the tile's kTile tokens m
// (rows: [rows][kTileLd], read broadcast; dims: [D][kTileLd], lanes kTileLd = 33 floats apart:
// distinct banks).
template <int D, int R>
__device__ __forceinline__ void accumulate(float (&acc)[R][D / kCols], const float* rows, const float* dims, int trow,
                                           int tcol) {
#pragma unroll 4
  for (int m = 0; m < kTile; ++m) {
    float rv[R], dv[D / kCols];
#pragma unroll
    for (int r = 0; r < R; ++r) rv[r] = rows[(trow * R + r) * kTileLd + m];
#pragma unroll
    for (int c = 0; c < D / kCols; ++c) dv[c] = dims[(tcol + kCols * c) * kTileLd + m];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int c = 0; c < D / kCols; ++c) acc[r][c] = fmaf(rv[r], dv[c], acc[r][c]);
    }
  }
}

template <int D, int R>
__device__ __forceinline__ void zero(float (&acc)[R][D / kCols]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int c = 0; c < D / kCols; ++c) acc[r][c] = 0.0f;
  }
}

// dst[dim][row] = scale * acc[row][dim] for this thread's rows and dims (dst: [D][ROW_LD]), to be
// stored along T by unstage after a barrier.
template <int D, int R, int ROW_LD>
__device__ __forceinline__ void transpose_rows(float* dst, const float (&acc)[R][D / kCols], float scale, int trow,
                                               int tcol) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int c = 0; c < D / kCols; ++c) dst[(tcol + kCols * c) * ROW_LD + trow * R + r] = acc[r][c] * scale;
  }
}

// dK, dV of 16*R keys of one (sample, head).
// (min 1 block per SM: the sm_90 build of the D = 16 tile otherwise held 64 registers and spilled 8 bytes)
template <typename scalar_t, int D, int R>
__global__ void __launch_bounds__(kThreads, 1)
attention_bwd_dkdv_kernel(const scalar_t* __restrict__ qkv, const scalar_t* __restrict__ grad_out,
                          const float* __restrict__ lse, const float* __restrict__ delta,
                          scalar_t* __restrict__ grad, const BackwardParams p) {
  using S = Shape<D, R>;
  extern __shared__ float smem[];
  float* k_s = smem;                        // [D][kRowLd]
  float* v_s = k_s + D * S::kRowLd;         // [D][kRowLd]
  float* q_s = v_s + D * S::kRowLd;         // [D][kTileLd]
  float* do_s = q_s + D * kTileLd;          // [D][kTileLd]
  float* lse_s = do_s + D * kTileLd;        // [kTile], log2 domain
  float* delta_s = lse_s + kTile;           // [kTile]
  float* p_s = delta_s + kTile;             // [kRows][kTileLd]
  float* dz_s = p_s + S::kRows * kTileLd;   // [kRows][kTileLd]

  const int tid = threadIdx.x;
  const int trow = tid / kCols, tcol = tid % kCols;
  const am::BlockCoords bc = am::split_block(blockIdx.x, static_cast<uint32_t>(p.row_blocks),
                                             static_cast<uint32_t>(p.heads));
  const int64_t n0 = bc.tile * int64_t{S::kRows};
  const Head<scalar_t> hd = head_of(qkv, grad_out, grad, bc.batch, bc.head, p);

  stage<D, S::kRows, S::kRowLd>(k_s, hd.k + n0 * p.stride_t, n0, p, p.stride_c, p.stride_t);
  stage<D, S::kRows, S::kRowLd>(v_s, hd.v + n0 * p.stride_t, n0, p, p.stride_c, p.stride_t);
  float dk[R][D / kCols], dv[R][D / kCols];
  zero<D, R>(dk);
  zero<D, R>(dv);

  for (int64_t m0 = 0; m0 < p.length; m0 += kTile) {
    __syncthreads();  // the previous tile's Q, dO, P, dZ are consumed (and K, V are staged)
    stage<D, kTile, kTileLd>(q_s, hd.q + m0 * p.stride_t, m0, p, p.stride_c, p.stride_t);
    stage<D, kTile, kTileLd>(do_s, hd.d_o + m0, m0, p, p.length, 1);
    if (tid < kTile) {  // queries past T: lse = +inf makes their P (and dZ) 0
      const bool ok = m0 + tid < p.length;
      lse_s[tid] = ok ? lse[hd.row + m0 + tid] * kLog2e : INFINITY;
      delta_s[tid] = ok ? delta[hd.row + m0 + tid] : 0.0f;
    }
    __syncthreads();

    // S^T[key][query] = k . q and dP^T[key][query] = v . dO; P^T and dZ^T to shared memory
    float s[R][kTileCols], dp[R][kTileCols];
    tile_products<D, R, S::kRowLd>(s, dp, k_s, q_s, v_s, do_s, trow, tcol);
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int j = 0; j < kTileCols; ++j) {
        const int col = tcol + kCols * j;
        const float pr = exp2f(s[r][j] * p.scale_log2 - lse_s[col]);
        p_s[(trow * R + r) * kTileLd + col] = pr;
        dz_s[(trow * R + r) * kTileLd + col] = pr * (dp[r][j] - delta_s[col]);
      }
    }
    __syncthreads();
    accumulate<D, R>(dv, p_s, do_s, trow, tcol);  // dV[key][dim] += sum_m P^T[key][m] dO[dim][m]
    accumulate<D, R>(dk, dz_s, q_s, trow, tcol);  // dK[key][dim] += sum_m dZ^T[key][m] Q[dim][m]
  }

  // dK (times s) and dV staged as [dim][key] in the K and V buffers, then stored along T.
  __syncthreads();
  transpose_rows<D, R, S::kRowLd>(k_s, dk, p.scale, trow, tcol);
  transpose_rows<D, R, S::kRowLd>(v_s, dv, 1.0f, trow, tcol);
  __syncthreads();
  unstage<D, S::kRows, S::kRowLd>(hd.dk, k_s, n0, p);
  unstage<D, S::kRows, S::kRowLd>(hd.dv, v_s, n0, p);
}

// dQ of 16*R queries of one (sample, head).
// (min 1 block per SM, as the dK/dV kernel: without it ptxas held the D = 64 and 128 tiles to 64-80
// registers on sm_80 and spilled 8-12 bytes)
template <typename scalar_t, int D, int R>
__global__ void __launch_bounds__(kThreads, 1)
attention_bwd_dq_kernel(const scalar_t* __restrict__ qkv, const scalar_t* __restrict__ grad_out,
                        const float* __restrict__ lse, const float* __restrict__ delta,
                        scalar_t* __restrict__ grad, const BackwardParams p) {
  using S = Shape<D, R>;
  extern __shared__ float smem[];
  float* q_s = smem;                     // [D][kRowLd]
  float* do_s = q_s + D * S::kRowLd;     // [D][kRowLd]
  float* k_s = do_s + D * S::kRowLd;     // [D][kTileLd]
  float* v_s = k_s + D * kTileLd;        // [D][kTileLd]
  float* dz_s = v_s + D * kTileLd;       // [kRows][kTileLd]

  const int tid = threadIdx.x;
  const int trow = tid / kCols, tcol = tid % kCols;
  const am::BlockCoords bc = am::split_block(blockIdx.x, static_cast<uint32_t>(p.row_blocks),
                                             static_cast<uint32_t>(p.heads));
  const int64_t m0 = bc.tile * int64_t{S::kRows};
  const Head<scalar_t> hd = head_of(qkv, grad_out, grad, bc.batch, bc.head, p);

  stage<D, S::kRows, S::kRowLd>(q_s, hd.q + m0 * p.stride_t, m0, p, p.stride_c, p.stride_t);
  stage<D, S::kRows, S::kRowLd>(do_s, hd.d_o + m0, m0, p, p.length, 1);
  float lse2[R], dlt[R];  // this thread's queries; past T: lse = +inf (P = 0), never stored
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t t = m0 + trow * R + r;
    lse2[r] = t < p.length ? lse[hd.row + t] * kLog2e : INFINITY;
    dlt[r] = t < p.length ? delta[hd.row + t] : 0.0f;
  }
  float dq[R][D / kCols];
  zero<D, R>(dq);

  for (int64_t n0 = 0; n0 < p.length; n0 += kTile) {
    __syncthreads();  // the previous tile's K, dZ are consumed (and Q, dO are staged)
    stage<D, kTile, kTileLd>(k_s, hd.k + n0 * p.stride_t, n0, p, p.stride_c, p.stride_t);
    stage<D, kTile, kTileLd>(v_s, hd.v + n0 * p.stride_t, n0, p, p.stride_c, p.stride_t);
    __syncthreads();

    // S[query][key] = q . k and dP[query][key] = dO . v; dZ to shared memory
    float s[R][kTileCols], dp[R][kTileCols];
    tile_products<D, R, S::kRowLd>(s, dp, q_s, k_s, do_s, v_s, trow, tcol);
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int j = 0; j < kTileCols; ++j) {
        // keys past T (staged as zeros) get P > 0 but add dZ * k = 0 to dQ: no mask needed
        const float pr = exp2f(s[r][j] * p.scale_log2 - lse2[r]);
        dz_s[(trow * R + r) * kTileLd + tcol + kCols * j] = pr * (dp[r][j] - dlt[r]);
      }
    }
    __syncthreads();
    accumulate<D, R>(dq, dz_s, k_s, trow, tcol);  // dQ[query][dim] += sum_n dZ[query][n] K[dim][n]
  }

  // dQ (times s) staged as [dim][query] in the Q buffer, then stored along T.
  __syncthreads();
  transpose_rows<D, R, S::kRowLd>(q_s, dq, p.scale, trow, tcol);
  __syncthreads();
  unstage<D, S::kRows, S::kRowLd>(hd.dq, q_s, m0, p);
}

// `blocks` blocks of kThreads threads on the 1-D grid, `smem` bytes of dynamic shared memory
// (opted in past 48 KiB), the current stream.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t blocks, size_t smem, int64_t head_dim, Args... args) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  DDPM_CHECK(smem <= static_cast<size_t>(smem_optin), "attention_backward: head dim ", head_dim, " needs ", smem,
             " bytes of shared memory per block; the GPU allows ", smem_optin);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  int max_grid_x = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_grid_x, cudaDevAttrMaxGridDimX, device));
  DDPM_CHECK(blocks <= max_grid_x, "attention_backward: ", blocks, " blocks exceed the grid limit ", max_grid_x);
  kernel<<<dim3(static_cast<unsigned>(blocks)), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int D, int R>
void launch_tiles(const scalar_t* qkv, const scalar_t* grad_out, const float* lse, const float* delta,
                  scalar_t* grad, BackwardParams p, int64_t batch) {
  using S = Shape<D, R>;
  p.row_blocks = (p.length + S::kRows - 1) / S::kRows;
  const int64_t blocks = batch * p.heads * p.row_blocks;
  launch(&attention_bwd_dkdv_kernel<scalar_t, D, R>, blocks, dkdv_smem_bytes<D, R>(), p.head_dim, qkv, grad_out,
         lse, delta, grad, p);
  launch(&attention_bwd_dq_kernel<scalar_t, D, R>, blocks, dq_smem_bytes<D, R>(), p.head_dim, qkv, grad_out, lse,
         delta, grad, p);
}

template <typename scalar_t>
void dispatch(const at::Tensor& qkv, const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
              at::Tensor& delta, at::Tensor& grad, const BackwardParams& p) {
  const int64_t batch = qkv.size(0);
  const int64_t rows = batch * p.heads * p.length;
  DDPM_CHECK(rows < (int64_t{1} << 31), "attention_backward: B * heads * T = ", rows, " must be below 2^31");
  launch(&attention_bwd_delta_kernel<scalar_t>, (rows + kThreads - 1) / kThreads, 0, p.head_dim,
         out.const_data_ptr<scalar_t>(), grad_out.const_data_ptr<scalar_t>(), delta.mutable_data_ptr<float>(),
         static_cast<uint32_t>(rows), p);
  const scalar_t* q = qkv.const_data_ptr<scalar_t>();
  const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
  const float* l = lse.const_data_ptr<float>();
  const float* dl = delta.const_data_ptr<float>();
  scalar_t* g = grad.mutable_data_ptr<scalar_t>();
  if (p.head_dim <= 16) return launch_tiles<scalar_t, 16, 4>(q, go, l, dl, g, p, batch);
  if (p.head_dim <= 32) return launch_tiles<scalar_t, 32, 4>(q, go, l, dl, g, p, batch);
  if (p.head_dim <= 64) return launch_tiles<scalar_t, 64, 4>(q, go, l, dl, g, p, batch);
  if (p.head_dim <= 128) return launch_tiles<scalar_t, 128, 4>(q, go, l, dl, g, p, batch);
  return launch_tiles<scalar_t, kMaxHeadDim, 2>(q, go, l, dl, g, p, batch);
}

at::Tensor attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                   const at::Tensor& lse, int64_t num_heads, bool legacy) {
  const int64_t ch = am::check_qkv(qkv.sizes(), qkv.scalar_type(), num_heads);
  const int64_t batch = qkv.size(0), channels = qkv.size(1) / 3, length = qkv.size(2);
  am::check_backward_args(grad_out.sizes(), out.sizes(), lse.sizes(), lse.scalar_type(), batch, channels, num_heads,
                          length);
  for (const at::Tensor& t : {grad_out, qkv, out, lse}) {
    DDPM_CHECK(t.is_cuda() && t.device() == qkv.device(),
               "attention_backward: every tensor must be on qkv's CUDA device, got ", t.device());
  }
  DDPM_CHECK(grad_out.scalar_type() == qkv.scalar_type() && out.scalar_type() == qkv.scalar_type(),
             "attention_backward: grad_out and out must have qkv's dtype ", qkv.scalar_type());
  DDPM_CHECK(ch <= kMaxHeadDim, "attention_backward: head dim C/num_heads=", ch,
             " is larger than the CUDA kernel's maximum ", kMaxHeadDim);
  const c10::cuda::CUDAGuard guard(qkv.device());
  // The kernels are instantiated for float32 storage only (three dtypes x five head-dim tiles x two
  // archs of device code made the CI build too long for a pass that is not on the sampling path):
  // fp16 / bf16 tensors run on exact float32 copies (the kernels compute in float32 from the
  // loaded values either way) and the gradient rounds to qkv's dtype once, at the end.
  const at::Tensor qkv32 = qkv.to(at::kFloat);
  at::Tensor grad = at::empty(qkv.sizes(), qkv32.options());  // contiguous (B, 3C, T)
  if (grad.numel() == 0) {
    return grad.to(qkv.scalar_type());
  }
  const at::Tensor go = grad_out.to(at::kFloat).contiguous();
  const at::Tensor o = out.to(at::kFloat).contiguous();
  const at::Tensor l = lse.contiguous();
  at::Tensor delta = at::empty({batch, num_heads, length}, qkv.options().dtype(at::kFloat));
  BackwardParams p;
  p.length = length;
  p.head_dim = ch;
  p.heads = num_heads;
  p.channels = channels;
  p.stride_b = qkv32.stride(0);
  p.stride_c = qkv32.stride(1);
  p.stride_t = qkv32.stride(2);
  p.chan = am::qkv_channels(channels, ch, legacy);
  p.row_blocks = 0;
  p.scale_log2 = am::softmax_scale_log2(ch);
  p.scale = 1.0f / sqrtf(static_cast<float>(ch));
  dispatch<float>(qkv32, go, o, l, delta, grad, p);
  return grad.to(qkv.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("attention_backward", &attention_backward_cuda);
}
