// CUDA kernel of ddpm_fast::group_norm_scale_shift (ADM's AdaGN, see csrc/include/group_norm_math.h)
// and of ddpm_fast::group_norm_scale_shift_stats (the same launches; the coefficients kernel also
// writes each group's mean and rstd for the backward, group_norm_scale_shift_backward.cu).
//
// Three launches on the current stream:
//   1. moments: partial statistics {count, mean, m2} of slices of every group, several blocks per
//      group so that every SM has several blocks (~30 KB of loads in flight each) even when
//      N * num_groups is small. All moments of a group are of x minus the group's shift (its first
//      element; see group_norm_math.h), built by Welford updates / short runs and merged with
//      Chan's formula (threads: in order; warps: shuffles; blocks: shared memory, fixed order).
//        NCHW: a group is one contiguous run of (C/G) * HW values; block (ng, split) reduces one
//              chunk of it, a thread kVec consecutive values (16 bytes) per load, two loads in
//              flight, each run of kVec merged into the thread's moments.
//        channels-last: block (n * channel tiles + tile, pixel split), threads (tx, ty): thread
//              (tx, ty) owns channels tile * tx_dim * kVec + tx * kVec + [0, kVec) (one 16-byte
//              load per pixel row) and the rows p = begin + ty, begin + ty + ty_dim, ..., two rows
//              in flight, one Welford update per channel and row (one reciprocal per row); the
//              block merges its ty_dim rows per channel in shared memory; one partial per
//              (n, c, split), which lie contiguously per group.
//      Grid axis y (limit 65535, queried) only holds splits, which are clamped to it; N * groups
//      and N * channel tiles go on axis x (limit 2^31 - 1, checked).
//   2. coefficients: one block per (n, group) merges the group's partials and writes the
//      per-(n, c) affine map (a, b) of csrc/include/group_norm_math.h. weight/bias/scale/shift are
//      read where they lie (any strides, fp32/fp16/bf16: AdaGN's emb_out.chunk(2, 1) views, no
//      copies).
//   3. apply: y = a * x + b (+ SiLU: fast exp and division for fp16/bf16 outputs, exact for fp32)
//      elementwise, grid-stride, two 16-byte vectors per thread in flight where aligned.
// With kVec = 1 (x or y not 16-byte aligned, or HW (NCHW) / C (channels-last) not a multiple of
// 16 / sizeof(T)) the same kernels load one element at a time.
// (c10/cuda headers rather than ATen/cuda/CUDAContext.h: the latter needs the cuSPARSE/cuBLAS
// headers, which a bare toolkit install may lack.)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "group_norm_device.h"
#include "group_norm_host.h"
#include "group_norm_math.h"

