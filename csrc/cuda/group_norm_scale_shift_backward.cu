// CUDA kernel of ddpm_fast::group_norm_scale_shift_backward: the gradients of ADM's AdaGN
//   y = SiLU?( ((x - mean) * rstd * weight + bias) * (1 + scale) + shift )
// with respect to x, weight, bias, scale and shift, from grad_y and the forward's saved group
// statistics mean, rstd (N, G) fp32. The formulas are derived in csrc/include/group_norm_math.h
// ("backward"); per element they are gn::dz_element and gn::dx_element, per channel
// gn::channel_grads and gn::dx_affine, shared with the CPU kernel.
//
// Four launches on the current stream:
//   1. sums: per (n, c) and pixel split, A = sum dz and B' = sum dz * (x - mean) (float2 partials;
//      z = a * x + b, the forward's fused map, recomputed from mean/rstd and the parameters):
//        NCHW: block (n * C + c, split) reduces a chunk of the contiguous plane, a thread kVec
//              consecutive values (16 bytes of x and of dy) per load;
//        channels-last: block (n * channel tiles + tile, pixel split), threads (tx, ty): thread
//              (tx, ty) owns kVec channels (one 16-byte load per pixel row) and the rows
//              begin + ty, begin + ty + ty_dim, ...; the block adds its ty_dim rows per channel in
//              shared memory, in row order.
//   2. coefficients: one block per (n, group) adds the partials of its channels up (split order),
//      writes dscale, dshift and the terms m * A, m * B of the per-channel reductions, sums the
//      group's dxhat terms (fixed-order block reduction) and writes the coefficients of
//      dx = alpha * dz + beta * (x - mean) + gamma: per (n, c) {a, b, alpha}, per (n, g)
//      {mean, beta, gamma}.
//   3. parameters: one thread per channel: dweight = sum_n m * B, dbias = sum_n m * A, in order.
//   4. dx: elementwise like the forward's apply (skipped when dx is not wanted).
// Everything is deterministic (no atomics). weight/bias/scale/shift are read where they lie (any
// strides, fp32/fp16/bf16); the gradients are accumulated in fp32 and cast on the host.
// With kVec = 1 (x, dy or dx not 16-byte aligned, or HW (NCHW) / C (channels-last) not a multiple
// of 16 / sizeof(T)) the same kernels load one element at a time. Offsets inside a sample are
// 32-bit (a sample of more than 2^31 - 1 elements is refused), channel and group indices too: an
// int64 division is a subroutine call whose register saves would give the kernels a stack frame.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <tuple>

#include "group_norm_device.h"
#include "group_norm_host.h"
#include "group_norm_math.h"

