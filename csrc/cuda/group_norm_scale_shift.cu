// CUDA kernel of ddpm_fast::group_norm_scale_shift (ADM's AdaGN, see csrc/include/group_norm_math.h).
//
// Three launches on the current stream:
//   1. moments: partial statistics {count, mean, m2} of slices of every group, several blocks per
//      group so that all SMs work even when N * num_groups is small.
//        NCHW: a group is one contiguous run of (C/G) * HW values; block (ng, split) reduces one
//              chunk of it with 16-byte vector loads where aligned.
//        channels-last: block (n * channel tiles + channel tile of 32, pixel split), threads
//              (32 channels x 8 pixel rows); one partial per (n, c, split), which lie contiguously
//              per group.
//      Grid axis y (limit 65535, queried) only holds splits, which are clamped to it; N * groups
//      and N * channel tiles go on axis x (limit 2^31 - 1, checked).
//      Threads sum values shifted by one value of their slice (s1, s2 in fp32 over a few values
//      each), then merge with Chan's formula (warp shuffles + shared memory).
//   2. coefficients: one block per (n, group) merges the group's partials and writes the
//      per-(n, c) affine map (a, b) of csrc/include/group_norm_math.h.
//   3. apply: y = a * x + b (+ SiLU) elementwise, grid-stride, vector loads/stores where aligned.
// (c10/cuda headers rather than ATen/cuda/CUDAContext.h: the latter needs the cuSPARSE/cuBLAS
// headers, which a bare toolkit install may lack.)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <array>
#include <mutex>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "group_norm_host.h"
#include "group_norm_math.h"

namespace ddpm_fast {
namespace {

using gn::Moments;

constexpr int kThreads = 256;           // moments (NCHW) and apply blocks
constexpr int kCoefThreads = 128;       // coefficient blocks
constexpr int kTileChannels = 32;       // channels-last moments: channels per block
constexpr int kTileRows = 8;            //   and pixel rows per block

template <typename I>
__device__ __forceinline__ I imin(I a, I b) {
  return a < b ? a : b;
}

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

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

// grid (N * G, splits). Block (ng, s) reduces [s * chunk, min(group_len, (s + 1) * chunk)) of the
// group's contiguous run; with kVec > 1, group_len and chunk are multiples of kVec and x is
// 16-byte aligned.
template <typename T, int kVec, typename index_t>
__global__ void __launch_bounds__(kThreads)
moments_nchw_kernel(const T* __restrict__ x, index_t group_len, index_t chunk,
                    Moments<float>* __restrict__ partial) {
  const index_t ng = blockIdx.x;
  const index_t begin = static_cast<index_t>(blockIdx.y) * chunk;
  const index_t end = imin<index_t>(group_len, begin + chunk);
  const T* base = x + ng * group_len;
  const float shift = static_cast<float>(base[imin<index_t>(begin, group_len - 1)]);
  float s1 = 0.f, s2 = 0.f, count = 0.f;
  for (index_t i = begin + static_cast<index_t>(threadIdx.x) * kVec; i < end;
       i += static_cast<index_t>(kThreads) * kVec) {
    const Pack<T, kVec> p = *reinterpret_cast<const Pack<T, kVec>*>(base + i);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float d = static_cast<float>(p.v[j]) - shift;
      s1 += d;
      s2 = fmaf(d, d, s2);
    }
    count += kVec;
  }
  Moments<float> m = gn::moments_from_shifted_sums<float>(count, shift, s1, s2);
  m = block_merge<kThreads>(m);
  if (threadIdx.x == 0) partial[static_cast<int64_t>(ng) * gridDim.y + blockIdx.y] = m;
}

// grid (N * ceil(C / 32), splits), block (32, 8): blockIdx.x = n * tiles + tile. Thread (tx, ty)
// sums channel c = 32 * tile + tx of sample n over the pixels p = begin + ty, begin + ty + 8, ...
// of its split.
template <typename T, typename index_t>
__global__ void __launch_bounds__(kTileChannels* kTileRows)
moments_channels_last_kernel(const T* __restrict__ x, index_t pixels, index_t channels,
                             index_t chunk_px, Moments<float>* __restrict__ partial) {
  __shared__ Moments<float> tile[kTileRows][kTileChannels];
  const index_t tiles = (channels + kTileChannels - 1) / kTileChannels;
  const index_t n = static_cast<index_t>(blockIdx.x) / tiles;
  const index_t c = static_cast<index_t>(blockIdx.x) % tiles * kTileChannels + threadIdx.x;
  const index_t p_begin = static_cast<index_t>(blockIdx.y) * chunk_px;
  const index_t p_end = imin<index_t>(pixels, p_begin + chunk_px);
  Moments<float> m = gn::moments_empty<float>();
  if (c < channels) {
    const T* base = x + n * pixels * channels + c;
    const float shift = static_cast<float>(base[0]);
    float s1 = 0.f, s2 = 0.f, count = 0.f;
    for (index_t p = p_begin + threadIdx.y; p < p_end; p += kTileRows) {
      const float d = static_cast<float>(base[p * channels]) - shift;
      s1 += d;
      s2 = fmaf(d, d, s2);
      count += 1.f;
    }
    m = gn::moments_from_shifted_sums<float>(count, shift, s1, s2);
  }
  tile[threadIdx.y][threadIdx.x] = m;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
#pragma unroll
    for (int r = 1; r < kTileRows; ++r) m = gn::moments_merge(m, tile[r][threadIdx.x]);
    partial[(static_cast<int64_t>(n) * channels + c) * gridDim.y + blockIdx.y] = m;
  }
}