namespace ddpm_fast {
namespace {

using gn::ceil_div;
using gn::imin;
using gn::load_float;
using gn::load_pack;
using gn::max_grid_dim;
using gn::Moments;
using gn::Pack;
using gn::param_at;
using gn::sm_count;

constexpr int kThreads = 256;           // moments (NCHW) and apply blocks
constexpr int kCoefThreads = 128;       // coefficient blocks
constexpr int kMaxTileVectors = 32;     // channels-last moments: at most 32 channel vectors per block row
constexpr int kBlocksPerSm = 8;         // moments blocks to aim for per SM (several resident, more waves)

__device__ __forceinline__ Moments<float> shfl_down(const Moments<float>& m, int offset) {
  Moments<float> o;
  o.count = __shfl_down_sync(0xffffffffu, m.count, offset);
  o.mean = __shfl_down_sync(0xffffffffu, m.mean, offset);
  o.m2 = __shfl_down_sync(0xffffffffu, m.m2, offset);
  return o;
}

__device__ __forceinline__ Moments<float> warp_merge(Moments<float> m) {
  for (int offset = 16; offset > 0; offset >>= 1) m = gn::moments_merge(m, shfl_down(m, offset));
  return m;
}

// Merge over a 1-D block of kBlock threads; the result is valid in thread 0.
template <int kBlock>
__device__ Moments<float> block_merge(Moments<float> m) {
  static_assert(kBlock % 32 == 0 && kBlock <= 1024, "block must be whole warps");
  __shared__ Moments<float> per_warp[kBlock / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  m = warp_merge(m);
  if (lane == 0) per_warp[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < kBlock / 32 ? per_warp[lane] : gn::moments_empty<float>();
    m = warp_merge(m);
  }
  return m;
}

// ---- 1. moments --------------------------------------------------------------------------------

// The kVec values of p minus shift, as float.
template <typename T, int kVec>
__device__ __forceinline__ void shifted(const Pack<T, kVec>& p, float shift, float (&d)[kVec]) {
#pragma unroll
  for (int j = 0; j < kVec; ++j) d[j] = static_cast<float>(p.v[j]) - shift;
}

// grid (N * G, splits). Block (ng, s) reduces [s * chunk, min(group_len, (s + 1) * chunk)) of the
// group's contiguous run; with kVec > 1, group_len and chunk are multiples of kVec and x is
// 16-byte aligned. Moments are of x - x[group's first element].
template <typename T, int kVec, typename index_t>
__global__ void __launch_bounds__(kThreads)
moments_nchw_kernel(const T* __restrict__ x, index_t group_len, index_t chunk,
                    Moments<float>* __restrict__ partial) {
  const index_t ng = blockIdx.x;
  const index_t begin = static_cast<index_t>(blockIdx.y) * chunk;
  const index_t end = imin<index_t>(group_len, begin + chunk);
  const T* base = x + ng * group_len;
  const float shift = static_cast<float>(base[0]);
  constexpr index_t kStride = static_cast<index_t>(kThreads) * kVec;
  Moments<float> m = gn::moments_empty<float>();
  index_t i = begin + static_cast<index_t>(threadIdx.x) * kVec;
  for (; i + kStride < end; i += 2 * kStride) {  // two loads in flight
    const Pack<T, kVec> a = load_pack<T, kVec>(base + i), b = load_pack<T, kVec>(base + i + kStride);
    float d[kVec];
    shifted(a, shift, d);
    m = gn::moments_merge(m, gn::moments_of_run(d));
    shifted(b, shift, d);
    m = gn::moments_merge(m, gn::moments_of_run(d));
  }
  if (i < end) {
    float d[kVec];
    shifted(load_pack<T, kVec>(base + i), shift, d);
    m = gn::moments_merge(m, gn::moments_of_run(d));
  }
  m = block_merge<kThreads>(m);
  if (threadIdx.x == 0) partial[static_cast<int64_t>(ng) * gridDim.y + blockIdx.y] = m;
}

// grid (N * tiles, splits), block (tx_dim, ty_dim) with tx_dim * ty_dim = kThreads and
// tx_dim <= 32: a tile is tx_dim * kVec channels, blockIdx.x = n * tiles + tile. With kVec > 1,
// C is a multiple of kVec and x is 16-byte aligned. Moments of channel c are of x minus its
// group's shift x[n, pixel 0, first channel of the group].
template <typename T, int kVec, typename index_t>
__global__ void __launch_bounds__(kThreads)
moments_channels_last_kernel(const T* __restrict__ x, index_t pixels, index_t channels,
                             index_t cg, index_t chunk_px, Moments<float>* __restrict__ partial) {
  __shared__ float row_count[kThreads];
  __shared__ float2 row_moments[kThreads * kVec];  // (mean, m2) of thread t's channel j at t * kVec + j
  const index_t tx_dim = blockDim.x, ty_dim = blockDim.y;
  const index_t tile_channels = tx_dim * kVec;
  const auto [n, c_tile, c0, p_begin, p_end] = gn::channel_tile<kVec>(pixels, channels, chunk_px);
  const T* sample = x + n * pixels * channels;
  float count = 0.f, mean[kVec], m2[kVec], shift[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) mean[j] = m2[j] = shift[j] = 0.f;
  if (c0 < channels) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) shift[j] = static_cast<float>(sample[(c0 + j) / cg * cg]);
    const T* col = sample + c0;
    for (index_t p = p_begin + threadIdx.y; p < p_end; p += 2 * ty_dim) {  // two rows in flight
      const bool second = p + ty_dim < p_end;
      const Pack<T, kVec> a = load_pack<T, kVec>(col + p * channels);
      Pack<T, kVec> b = a;
      if (second) b = load_pack<T, kVec>(col + (p + ty_dim) * channels);
      count += 1.f;
      float inv = 1.f / count;
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        gn::welford_step(mean[j], m2[j], static_cast<float>(a.v[j]) - shift[j], inv);
      if (second) {
        count += 1.f;
        inv = 1.f / count;
#pragma unroll
        for (int j = 0; j < kVec; ++j)
          gn::welford_step(mean[j], m2[j], static_cast<float>(b.v[j]) - shift[j], inv);
      }
    }
  }
  const int t = threadIdx.y * tx_dim + threadIdx.x;
  row_count[t] = count;
#pragma unroll
  for (int j = 0; j < kVec; ++j) row_moments[t * kVec + j] = make_float2(mean[j], m2[j]);
  __syncthreads();
  // thread s < tile_channels merges channel c_tile + s over the ty_dim rows, in row order
  const index_t s = threadIdx.y * tx_dim + threadIdx.x, c = c_tile + s;
  if (s < tile_channels && c < channels) {
    const index_t owner = s / kVec, j = s % kVec;
    Moments<float> r = gn::moments_empty<float>();
    for (index_t row = 0; row < ty_dim; ++row) {
      const index_t src = row * tx_dim + owner;
      const float2 mv = row_moments[src * kVec + j];
      r = gn::moments_merge(r, Moments<float>{row_count[src], mv.x, mv.y});
    }
    partial[(static_cast<int64_t>(n) * channels + c) * gridDim.y + blockIdx.y] = r;
  }
}

// ---- 2. coefficients ---------------------------------------------------------------------------

struct CoefArgs {
  const Moments<float>* partial;  // (N * G, per_group)
  int64_t per_group;
  int64_t channels;
  int64_t groups;
  float eps;
  const void* x;           // the input, for the groups' shifts
  at::ScalarType x_dtype;
  int64_t group_stride_n;  // offset of group (n, g)'s first element: n * group_stride_n
  int64_t group_stride_g;  //   + g * group_stride_g
  gn::Param weight, bias;  // (C,)
  gn::Param scale, shift;  // (N, C)
  float2* coef;            // (N, C): (a, b)
  float* mean_out;         // (N, G): the group statistics (the forward with statistics), or nullptr
  float* rstd_out;
};

__global__ void __launch_bounds__(kCoefThreads) coefficients_kernel(CoefArgs args) {
  __shared__ float s_mean, s_rstd;
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / args.groups, g = ng % args.groups;
  const int64_t cg = args.channels / args.groups;
  Moments<float> m = gn::moments_empty<float>();
  for (int64_t k = threadIdx.x; k < args.per_group; k += kCoefThreads)
    m = gn::moments_merge(m, args.partial[ng * args.per_group + k]);
  m = block_merge<kCoefThreads>(m);
  if (threadIdx.x == 0) {
    s_mean = m.mean;
    s_rstd = gn::group_rstd<float>(m, args.eps);
    s_mean += load_float(args.x, n * args.group_stride_n + g * args.group_stride_g, args.x_dtype);
    if (args.mean_out) {
      args.mean_out[ng] = s_mean;
      args.rstd_out[ng] = s_rstd;
    }
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < cg; j += kCoefThreads) {
    const int64_t c = g * cg + j, nc = n * args.channels + c;
    const gn::ChannelAffine<float> f = gn::channel_affine<float>(
        s_mean, s_rstd, param_at(args.weight, 0, c, 1.f), param_at(args.bias, 0, c, 0.f),
        param_at(args.scale, n, c, 0.f), param_at(args.shift, n, c, 0.f));
    args.coef[nc] = make_float2(f.a, f.b);
  }
}

// ---- 3. apply ----------------------------------------------------------------------------------

// (a, b) of two consecutive channels: one 16-byte load.
struct alignas(16) CoefPair {
  float a0, b0, a1, b1;
};

// y[i .. i + kVec) from x[i .. i + kVec): with kVec > 1 they share one (n, c) plane (NCHW,
// pixels % kVec == 0) or one pixel row (channels-last, channels % kVec == 0).
template <typename T, int kVec, bool kChannelsLast, typename index_t>
__device__ __forceinline__ Pack<T, kVec> apply_pack(const Pack<T, kVec>& in, index_t i, index_t pixels,
                                                    index_t channels, const float2* __restrict__ coef,
                                                    bool silu) {
  constexpr bool kFast = !std::is_same_v<T, float>;  // fp16/bf16 outputs: fast SiLU
  Pack<T, kVec> out;
  if constexpr (kChannelsLast) {
    const index_t c0 = i % channels;
    const float2* cf = coef + (i / (pixels * channels)) * channels + c0;
    if constexpr (kVec % 2 == 0) {  // (a, b) of two channels per 16-byte load
#pragma unroll
      for (int j = 0; j < kVec; j += 2) {
        const CoefPair ab = *reinterpret_cast<const CoefPair*>(cf + j);
        out.v[j] = static_cast<T>(gn::apply_element_as<kFast>(static_cast<float>(in.v[j]), ab.a0, ab.b0, silu));
        out.v[j + 1] =
            static_cast<T>(gn::apply_element_as<kFast>(static_cast<float>(in.v[j + 1]), ab.a1, ab.b1, silu));
      }
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float2 ab = cf[j];
        out.v[j] = static_cast<T>(gn::apply_element_as<kFast>(static_cast<float>(in.v[j]), ab.x, ab.y, silu));
      }
    }
  } else {
    const float2 ab = coef[i / pixels];
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      out.v[j] = static_cast<T>(gn::apply_element_as<kFast>(static_cast<float>(in.v[j]), ab.x, ab.y, silu));
  }
  return out;
}

