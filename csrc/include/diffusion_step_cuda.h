// Device helpers of the CUDA kernels of ddpm_fast::diffusion_step and its backward
// (csrc/cuda/diffusion_step.cu, diffusion_step_backward.cu): 4-element loads and stores in any
// storage dtype, the noise of 4 elements (drawn in-kernel or given), block reductions, the
// per-block coefficient load and the storage-dtype dispatch. CUDA only (included by .cu files);
// shared memory is declared by the kernels and passed in.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "diffusion_step_math.h"
#include "philox.h"

namespace ddpm_fast {
namespace step_cuda {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;  // elements per thread: one Philox block
constexpr int kPerBlock = kThreads * kPerThread;

template <class T>
struct alignas(sizeof(T) * 4) Pack4 {
  T v[4];
};

// 4 consecutive values from p (elements i .. i + 3 of a run of n) as float; zeros past n.
template <class T>
__device__ __forceinline__ void load4(const T* p, int64_t i, int64_t n, bool vector_io, float v[4]) {
  if (vector_io && i + 3 < n) {
    const Pack4<T> pk = *reinterpret_cast<const Pack4<T>*>(p + i);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = static_cast<float>(pk.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = i + k < n ? static_cast<float>(p[i + k]) : 0.0f;
  }
}

template <class T>
__device__ __forceinline__ void store4(T* p, int64_t i, int64_t n, bool vector_io, const float v[4]) {
  if (vector_io && i + 3 < n) {
    Pack4<T> pk;
#pragma unroll
    for (int k = 0; k < 4; ++k) pk.v[k] = static_cast<T>(v[k]);
    *reinterpret_cast<Pack4<T>*>(p + i) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (i + k < n) p[i + k] = static_cast<T>(v[k]);
    }
  }
}

// A storage dtype chosen at run time: the forward kernels take x's and model_output's dtypes as
// kernel parameters (a warp-uniform branch per load or store) instead of template arguments, so
// one instantiation serves every pair: the step's math is compiled once, not once per pair.
enum class Storage : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

inline Storage storage_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return Storage::kFloat;
    case at::kHalf:
      return Storage::kHalf;
    case at::kBFloat16:
      return Storage::kBFloat16;
    default:
      DDPM_CHECK(false, "unsupported dtype ", type);
  }
  return Storage::kFloat;
}

// load4 / store4 of elements offset + i .. offset + i + 3 of `base`, stored as `s`.
__device__ __forceinline__ void load4(const void* base, Storage s, int64_t offset, int64_t i, int64_t n,
                                      bool vector_io, float v[4]) {
  switch (s) {
    case Storage::kHalf:
      load4(static_cast<const at::Half*>(base) + offset, i, n, vector_io, v);
      return;
    case Storage::kBFloat16:
      load4(static_cast<const at::BFloat16*>(base) + offset, i, n, vector_io, v);
      return;
    default:
      load4(static_cast<const float*>(base) + offset, i, n, vector_io, v);
  }
}

__device__ __forceinline__ void store4(void* base, Storage s, int64_t offset, int64_t i, int64_t n, bool vector_io,
                                       const float v[4]) {
  switch (s) {
    case Storage::kHalf:
      store4(static_cast<at::Half*>(base) + offset, i, n, vector_io, v);
      return;
    case Storage::kBFloat16:
      store4(static_cast<at::BFloat16*>(base) + offset, i, n, vector_io, v);
      return;
    default:
      store4(static_cast<float*>(base) + offset, i, n, vector_io, v);
  }
}

// The noise of elements first .. first + 3 (any alignment) of sample b into z: drawn from
// (seed[b], *step) when seed is not null, else read from `noise` (sample b's run of n elements,
// zeros past n), else zeros.
template <class S>
__device__ __forceinline__ void noise4(const int64_t* seed, const int64_t* step, const S* noise, int64_t b,
                                       int64_t first, int64_t n, bool vector_io, float z[4]) {
  if (seed != nullptr) {
    const philox::Key key = philox::key_of_seed(seed[b]);
    const philox::StepWords st = philox::step_words(*step);
    if ((first & 3) == 0) {
      philox::normal4(key, st, static_cast<uint32_t>(first >> 2), z);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) z[e] = philox::normal_at(key, st, static_cast<uint64_t>(first + e));
    }
  } else if (noise != nullptr) {
    load4(noise, first, n, vector_io, z);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) z[e] = 0.0f;
  }
}

// Sum of v over the block (all threads must call; result valid in every thread). shared: 32 floats.
__device__ __forceinline__ float block_sum(float v, float* shared) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  return total;
}

// The block's sample's coefficients, loaded once per block (shared: kNumCoefs floats).
__device__ __forceinline__ step::Coefs block_coefs(const float* coef, int64_t b, float* shared) {
  if (threadIdx.x < step::kNumCoefs) shared[threadIdx.x] = coef[b * step::kNumCoefs + threadIdx.x];
  __syncthreads();
  return step::load_coefs(shared);
}

// f(value of the C++ type of `type`) for the three storage dtypes (check_arguments admitted no other).
template <class F>
void dispatch_float(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat:
      f(float{});
      return;
    case at::kHalf:
      f(at::Half{});
      return;
    case at::kBFloat16:
      f(at::BFloat16{});
      return;
    default:
      DDPM_CHECK(false, "unsupported dtype ", type);
  }
}

inline bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

}  // namespace step_cuda
}  // namespace ddpm_fast