namespace ddpm_fast {
namespace {

using gn::ceil_div;
using gn::imin;
using gn::load_pack;
using gn::Pack;
using gn::param_at;

constexpr int kThreads = 256;        // sums (NCHW) and dx blocks
constexpr int kCoefThreads = 128;    // coefficient blocks
constexpr int kParamThreads = 128;   // parameter-gradient blocks
constexpr int kMaxTileVectors = 32;  // channels-last sums: at most 32 channel vectors per block row
constexpr int kBlocksPerSm = 8;      // sums blocks to aim for per SM

// What every kernel reads: the statistics, the parameters where they lie, the shape. Channel and
// group indices are 32-bit (an int64 division is a subroutine call; C, N * G < 2^31 are checked).
struct Args {
  const float* mean;  // (N, G)
  const float* rstd;  // (N, G)
  gn::Param weight, bias, scale, shift;
  int channels, groups, cg;  // cg = channels / groups
  int64_t pixels;
  bool silu;
};

// z = a * x + b of channel c of sample n, and the channel's group mean.
struct ZMap {
  float a, b, mean;
};

__device__ __forceinline__ ZMap z_map(const Args& g, int n, int c) {
  const int ng = n * g.groups + c / g.cg;
  const float mean = g.mean[ng], rstd = g.rstd[ng];
  const gn::ChannelAffine<float> f = gn::channel_affine<float>(
      mean, rstd, param_at(g.weight, 0, c, 1.f), param_at(g.bias, 0, c, 0.f),
      param_at(g.scale, n, c, 0.f), param_at(g.shift, n, c, 0.f));
  return ZMap{f.a, f.b, mean};
}

// Adds dz and dz * (x - mean) of kVec elements of one channel to (sa, sb).
template <typename T, int kVec>
__device__ __forceinline__ void accumulate(const Pack<T, kVec>& x, const Pack<T, kVec>& dy, const ZMap& z,
                                           bool silu, float& sa, float& sb) {
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float xv = static_cast<float>(x.v[j]);
    const float dz = gn::dz_element(xv, static_cast<float>(dy.v[j]), z.a, z.b, silu);
    sa += dz;
    sb = fmaf(dz, xv - z.mean, sb);
  }
}

// Sum over a 1-D block of kBlock threads of two values; the result is valid in thread 0.
template <int kBlock>
__device__ float2 block_sum2(float2 v) {
  static_assert(kBlock % 32 == 0 && kBlock <= 1024, "block must be whole warps");
  __shared__ float2 per_warp[kBlock / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v.x = gn::warp_sum(v.x);
  v.y = gn::warp_sum(v.y);
  if (lane == 0) per_warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kBlock / 32 ? per_warp[lane] : make_float2(0.f, 0.f);
    v.x = gn::warp_sum(v.x);
    v.y = gn::warp_sum(v.y);
  }
  return v;
}

// ---- 1. sums -----------------------------------------------------------------------------------

// grid (N * C, splits): block (nc, s) reduces pixels [s * chunk, min(pixels, (s + 1) * chunk)) of
// plane nc; with kVec > 1, pixels and chunk are multiples of kVec and x, dy are 16-byte aligned.
// Offsets inside a sample are 32-bit (a sample has < 2^31 elements, checked on the host).
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
sums_nchw_kernel(const T* __restrict__ x, const T* __restrict__ dy, Args args, int chunk,
                 float2* __restrict__ partial) {
  const int nc = blockIdx.x;
  const int pixels = static_cast<int>(args.pixels);
  const int begin = static_cast<int>(blockIdx.y) * chunk;
  const int end = imin<int>(pixels, begin + chunk);
  const ZMap z = z_map(args, nc / args.channels, nc % args.channels);
  const T* xp = x + static_cast<int64_t>(nc) * pixels;
  const T* gp = dy + static_cast<int64_t>(nc) * pixels;
  float sa = 0.f, sb = 0.f;
  for (int i = begin + static_cast<int>(threadIdx.x) * kVec; i < end; i += kThreads * kVec)
    accumulate<T, kVec>(load_pack<T, kVec>(xp + i), load_pack<T, kVec>(gp + i), z, args.silu, sa, sb);
  const float2 s = block_sum2<kThreads>(make_float2(sa, sb));
  if (threadIdx.x == 0) partial[static_cast<int64_t>(nc) * gridDim.y + blockIdx.y] = s;
}

// grid (N * tiles, splits), block (tx_dim, ty_dim) with tx_dim * ty_dim = kThreads and
// tx_dim <= 32: a tile is tx_dim * kVec channels, blockIdx.x = n * tiles + tile. With kVec > 1,
// C is a multiple of kVec and x, dy are 16-byte aligned. 32-bit offsets inside a sample.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
sums_channels_last_kernel(const T* __restrict__ x, const T* __restrict__ dy, Args args, int chunk_px,
                          float2* __restrict__ partial) {
  __shared__ float2 rows[kThreads * kVec];  // (A, B') of thread t's channel j at t * kVec + j
  const int pixels = static_cast<int>(args.pixels), channels = args.channels;
  const int tx_dim = blockDim.x, ty_dim = blockDim.y;
  const int tile_channels = tx_dim * kVec;
  const auto [n, c_tile, c0, p_begin, p_end] = gn::channel_tile<kVec>(pixels, channels, chunk_px);
  float sa[kVec], sb[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) sa[j] = sb[j] = 0.f;
  if (c0 < channels) {
    ZMap z[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) z[j] = z_map(args, n, c0 + j);
    const int64_t sample = static_cast<int64_t>(n) * pixels * channels;
    const T* xs = x + sample + c0;
    const T* gs = dy + sample + c0;
    for (int p = p_begin + static_cast<int>(threadIdx.y); p < p_end; p += ty_dim) {
      const Pack<T, kVec> xv = load_pack<T, kVec>(xs + p * channels);
      const Pack<T, kVec> gv = load_pack<T, kVec>(gs + p * channels);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float xf = static_cast<float>(xv.v[j]);
        const float dz = gn::dz_element(xf, static_cast<float>(gv.v[j]), z[j].a, z[j].b, args.silu);
        sa[j] += dz;
        sb[j] = fmaf(dz, xf - z[j].mean, sb[j]);
      }
    }
  }
  const int t = threadIdx.y * tx_dim + threadIdx.x;
#pragma unroll
  for (int j = 0; j < kVec; ++j) rows[t * kVec + j] = make_float2(sa[j], sb[j]);
  __syncthreads();
  // thread s < tile_channels adds channel c_tile + s over the ty_dim rows, in row order
  const int s = t, c = c_tile + s;
  if (s < tile_channels && c < channels) {
    const int owner = s / kVec, j = s % kVec;
    float2 r = make_float2(0.f, 0.f);
    for (int row = 0; row < ty_dim; ++row) {
      const float2 v = rows[(row * tx_dim + owner) * kVec + j];
      r.x += v.x;
      r.y += v.y;
    }
    partial[(static_cast<int64_t>(n) * channels + c) * gridDim.y + blockIdx.y] = r;
  }
}

