// Shared by the CPU (.cpp) and CUDA (.cu) kernels: per-element math is written once in
// DDPM_HD functions, compiled for the host by g++ and for host + device by nvcc.
#pragma once

#if defined(__CUDACC__)
#define DDPM_HD __host__ __device__ __forceinline__
#else
#define DDPM_HD inline
#endif

// DDPM_HD, and always inlined on the host too: the CPU kernels' loops vectorise only when every
// call inside them is inlined.
#if defined(__CUDACC__)
#define DDPM_HD_INLINE DDPM_HD
#else
#define DDPM_HD_INLINE inline __attribute__((always_inline))
#endif

#include <c10/util/Exception.h>

// Argument checks inside kernels' host code: user-facing checks live in Python (ddpm_fast/ops),
// these guard direct calls of torch.ops.ddpm_fast.* and raise RuntimeError naming the argument.
#define DDPM_CHECK(cond, ...) TORCH_CHECK(cond, "ddpm_fast: ", __VA_ARGS__)