// ---- 2. coefficients ---------------------------------------------------------------------------

struct CoefArgs {
  const Moments<float>* partial;  // (N * G, per_group)
  int64_t per_group;
  int64_t channels;
  int64_t groups;
  float eps;
  const float* weight;  // (C,) or nullptr
  const float* bias;
  const float* scale;   // (N, C) or nullptr
  const float* shift;
  float2* coef;         // (N, C): (a, b)
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
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < cg; j += kCoefThreads) {
    const int64_t c = g * cg + j, nc = n * args.channels + c;
    const gn::ChannelAffine<float> f = gn::channel_affine<float>(
        s_mean, s_rstd, args.weight ? args.weight[c] : 1.f, args.bias ? args.bias[c] : 0.f,
        args.scale ? args.scale[nc] : 0.f, args.shift ? args.shift[nc] : 0.f);
    args.coef[nc] = make_float2(f.a, f.b);
  }
}

// ---- 3. apply ----------------------------------------------------------------------------------

// Vector v covers elements [v * kVec, (v + 1) * kVec): with kVec > 1 they share one (n, c) plane
// (NCHW, pixels % kVec == 0) or one pixel row (channels-last, channels % kVec == 0).
template <typename T, int kVec, bool kChannelsLast, typename index_t>
__global__ void __launch_bounds__(kThreads)
apply_kernel(const T* __restrict__ x, T* __restrict__ y, index_t numel, index_t pixels,
             index_t channels, const float2* __restrict__ coef, bool silu) {
  const index_t n_vec = numel / kVec;
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t v = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; v < n_vec;
       v += stride) {
    const index_t i = v * kVec;
    const Pack<T, kVec> in = *reinterpret_cast<const Pack<T, kVec>*>(x + i);
    Pack<T, kVec> out;
    if constexpr (kChannelsLast) {
      const index_t c0 = i % channels;
      const float2* cf = coef + (i / (pixels * channels)) * channels + c0;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float2 ab = cf[j];
        out.v[j] = static_cast<T>(gn::apply_element(static_cast<float>(in.v[j]), ab.x, ab.y, silu));
      }
    } else {
      const float2 ab = coef[i / pixels];
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        out.v[j] = static_cast<T>(gn::apply_element(static_cast<float>(in.v[j]), ab.x, ab.y, silu));
    }
    *reinterpret_cast<Pack<T, kVec>*>(y + i) = out;
  }
}

// ---- host --------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Streaming multiprocessors of the current device (queried once per device).
int64_t sm_count() {
  constexpr int kMaxDevices = 64;
  static std::array<int, kMaxDevices> cache{};
  static std::mutex mutex;
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= kMaxDevices) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
  }
  if (cache[device] == 0)
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[device], cudaDevAttrMultiProcessorCount, device));
  return cache[device];
}

// A grid dimension limit of the current device (cudaDevAttrMaxGridDim{X,Y,Z}).
int64_t max_grid_dim(cudaDeviceAttr axis) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, axis, c10::cuda::current_device()));
  return value;
}

using gn::Problem;

template <typename T, int kVec, typename index_t>
void launch(const Problem& p, const T* x, T* y, const at::TensorOptions& float_opts) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t sms = sm_count();
  const int64_t target_blocks = 2 * sms;
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
    const int64_t tiles = ceil_div(p.c, kTileChannels);
    DDPM_CHECK(tiles * p.n <= max_x, "group_norm_scale_shift: N * ceil(C / 32) = ", tiles * p.n,
               " blocks exceed the grid limit ", max_x);
    const int64_t max_splits = std::max<int64_t>(1, ceil_div(p.pixels, kTileRows * 8));
    int64_t splits = std::clamp<int64_t>(ceil_div(target_blocks, tiles * p.n), 1,
                                         std::min<int64_t>(max_splits, max_y));
    const int64_t chunk_px = ceil_div(p.pixels, splits);
    splits = ceil_div(p.pixels, chunk_px);
    per_group = cg * splits;
    partial = at::empty({ng * per_group * 3}, float_opts);
    moments_channels_last_kernel<T, index_t>
        <<<dim3(static_cast<unsigned>(tiles * p.n), static_cast<unsigned>(splits)),
           dim3(kTileChannels, kTileRows), 0, stream>>>(
            x, static_cast<index_t>(p.pixels), static_cast<index_t>(p.c),
            static_cast<index_t>(chunk_px),
            reinterpret_cast<Moments<float>*>(partial.data_ptr<float>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // 2. coefficients (N, C) of float2
  at::Tensor coef = at::empty({p.n * p.c * 2}, float_opts);
  CoefArgs args{reinterpret_cast<const Moments<float>*>(partial.data_ptr<float>()),
                per_group, p.c, p.groups, static_cast<float>(p.eps), p.weight, p.bias, p.scale, p.shift,
                reinterpret_cast<float2*>(coef.data_ptr<float>())};
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

at::Tensor group_norm_scale_shift_cuda(const at::Tensor& x, int64_t num_groups,
                                       const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& scale,
                                       const std::optional<at::Tensor>& shift, double eps,
                                       bool silu) {
  gn::check_args(x, num_groups, weight, bias, scale, shift, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) return at::empty_like(x);
  gn::Call call = gn::prepare_call(x, num_groups, weight, bias, scale, shift, eps, silu);
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
  m.impl("group_norm_scale_shift", &ddpm_fast::group_norm_scale_shift_cuda);
}