// ---- 2. coefficients ---------------------------------------------------------------------------

// dx = alpha * dz + beta * (x - mean) + gamma, z = a * x + b.
struct alignas(16) ChannelCoef {
  float a, b, alpha, unused;
};
struct alignas(16) GroupCoef {
  float mean, beta, gamma, unused;
};

struct CoefOut {
  const float2* partial;  // (N * C, splits)
  int64_t splits;
  float* dscale;          // (N, C) or nullptr
  float* dshift;          // (N, C) or nullptr
  float* m_a;             // (N, C): (1 + scale) * A
  float* m_b;             // (N, C): (1 + scale) * B
  ChannelCoef* channel;   // (N, C)
  GroupCoef* group;       // (N, G)
};

// (A, B) of channel nc from its partials (B = rstd * B').
__device__ __forceinline__ float2 channel_sums(const CoefOut& o, int64_t nc, float rstd) {
  float2 s = make_float2(0.f, 0.f);
  for (int64_t k = 0; k < o.splits; ++k) {
    const float2 v = o.partial[nc * o.splits + k];
    s.x += v.x;
    s.y += v.y;
  }
  s.y *= rstd;
  return s;
}

__global__ void __launch_bounds__(kCoefThreads) coefficients_kernel(Args args, CoefOut o) {
  __shared__ float2 s_sums;
  const int ng = blockIdx.x;
  const int n = ng / args.groups, g = ng % args.groups, cg = args.cg;
  const float mean = args.mean[ng], rstd = args.rstd[ng];
  float2 local = make_float2(0.f, 0.f);  // sum_c m w A, sum_c m w B
  for (int j = threadIdx.x; j < cg; j += kCoefThreads) {
    const int c = g * cg + j;
    const int64_t nc = static_cast<int64_t>(n) * args.channels + c;
    const float2 ab = channel_sums(o, nc, rstd);
    const gn::ChannelGrads<float> r = gn::channel_grads<float>(
        ab.x, ab.y, param_at(args.weight, 0, c, 1.f), param_at(args.bias, 0, c, 0.f),
        param_at(args.scale, n, c, 0.f));
    if (o.dscale) o.dscale[nc] = r.dscale;
    if (o.dshift) o.dshift[nc] = r.dshift;
    o.m_a[nc] = r.dbias;
    o.m_b[nc] = r.dweight;
    local.x += r.dxhat;
    local.y += r.dxhat_x;
  }
  const float2 total = block_sum2<kCoefThreads>(local);
  if (threadIdx.x == 0) s_sums = total;
  __syncthreads();
  const float count = static_cast<float>(cg * args.pixels);
  for (int j = threadIdx.x; j < cg; j += kCoefThreads) {
    const int c = g * cg + j;
    const int64_t nc = static_cast<int64_t>(n) * args.channels + c;
    const gn::DxAffine<float> d = gn::dx_affine<float>(rstd, param_at(args.weight, 0, c, 1.f),
                                                       param_at(args.scale, n, c, 0.f), s_sums.x,
                                                       s_sums.y, count);
    const ZMap z = z_map(args, n, c);
    o.channel[nc] = ChannelCoef{z.a, z.b, d.alpha, 0.f};
    if (j == 0) o.group[ng] = GroupCoef{mean, d.beta, d.gamma, 0.f};
  }
}