// Vector v covers elements [v * kVec, (v + 1) * kVec); a thread takes vectors v and v + stride
// (both loads issued first), then moves on by 2 * stride.
template <typename T, int kVec, bool kChannelsLast, typename index_t>
__global__ void __launch_bounds__(kThreads)
apply_kernel(const T* __restrict__ x, T* __restrict__ y, index_t numel, index_t pixels,
             index_t channels, const float2* __restrict__ coef, bool silu) {
  const index_t n_vec = numel / kVec;
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t v = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; v < n_vec;
       v += 2 * stride) {
    const index_t i = v * kVec, i2 = (v + stride) * kVec;
    const bool second = v + stride < n_vec;
    const Pack<T, kVec> a = load_pack<T, kVec>(x + i);
    Pack<T, kVec> b = a;
    if (second) b = load_pack<T, kVec>(x + i2);
    *reinterpret_cast<Pack<T, kVec>*>(y + i) =
        apply_pack<T, kVec, kChannelsLast, index_t>(a, i, pixels, channels, coef, silu);
    if (second)
      *reinterpret_cast<Pack<T, kVec>*>(y + i2) =
          apply_pack<T, kVec, kChannelsLast, index_t>(b, i2, pixels, channels, coef, silu);
  }
}

// ---- host --------------------------------------------------------------------------------------

