// SIMT test harness, kernel side: the CUDA built-ins a .cu file needs, for g++ on the CPU.
//
// tests/simt/build.py rewrites a COPY of a csrc/cuda/*.cu file (the c10/cuda and CUDA runtime
// includes become this header, `k<<<grid, block, smem, stream>>>(args)` becomes
// `::simt::launcher("k", k, grid, block, smem, stream)(args)`, `__shared__` declarations become
// per-block arena variables, `.is_cuda()` accepts CPU tensors, TORCH_LIBRARY_IMPL(ddpm_fast, CUDA,
// m) becomes SIMT_LIBRARY(m)) and compiles it with -fsanitize=kernel-address, whose
// __asan_{load,store}N hooks (tests/simt/simt_runtime.cpp) check every memory access a kernel
// makes: global accesses against the tracked CPU allocations (bounds), shared accesses against a
// per-word shadow (races).
//
// Execution model (simt_runtime.cpp): blocks run one after another; the threads of a block are
// fibers scheduled cooperatively, numbered as CUDA does (x fastest, warps of 32 consecutive linear
// ids). A fiber runs until it reaches a barrier: __syncthreads (block), __syncwarp or a shuffle
// (the lanes of its mask). Limits: no FMA contraction beyond explicit fmaf, no timing, no
// preemption inside straight-line code (races are found by the shadow, not by interleavings),
// memcpy/memset calls inside kernels are not checked.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "simt_abi.h"

// ---- types of the CUDA runtime -----------------------------------------------------------------

struct CUstream_st;
using cudaStream_t = CUstream_st*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;

struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

enum cudaDeviceAttr : int {
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace simt {

// ---- launches ----------------------------------------------------------------------------------

template <typename... P>
struct Launcher {
  const char* name;
  void (*fn)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... args) const {
    // The kernel's parameters, copied (converted) once like cudaLaunchKernel does; every thread
    // then gets its own by-value copy.
    using Params = std::tuple<std::decay_t<P>...>;
    Params params(std::forward<A>(args)...);
    struct Ctx {
      void (*fn)(P...);
      Params* params;
    } ctx{fn, &params};
    run_grid(name, reinterpret_cast<const void*>(fn), grid, block, smem,
             [](void* c) {
               auto* x = static_cast<Ctx*>(c);
               std::apply(x->fn, *x->params);
             },
             &ctx);
  }
};

template <typename... P>
Launcher<P...> launcher(const char* name, void (*fn)(P...), dim3 grid, dim3 block, size_t smem = 0,
                        cudaStream_t = nullptr) {
  return Launcher<P...>{name, fn, grid, block, smem};
}

// ---- shuffles ----------------------------------------------------------------------------------

template <typename T>
T shuffle_value(unsigned mask, T v, int mode, int arg, int width, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a 1-8 byte value");
  uint64_t word = 0;
  std::memcpy(&word, &v, sizeof(T));
  word = shuffle(mask, word, mode, arg, width, line);
  T out;
  std::memcpy(&out, &word, sizeof(T));
  return out;
}

// ---- per-block shared memory -------------------------------------------------------------------

template <typename T>
T& shared_var(const char* key) {
  return *static_cast<T*>(static_shared(key, sizeof(T), alignof(T)));
}

// ---- registration of the host launchers --------------------------------------------------------

// Stands in for the torch::Library of TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m): each m.impl(name, f)
// defines `name` (schema inferred from f) in this build's own op namespace.
struct Registrar {
  torch::Library& lib;
  template <typename F>
  void impl(const char* name, F&& f) {
    lib.def(name, std::forward<F>(f));
  }
};

}  // namespace simt

#ifndef SIMT_NAMESPACE
#error "build with -DSIMT_NAMESPACE=<op namespace of this build>"
#endif
#define SIMT_LIBRARY(m)                                       \
  static void simt_register_impls(::simt::Registrar& m);      \
  TORCH_LIBRARY(SIMT_NAMESPACE, simt_lib) {                   \
    ::simt::Registrar registrar{simt_lib};                    \
    simt_register_impls(registrar);                           \
  }                                                           \
  static void simt_register_impls(::simt::Registrar& m)

// ---- CUDA built-ins ----------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

#define threadIdx (::simt::thread_idx())
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())
constexpr int warpSize = 32;

#define __syncthreads() ::simt::sync_block(__LINE__)
#define __syncwarp(...) ::simt::sync_warp(::simt::warp_mask_arg(__VA_ARGS__), __LINE__)
#define __shfl_sync(mask, v, lane, ...) \
  ::simt::shuffle_value((mask), (v), ::simt::kShflIdx, (lane), ::simt::width_arg(__VA_ARGS__), __LINE__)
#define __shfl_up_sync(mask, v, delta, ...) \
  ::simt::shuffle_value((mask), (v), ::simt::kShflUp, (delta), ::simt::width_arg(__VA_ARGS__), __LINE__)
#define __shfl_down_sync(mask, v, delta, ...) \
  ::simt::shuffle_value((mask), (v), ::simt::kShflDown, (delta), ::simt::width_arg(__VA_ARGS__), __LINE__)
#define __shfl_xor_sync(mask, v, lane_mask, ...) \
  ::simt::shuffle_value((mask), (v), ::simt::kShflXor, (lane_mask), ::simt::width_arg(__VA_ARGS__), __LINE__)

namespace simt {
constexpr unsigned warp_mask_arg() { return 0xffffffffu; }
constexpr unsigned warp_mask_arg(unsigned mask) { return mask; }
constexpr int width_arg() { return 32; }
constexpr int width_arg(int width) { return width; }
}  // namespace simt

inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }
inline float __int_as_float(int i) { return __uint_as_float(static_cast<unsigned>(i)); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }

template <typename T>
T atomicAdd(T* address, T value) {
  ::simt::atomic_begin();
  const T old = *address;
  *address = old + value;
  ::simt::atomic_end();
  return old;
}
template <typename T>
T atomicMax(T* address, T value) {
  ::simt::atomic_begin();
  const T old = *address;
  *address = old < value ? value : old;
  ::simt::atomic_end();
  return old;
}
template <typename T>
T atomicExch(T* address, T value) {
  ::simt::atomic_begin();
  const T old = *address;
  *address = value;
  ::simt::atomic_end();
  return old;
}

// ---- CUDA runtime API and c10/cuda pieces the host launchers use -------------------------------

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  *value = ::simt::device_attribute(attr);
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize)
    ::simt::set_func_max_dynamic_smem(reinterpret_cast<const void*>(fn), value);
  return cudaSuccess;
}

namespace c10 {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline c10::DeviceIndex current_device() { return 0; }
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
}  // namespace cuda
}  // namespace c10

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "simt: ", #expr, " failed")
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

#include "simt_mma.h"

// Kernels may select harness versions of PTX-only code (e.g. simt_mma.h) with SIMT_HARNESS; the
// device branches of the project's headers (csrc/include) compile from here on.
#define SIMT_HARNESS 1
#define __CUDA_ARCH__ 900