// ---- 3. parameter gradients --------------------------------------------------------------------

__global__ void __launch_bounds__(kParamThreads)
param_grads_kernel(const float* __restrict__ m_a, const float* __restrict__ m_b, int64_t n_samples,
                   int64_t channels, float* __restrict__ dweight, float* __restrict__ dbias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kParamThreads + threadIdx.x;
  if (c >= channels) return;
  float dw = 0.f, db = 0.f;
  for (int64_t n = 0; n < n_samples; ++n) {
    dw += m_b[n * channels + c];
    db += m_a[n * channels + c];
  }
  if (dweight) dweight[c] = dw;
  if (dbias) dbias[c] = db;
}

// ---- 4. dx -------------------------------------------------------------------------------------

// dx of the kVec elements at offset i of sample n: they share one (n, c) plane (NCHW, pixels %
// kVec == 0) or one pixel row (channels-last, channels % kVec == 0). 32-bit offsets in a sample.
template <typename T, int kVec, bool kChannelsLast>
__device__ __forceinline__ Pack<T, kVec> dx_pack(const Pack<T, kVec>& x, const Pack<T, kVec>& dy, int n, int i,
                                                 int pixels, int channels, int cg,
                                                 const ChannelCoef* __restrict__ cc,
                                                 const GroupCoef* __restrict__ gc, bool silu) {
  Pack<T, kVec> out;
  const int64_t first_channel = static_cast<int64_t>(n) * channels;
  if constexpr (kChannelsLast) {
    const int c0 = i % channels;
    // the group of channel c0 + j without a division per element: kVec consecutive channels
    int64_t group = static_cast<int64_t>(n) * (channels / cg) + c0 / cg;
    int in_group = c0 % cg;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (j > 0 && ++in_group == cg) {
        in_group = 0;
        ++group;
      }
      const ChannelCoef k = cc[first_channel + c0 + j];
      const GroupCoef q = gc[group];
      const float xv = static_cast<float>(x.v[j]);
      const float dz = gn::dz_element(xv, static_cast<float>(dy.v[j]), k.a, k.b, silu);
      out.v[j] = static_cast<T>(gn::dx_element(xv, dz, q.mean, k.alpha, q.beta, q.gamma));
    }
  } else {
    const int c = i / pixels;
    const ChannelCoef k = cc[first_channel + c];
    const GroupCoef q = gc[static_cast<int64_t>(n) * (channels / cg) + c / cg];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float xv = static_cast<float>(x.v[j]);
      const float dz = gn::dz_element(xv, static_cast<float>(dy.v[j]), k.a, k.b, silu);
      out.v[j] = static_cast<T>(gn::dx_element(xv, dz, q.mean, k.alpha, q.beta, q.gamma));
    }
  }
  return out;
}

// grid (blocks per sample, sample slots): samples n = blockIdx.y, + gridDim.y, ...; in a sample a
// grid-stride loop over its vectors of kVec elements (sample_numel < 2^31, checked on the host).
template <typename T, int kVec, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
dx_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, int64_t n_samples,
          int pixels, int channels, int cg, const ChannelCoef* __restrict__ cc,
          const GroupCoef* __restrict__ gc, bool silu) {
  const int sample_vecs = pixels * channels / kVec;
  const int stride = static_cast<int>(gridDim.x) * kThreads;
  for (int64_t n = blockIdx.y; n < n_samples; n += gridDim.y) {
    const int64_t base = n * pixels * channels;
    for (int v = static_cast<int>(blockIdx.x) * kThreads + threadIdx.x; v < sample_vecs; v += stride) {
      const int i = v * kVec;
      *reinterpret_cast<Pack<T, kVec>*>(dx + base + i) = dx_pack<T, kVec, kChannelsLast>(
          load_pack<T, kVec>(x + base + i), load_pack<T, kVec>(dy + base + i), static_cast<int>(n), i, pixels,
          channels, cg, cc, gc, silu);
    }
  }
}