using gn::Problem;

template <typename T, int kVec, typename index_t>
void launch(const Problem& p, const T* x, T* y, const at::TensorOptions& float_opts) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t sms = sm_count();
  const int64_t target_blocks = kBlocksPerSm * sms;
  const int64_t cg = p.c / p.groups, ng = p.n * p.groups;
  const int64_t max_x = max_grid_dim(cudaDevAttrMaxGridDimX);
  const int64_t max_y = max_grid_dim(cudaDevAttrMaxGridDimY);
  DDPM_CHECK(ng <= max_x, "group_norm_scale_shift: N * num_groups = ", ng,
             " blocks exceed the grid limit ", max_x);

  // 1. moments -> partial (ng, per_group)
  int64_t per_group;
  at::Tensor partial;
  if (!p.channels_last) {
    const int64_t group_len = cg * p.pixels;
    const int64_t max_splits = std::max<int64_t>(1, ceil_div(group_len, kThreads * kVec * 4));
    int64_t splits = std::clamp<int64_t>(ceil_div(target_blocks, ng), 1,
                                         std::min<int64_t>(max_splits, max_y));
    const int64_t chunk = ceil_div(ceil_div(group_len, splits), kVec) * kVec;
    splits = ceil_div(group_len, chunk);
    per_group = splits;
    partial = at::empty({ng * per_group * 3}, float_opts);
    moments_nchw_kernel<T, kVec, index_t>
        <<<dim3(static_cast<unsigned>(ng), static_cast<unsigned>(splits)), kThreads, 0, stream>>>(
            x, static_cast<index_t>(group_len), static_cast<index_t>(chunk),
            reinterpret_cast<Moments<float>*>(partial.data_ptr<float>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    // a block row covers up to 32 channel vectors (a power of two >= the vectors of C)
    int64_t tx = 1;
    while (tx < kMaxTileVectors && tx * kVec < p.c) tx *= 2;
    const int64_t ty = kThreads / tx;
    const int64_t tiles = ceil_div(p.c, tx * kVec);
    DDPM_CHECK(tiles * p.n <= max_x, "group_norm_scale_shift: N * channel tiles = ", tiles * p.n,
               " blocks exceed the grid limit ", max_x);
    const int64_t max_splits = std::max<int64_t>(1, ceil_div(p.pixels, ty * 8));  // >= 8 rows a thread
    int64_t splits = std::clamp<int64_t>(ceil_div(target_blocks, tiles * p.n), 1,
                                         std::min<int64_t>(max_splits, max_y));
    const int64_t chunk_px = ceil_div(p.pixels, splits);
    splits = ceil_div(p.pixels, chunk_px);
    per_group = cg * splits;
    partial = at::empty({ng * per_group * 3}, float_opts);
    moments_channels_last_kernel<T, kVec, index_t>
        <<<dim3(static_cast<unsigned>(tiles * p.n), static_cast<unsigned>(splits)),
           dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty)), 0, stream>>>(
            x, static_cast<index_t>(p.pixels), static_cast<index_t>(p.c), static_cast<index_t>(cg),
            static_cast<index_t>(chunk_px),
            reinterpret_cast<Moments<float>*>(partial.data_ptr<float>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // 2. coefficients (N, C) of float2
  at::Tensor coef = at::empty({p.n * p.c * 2}, float_opts);
  CoefArgs args{reinterpret_cast<const Moments<float>*>(partial.data_ptr<float>()),
                per_group,
                p.c,
                p.groups,
                static_cast<float>(p.eps),
                x,
                c10::CppTypeToScalarType<T>::value,
                p.c * p.pixels,
                p.channels_last ? cg : cg * p.pixels,
                p.weight_p,
                p.bias_p,
                p.scale_p,
                p.shift_p,
                reinterpret_cast<float2*>(coef.data_ptr<float>()),
                p.mean_out,
                p.rstd_out};
  coefficients_kernel<<<static_cast<unsigned>(ng), kCoefThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 3. apply
  const int64_t numel = p.n * p.c * p.pixels;
  const int64_t blocks = std::clamp<int64_t>(ceil_div(numel / kVec, kThreads), 1, sms * 16);
  const float2* cf = reinterpret_cast<const float2*>(coef.data_ptr<float>());
  if (p.channels_last)
    apply_kernel<T, kVec, true, index_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        x, y, static_cast<index_t>(numel), static_cast<index_t>(p.pixels),
        static_cast<index_t>(p.c), cf, p.silu);
  else
    apply_kernel<T, kVec, false, index_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        x, y, static_cast<index_t>(numel), static_cast<index_t>(p.pixels),
        static_cast<index_t>(p.c), cf, p.silu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_typed(const Problem& p, const at::Tensor& x, at::Tensor& y) {
  constexpr int kVec = 16 / sizeof(T);
  const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());
  T* yp = reinterpret_cast<T*>(y.mutable_data_ptr());
  const bool aligned = reinterpret_cast<uintptr_t>(xp) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(yp) % 16 == 0;
  const bool vec = aligned && (p.channels_last ? p.c % kVec == 0 : p.pixels % kVec == 0);
  const bool small = x.numel() < std::numeric_limits<int32_t>::max() / 2;
  const auto opts = x.options().dtype(at::kFloat);
  if (vec) {
    if (small)
      launch<T, kVec, int32_t>(p, xp, yp, opts);
    else
      launch<T, kVec, int64_t>(p, xp, yp, opts);
  } else {
    if (small)
      launch<T, 1, int32_t>(p, xp, yp, opts);
    else
      launch<T, 1, int64_t>(p, xp, yp, opts);
  }
}

// The forward; with `stats`, also the group statistics (N, G) fp32 (written by coefficients_kernel).
at::Tensor forward(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                   const std::optional<at::Tensor>& shift, double eps, bool silu, gn::Stats* stats) {
  gn::check_args(x, num_groups, weight, bias, scale, shift, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) {
    if (stats) *stats = gn::empty_stats(x, num_groups, eps);
    return at::empty_like(x);
  }
  gn::Call call =
      gn::prepare_call(x, num_groups, weight, bias, scale, shift, eps, silu, /*in_place_params=*/true);
  if (stats) {
    *stats = gn::stats_buffers(x, num_groups);
    call.p.mean_out = stats->mean.mutable_data_ptr<float>();
    call.p.rstd_out = stats->rstd.mutable_data_ptr<float>();
  }
  const Problem& p = call.p;
  gn::Layout& layout = call.layout;
  switch (x.scalar_type()) {
    case at::kFloat:
      launch_typed<float>(p, layout.input, layout.result);
      break;
    case at::kHalf:
      launch_typed<at::Half>(p, layout.input, layout.result);
      break;
    case at::kBFloat16:
      launch_typed<at::BFloat16>(p, layout.input, layout.result);
      break;
    default:
      DDPM_CHECK(false, "group_norm_scale_shift: unsupported dtype ", x.scalar_type());
  }
  return gn::finish_layout(layout);
}

}  // namespace
}  // namespace ddpm_fast

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("group_norm_scale_shift", &ddpm_fast::gn::forward_plain<&ddpm_fast::forward>);
  m.impl("group_norm_scale_shift_stats", &ddpm_fast::gn::forward_stats<&ddpm_fast::forward>);
}
