// What the CUDA kernels of ddpm_fast::diffusion_step and its backward share
// (csrc/cuda/diffusion_step.cu, diffusion_step_backward.cu): the launch parameters common to both
// (StepParams, set_inputs) and the per-chunk batch loop of their grids; device helpers: 4-element
// loads and stores in any storage dtype (compile-time, or Storage at run time), the noise of 4
// elements (drawn in-kernel or given), block reductions, the per-block coefficient load. CUDA
// only (included by .cu files); shared memory is declared by the kernels and passed in.
#pragma once

// The including .cu file includes c10/cuda's CUDAException.h and CUDAStream.h (or, under the
// SIMT harness, gets its stand-ins) before this header.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "diffusion_step_math.h"
#include "philox.h"

namespace ddpm_fast {
namespace step_cuda {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;  // elements per thread: one Philox block
constexpr int kPerBlock = kThreads * kPerThread;

// What the forward's and the backward's kernels share; each file's Params adds its own fields.
struct StepParams {
  step::Options o;    // set by step::check_arguments
  int64_t numel;      // elements of one sample
  int64_t mo_stride;  // elements of one sample of model_output
  int64_t pixels;
  int64_t channels;
  const float* coef;    // (B, kNumCoefs) float32
  const int64_t* seed;  // (B,) or null
  const int64_t* step;  // 0-dim, or null
  bool has_clip;
  float clip_lo, clip_hi;
  bool vector_io;        // 4-element vector loads / stores are aligned
  int64_t blocks;        // blocks per sample (gridDim.x of the step kernels)
  int64_t batch_offset;  // sample of blockIdx.y == 0 (of blockIdx.x == 0 in the per-sample kernels)
};

// The geometry and the per-sample inputs from the checked arguments: coef as float32 contiguous,
// seed contiguous (undefined without one), step as given.
inline void set_inputs(StepParams& p, const step::Geometry& g, const at::Tensor& coef, const at::Tensor& seed,
                       const std::optional<at::Tensor>& step, std::optional<double> clip_lo,
                       std::optional<double> clip_hi) {
  p.numel = g.numel;
  p.mo_stride = g.mo_stride;
  p.pixels = g.pixels;
  p.channels = g.channels;
  p.coef = coef.data_ptr<float>();
  p.seed = seed.defined() ? seed.data_ptr<int64_t>() : nullptr;
  p.step = seed.defined() ? step->data_ptr<int64_t>() : nullptr;
  p.has_clip = clip_lo.has_value();
  p.clip_lo = p.has_clip ? static_cast<float>(*clip_lo) : 0.0f;
  p.clip_hi = p.has_clip ? static_cast<float>(*clip_hi) : 0.0f;
  // a pixel projection's thread takes 4 pixels of every channel, the other kernels 4 elements
  const int64_t per_sample = p.o.projection == step::kProjectPixel ? p.pixels : p.numel;
  p.blocks = (per_sample + kPerBlock - 1) / kPerBlock;
}

// launch(grid) once per chunk of at most the grid's y limit (queried) samples, with
// p.batch_offset the chunk's first sample: grid = (p.blocks, samples of the chunk).
template <class F>
void for_each_batch_chunk(StepParams& p, int64_t batch, F&& launch) {
  int max_grid_y = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_grid_y, cudaDevAttrMaxGridDimY, c10::cuda::current_device()));
  for (int64_t b0 = 0; b0 < batch; b0 += max_grid_y) {
    p.batch_offset = b0;
    launch(dim3(static_cast<unsigned>(p.blocks), static_cast<unsigned>(std::min<int64_t>(max_grid_y, batch - b0))));
  }
}

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

inline size_t storage_bytes(Storage s) { return s == Storage::kFloat ? 4 : 2; }

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

inline bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

}  // namespace step_cuda
}  // namespace ddpm_fast
