// CUDA pieces shared by the forward (csrc/cuda/group_norm_scale_shift.cu) and backward
// (csrc/cuda/group_norm_scale_shift_backward.cu) kernels of group_norm_scale_shift: vector packs,
// parameters read where they lie (any strides, float/half/bfloat16), warp sums, and the host
// queries of the device (SM count, grid limits). Included by .cu files only, after their
// c10/cuda and CUDA runtime includes, which the SIMT harness's copies (tests/simt) replace with its
// own stand-ins; so no such includes here, and no __shared__ (the harness rewrites those in the .cu).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <mutex>

#include "group_norm_host.h"

namespace ddpm_fast {
namespace gn {

template <typename I>
__device__ __forceinline__ I imin(I a, I b) {
  return a < b ? a : b;
}

// kVec elements loaded or stored as one 16-byte (or narrower) access.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kVec>*>(p);
}

// Element i of a float / half / bfloat16 array, as float.
__device__ __forceinline__ float load_float(const void* p, int64_t i, at::ScalarType dtype) {
  switch (dtype) {
    case at::ScalarType::Half:
      return static_cast<float>(static_cast<const at::Half*>(p)[i]);
    case at::ScalarType::BFloat16:
      return static_cast<float>(static_cast<const at::BFloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// Parameter (n, c), or `absent` without one.
__device__ __forceinline__ float param_at(const Param& q, int64_t n, int64_t c, float absent) {
  return q.data ? load_float(q.data, n * q.stride_n + c * q.stride_c, q.dtype) : absent;
}

// Sum over the 32 lanes of a warp (in a fixed order: the same result in every lane).
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Where a block (tx_dim, ty_dim) of a channels-last kernel works: grid (N * tiles, pixel splits),
// blockIdx.x = n * tiles + tile, a tile of tx_dim * kVec channels (thread x owns kVec of them from
// c0), the pixels [p_begin, p_end) of split blockIdx.y.
template <typename index_t>
struct ChannelTile {
  index_t n, c_tile, c0, p_begin, p_end;
};

// (The block coordinates in 32 bits: an int64 division is a subroutine call.)
template <int kVec, typename index_t>
__device__ __forceinline__ ChannelTile<index_t> channel_tile(index_t pixels, index_t channels, index_t chunk_px) {
  const int tile_channels = static_cast<int>(blockDim.x) * kVec;
  const int tiles = (static_cast<int>(channels) + tile_channels - 1) / tile_channels;
  ChannelTile<index_t> t;
  t.n = static_cast<index_t>(static_cast<int>(blockIdx.x) / tiles);
  t.c_tile = static_cast<index_t>(static_cast<int>(blockIdx.x) % tiles * tile_channels);
  t.c0 = t.c_tile + static_cast<index_t>(threadIdx.x) * kVec;
  t.p_begin = static_cast<index_t>(blockIdx.y) * chunk_px;
  t.p_end = imin<index_t>(pixels, t.p_begin + chunk_px);
  return t;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Streaming multiprocessors of the current device (queried once per device).
inline int64_t sm_count() {
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
inline int64_t max_grid_dim(cudaDeviceAttr axis) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, axis, c10::cuda::current_device()));
  return value;
}

}  // namespace gn
}  // namespace ddpm_fast
