// Self-test kernels of the SIMT harness (tests/test_simt.py): CUDA semantics the project's kernels
// use only in part (thread numbering in 3-D blocks, partial warps, every shuffle mode and width,
// __syncwarp ordering, dynamic shared memory). Plain CUDA: built by tests/simt/build.py like the
// csrc/cuda files, never by the project's build.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ddpm_fast_common.h"

namespace {

// The lanes of the calling thread's warp that exist (the last warp of a block may be partial).
__device__ unsigned warp_mask(int linear, int threads) {
  const int first = linear / 32 * 32;
  const int n = threads - first < 32 ? threads - first : 32;
  return n == 32 ? 0xffffffffu : (1u << n) - 1u;
}

// out[linear] = (threadIdx.x, .y, .z, lane 0's linear id read by a shuffle).
__global__ void numbering_kernel(int* out) {
  const int threads = blockDim.x * blockDim.y * blockDim.z;
  const int linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int lane0 = __shfl_sync(warp_mask(linear, threads), linear, 0);
  int* o = out + 4 * (blockIdx.x * threads + linear);
  o[0] = threadIdx.x;
  o[1] = threadIdx.y;
  o[2] = threadIdx.z;
  o[3] = lane0;
}

// out[t] = the shuffle `mode` (0 idx, 1 up, 2 down, 3 xor) of value 100 * t + 7 over a full mask.
__global__ void shuffle_kernel(int* out, int mode, int arg, int width) {
  const int t = threadIdx.x;
  const int v = 100 * t + 7;
  int r = 0;
  switch (mode) {
    case 0: r = __shfl_sync(0xffffffffu, v, arg, width); break;
    case 1: r = __shfl_up_sync(0xffffffffu, v, arg, width); break;
    case 2: r = __shfl_down_sync(0xffffffffu, v, arg, width); break;
    default: r = __shfl_xor_sync(0xffffffffu, v, arg, width); break;
  }
  out[t] = r;
}

// Each thread writes s[t], then (sync: 0 none, 1 __syncwarp, 2 __syncthreads) reads s[partner]:
// partner t ^ 1 (same warp) or t ^ 32 (the other warp) as `other_warp` says.
__global__ void exchange_kernel(float* out, int sync, bool other_warp) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  s[t] = static_cast<float>(t);
  if (sync == 1) __syncwarp();
  if (sync == 2) __syncthreads();
  out[t] = s[other_warp ? t ^ 32 : t ^ 1];
}

// Thread t copies buf[t] after writing it: buf holds `smem` bytes of dynamic shared memory.
__global__ void dynamic_kernel(float* out) {
  extern __shared__ float buf[];
  const int t = threadIdx.x;
  buf[t] = 2.0f * t;
  out[t] = buf[t];
}

// One warp: D (16 x 8 fp32) = A (16 x 16 fp16, row-major) B (16 x 8 fp16, row-major in memory) + C
// through the m16n8k16 fragments (layouts: tests/simt/simt_mma.h).
__device__ __forceinline__ void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                             const float c[4]) {
#if defined(SIMT_HARNESS)
  ::simt::mma_m16n8k16_f32_f16(d, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
#endif
}

__device__ __forceinline__ uint32_t pack_halves(at::Half lo, at::Half hi) {
  return static_cast<uint32_t>(lo.x) | static_cast<uint32_t>(hi.x) << 16;
}

__global__ void mma_kernel(const at::Half* A, const at::Half* B, const float* C, float* D) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  const uint32_t a[4] = {pack_halves(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]),
                         pack_halves(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]),
                         pack_halves(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]),
                         pack_halves(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9])};
  const uint32_t b[2] = {pack_halves(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]),
                         pack_halves(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g])};
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
  mma_m16n8k16(d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
}

at::Tensor mma(const at::Tensor& A, const at::Tensor& B, const at::Tensor& C) {
  at::Tensor D = at::full({16, 8}, -1.0f, C.options());
  mma_kernel<<<1, 32>>>(A.const_data_ptr<at::Half>(), B.const_data_ptr<at::Half>(), C.const_data_ptr<float>(),
                        D.mutable_data_ptr<float>());
  return D;
}

at::Tensor numbering(int64_t bx, int64_t by, int64_t bz, int64_t blocks) {
  at::Tensor out = at::full({blocks * bx * by * bz, 4}, -1, at::kInt);
  numbering_kernel<<<dim3(blocks), dim3(bx, by, bz), 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<int>());
  return out;
}

at::Tensor shuffle(int64_t mode, int64_t arg, int64_t width) {
  at::Tensor out = at::full({64}, -1, at::kInt);
  shuffle_kernel<<<1, 64>>>(out.data_ptr<int>(), mode, arg, width);
  return out;
}

at::Tensor exchange(int64_t sync, bool other_warp) {
  at::Tensor out = at::full({64}, -1.0f, at::kFloat);
  exchange_kernel<<<1, 64>>>(out.data_ptr<float>(), sync, other_warp);
  return out;
}

at::Tensor dynamic(int64_t threads, int64_t smem_floats) {
  at::Tensor out = at::full({threads}, -1.0f, at::kFloat);
  dynamic_kernel<<<1, threads, smem_floats * sizeof(float)>>>(out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("numbering", &numbering);
  m.impl("shuffle", &shuffle);
  m.impl("exchange", &exchange);
  m.impl("dynamic", &dynamic);
  m.impl("mma", &mma);
}