// ---- host --------------------------------------------------------------------------------------

// The gradients being computed: fp32 buffers (or nullptr) and dx (or nullptr).
struct Outputs {
  float *dweight, *dbias, *dscale, *dshift;
  void* dx;
};

template <typename T, int kVec>
void launch(const gn::Problem& p, const Args& args, const T* x, const T* dy, T* dx,
            const Outputs& out, const at::TensorOptions& float_opts) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t target_blocks = kBlocksPerSm * gn::sm_count();
  const int64_t cg = p.c / p.groups, ng = p.n * p.groups, nc = p.n * p.c;
  const int64_t max_x = gn::max_grid_dim(cudaDevAttrMaxGridDimX);
  const int64_t max_y = gn::max_grid_dim(cudaDevAttrMaxGridDimY);
  DDPM_CHECK(nc <= max_x, "group_norm_scale_shift_backward: N * C = ", nc,
             " blocks exceed the grid limit ", max_x);
  DDPM_CHECK(p.c * p.pixels < std::numeric_limits<int32_t>::max(),
             "group_norm_scale_shift_backward: one sample of x has ", p.c * p.pixels,
             " elements; the CUDA kernel takes at most 2^31 - 1");

  // 1. sums -> partial (N * C, splits) of float2
  int64_t splits;
  at::Tensor partial;
  if (!p.channels_last) {
    const int64_t max_splits = std::max<int64_t>(1, ceil_div(p.pixels, kThreads * kVec * 4));
    splits = std::clamp<int64_t>(ceil_div(target_blocks, nc), 1, std::min<int64_t>(max_splits, max_y));
    const int64_t chunk = ceil_div(ceil_div(p.pixels, splits), kVec) * kVec;
    splits = ceil_div(p.pixels, chunk);
    partial = at::empty({nc * splits * 2}, float_opts);
    sums_nchw_kernel<T, kVec>
        <<<dim3(static_cast<unsigned>(nc), static_cast<unsigned>(splits)), kThreads, 0, stream>>>(
            x, dy, args, static_cast<int>(chunk), reinterpret_cast<float2*>(partial.data_ptr<float>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    int64_t tx = 1;
    while (tx < kMaxTileVectors && tx * kVec < p.c) tx *= 2;
    const int64_t ty = kThreads / tx;
    const int64_t tiles = ceil_div(p.c, tx * kVec);
    DDPM_CHECK(tiles * p.n <= max_x, "group_norm_scale_shift_backward: N * channel tiles = ",
               tiles * p.n, " blocks exceed the grid limit ", max_x);
    const int64_t max_splits = std::max<int64_t>(1, ceil_div(p.pixels, ty * 8));
    splits = std::clamp<int64_t>(ceil_div(target_blocks, tiles * p.n), 1, std::min<int64_t>(max_splits, max_y));
    const int64_t chunk_px = ceil_div(p.pixels, splits);
    splits = ceil_div(p.pixels, chunk_px);
    partial = at::empty({nc * splits * 2}, float_opts);
    sums_channels_last_kernel<T, kVec>
        <<<dim3(static_cast<unsigned>(tiles * p.n), static_cast<unsigned>(splits)),
           dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty)), 0, stream>>>(
            x, dy, args, static_cast<int>(chunk_px), reinterpret_cast<float2*>(partial.data_ptr<float>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // 2. coefficients
  at::Tensor terms = at::empty({2 * nc}, float_opts);         // m * A, m * B
  at::Tensor coefs = at::empty({4 * (nc + ng)}, float_opts);  // ChannelCoef (N, C), GroupCoef (N, G)
  CoefOut o{reinterpret_cast<const float2*>(partial.data_ptr<float>()),
            splits,
            out.dscale,
            out.dshift,
            terms.data_ptr<float>(),
            terms.data_ptr<float>() + nc,
            reinterpret_cast<ChannelCoef*>(coefs.data_ptr<float>()),
            reinterpret_cast<GroupCoef*>(coefs.data_ptr<float>() + 4 * nc)};
  coefficients_kernel<<<static_cast<unsigned>(ng), kCoefThreads, 0, stream>>>(args, o);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 3. dweight, dbias
  if (out.dweight || out.dbias) {
    param_grads_kernel<<<static_cast<unsigned>(ceil_div(p.c, kParamThreads)), kParamThreads, 0, stream>>>(
        o.m_a, o.m_b, p.n, p.c, out.dweight, out.dbias);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // 4. dx: about 16 blocks per SM, spread over the samples
  if (!dx) return;
  const int64_t samples = std::min<int64_t>(p.n, max_y);
  const int64_t per_sample = std::clamp<int64_t>(ceil_div(p.c * p.pixels / kVec, kThreads), 1,
                                                 ceil_div(16 * gn::sm_count(), samples));
  const dim3 grid(static_cast<unsigned>(per_sample), static_cast<unsigned>(samples));
  const int pixels = static_cast<int>(p.pixels), channels = static_cast<int>(p.c);
  if (p.channels_last)
    dx_kernel<T, kVec, true><<<grid, kThreads, 0, stream>>>(x, dy, dx, p.n, pixels, channels, static_cast<int>(cg),
                                                            o.channel, o.group, p.silu);
  else
    dx_kernel<T, kVec, false><<<grid, kThreads, 0, stream>>>(x, dy, dx, p.n, pixels, channels, static_cast<int>(cg),
                                                             o.channel, o.group, p.silu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_typed(const gn::Problem& p, const Args& args, const at::Tensor& x, const at::Tensor& dy,
                  const Outputs& out) {
  constexpr int kVec = 16 / sizeof(T);
  const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());
  const T* gp = reinterpret_cast<const T*>(dy.const_data_ptr());
  T* dp = static_cast<T*>(out.dx);
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool vec = aligned(xp) && aligned(gp) && (!dp || aligned(dp)) &&
                   (p.channels_last ? p.c % kVec == 0 : p.pixels % kVec == 0);
  const auto opts = x.options().dtype(at::kFloat);
  if (vec)
    launch<T, kVec>(p, args, xp, gp, dp, out, opts);
  else
    launch<T, 1>(p, args, xp, gp, dp, out, opts);
}

gn::Grads group_norm_scale_shift_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const at::Tensor& mean, const at::Tensor& rstd, bool silu,
    std::array<bool, 5> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto [want, g] = gn::begin_backward(grad_y, x, num_groups, weight, bias, scale, shift, mean, rstd, output_mask);
  if (x.numel() == 0)
    return gn::grads_tuple(x, want[gn::kDx] ? at::empty_like(x) : at::Tensor(), g, weight, bias, scale, shift);
  gn::Call call = gn::prepare_call(x, num_groups, weight, bias, scale, shift, /*eps=*/1.0, silu,
                                   /*in_place_params=*/true);
  const gn::Problem& p = call.p;
  const at::Tensor dy = gn::grad_like_input(call.layout, grad_y);
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const Args args{mean_c.const_data_ptr<float>(), rstd_c.const_data_ptr<float>(), p.weight_p, p.bias_p,
                  p.scale_p, p.shift_p, static_cast<int>(p.c), static_cast<int>(p.groups),
                  static_cast<int>(p.c / p.groups), p.pixels, p.silu};
  const Outputs out{gn::data_or_null(g[gn::kDweight]), gn::data_or_null(g[gn::kDbias]),
                    gn::data_or_null(g[gn::kDscale]), gn::data_or_null(g[gn::kDshift]),
                    want[gn::kDx] ? call.layout.result.mutable_data_ptr() : nullptr};
  switch (x.scalar_type()) {
    case at::kFloat:
      launch_typed<float>(p, args, call.layout.input, dy, out);
      break;
    case at::kHalf:
      launch_typed<at::Half>(p, args, call.layout.input, dy, out);
      break;
    case at::kBFloat16:
      launch_typed<at::BFloat16>(p, args, call.layout.input, dy, out);
      break;
    default:
      DDPM_CHECK(false, "group_norm_scale_shift_backward: unsupported dtype ", x.scalar_type());
  }
  at::Tensor dx = want[gn::kDx] ? gn::finish_layout(call.layout) : at::Tensor();
  return gn::grads_tuple(x, dx, g, weight, bias, scale, shift);
}

}  // namespace
}  // namespace ddpm_fast

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("group_norm_scale_shift_backward", &ddpm_fast::group_norm_scale_shift_backward_cuda);
}
