// Self-test kernels of the SIMT harness (tests/test_simt.py): CUDA semantics the project's kernels
// use only in part (thread numbering in 3-D blocks, partial warps, every shuffle mode and width,
// __syncwarp ordering, dynamic shared memory) and the emulated sm_80 instructions of
// tests/simt/simt_mma.h (mma.m16n8k16 fp16/bf16, ldmatrix, cp.async groups). Plain CUDA: built
// by tests/simt/build.py like the csrc/cuda files, never by the project's build.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ddpm_fast_common.h"

#include <cstdint>
#include <type_traits>

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

// One warp: D (16 x 8 fp32) = A (16 x 16, row-major) B (16 x 8, row-major in memory) + C through
// the m16n8k16 fragments (layouts: tests/simt/simt_mma.h), fp16 or bf16 inputs.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                             const float c[4]) {
#if defined(SIMT_HARNESS)
  if constexpr (std::is_same_v<T, at::Half>) {
    ::simt::mma_m16n8k16_f32_f16(d, a, b, c);
  } else {
    ::simt::mma_m16n8k16_f32_bf16(d, a, b, c);
  }
#else
  if constexpr (std::is_same_v<T, at::Half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
  }
#endif
}

template <typename T>
__device__ __forceinline__ uint32_t pack_halves(T lo, T hi) {
  return static_cast<uint32_t>(lo.x) | static_cast<uint32_t>(hi.x) << 16;
}

template <typename T>
__global__ void mma_kernel(const T* A, const T* B, const float* C, float* D) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  const uint32_t a[4] = {pack_halves(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]),
                         pack_halves(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]),
                         pack_halves(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]),
                         pack_halves(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9])};
  const uint32_t b[2] = {pack_halves(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]),
                         pack_halves(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g])};
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
  mma_m16n8k16<T>(d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
}

at::Tensor mma(const at::Tensor& A, const at::Tensor& B, const at::Tensor& C) {
  at::Tensor D = at::full({16, 8}, -1.0f, C.options());
  if (A.scalar_type() == at::kHalf) {
    mma_kernel<at::Half><<<1, 32>>>(A.const_data_ptr<at::Half>(), B.const_data_ptr<at::Half>(),
                                    C.const_data_ptr<float>(), D.mutable_data_ptr<float>());
  } else {
    mma_kernel<at::BFloat16><<<1, 32>>>(A.const_data_ptr<at::BFloat16>(), B.const_data_ptr<at::BFloat16>(),
                                        C.const_data_ptr<float>(), D.mutable_data_ptr<float>());
  }
  return D;
}

// ldmatrix .xN (.trans): shared memory holds 4 matrices of 8 rows of 8 16-bit values (rows 48 bytes
// apart, 16-byte aligned), element (j, r, c) = 256 j + 16 r + c; lane 8j + r gives the address of
// row r of matrix j. out[lane][j] = register j.
template <int N, bool TRANS>
__device__ __forceinline__ void ldmatrix(uint32_t r[N], const uint16_t* p) {
#if defined(SIMT_HARNESS)
  ::simt::ldmatrix<N, TRANS>(r, p);
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  if constexpr (N == 1 && !TRANS) asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(a));
  if constexpr (N == 1 && TRANS) asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(a));
  if constexpr (N == 2 && !TRANS) asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  if constexpr (N == 2 && TRANS) asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  if constexpr (N == 4 && !TRANS) asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  if constexpr (N == 4 && TRANS) asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#endif
}

constexpr int kLdsmRow = 24;  // elements between rows (48 bytes)

// 16-byte aligned shared arrays as structs (alignas on the type: the harness rewrites the shared
// declaration itself, which takes no __align__ in a static one)
struct alignas(16) LdsmRows {
  uint16_t v[32 * kLdsmRow];
};
template <int N>
struct alignas(16) Chunks {
  int v[N];
};

template <int N, bool TRANS>
__global__ void ldmatrix_kernel(int64_t* out, int misalign) {
  __shared__ LdsmRows rows;
  uint16_t* s = rows.v;
  const int lane = threadIdx.x;
  for (int c = 0; c < kLdsmRow; ++c) s[lane * kLdsmRow + c] = static_cast<uint16_t>(256 * (lane / 8) + 16 * (lane % 8) + c);
  __syncwarp();
  uint32_t r[N];
  ldmatrix<N, TRANS>(r, s + lane * kLdsmRow + misalign);
  for (int j = 0; j < N; ++j) out[lane * 4 + j] = r[j];
}

at::Tensor ldmatrix_op(int64_t n, bool trans, int64_t misalign) {
  at::Tensor out = at::full({32, 4}, -1, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  const int m = static_cast<int>(misalign);
  if (n == 1) trans ? ldmatrix_kernel<1, true><<<1, 32>>>(o, m) : ldmatrix_kernel<1, false><<<1, 32>>>(o, m);
  if (n == 2) trans ? ldmatrix_kernel<2, true><<<1, 32>>>(o, m) : ldmatrix_kernel<2, false><<<1, 32>>>(o, m);
  if (n == 4) trans ? ldmatrix_kernel<4, true><<<1, 32>>>(o, m) : ldmatrix_kernel<4, false><<<1, 32>>>(o, m);
  return out;
}

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
#if defined(SIMT_HARNESS)
  ::simt::cp_async_16(dst, src, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src), "r"(src_bytes) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(SIMT_HARNESS)
  ::simt::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(SIMT_HARNESS)
  ::simt::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// Lane t copies src chunk t (16 bytes, its first t % 17 bytes; the rest zero-filled) into shared
// chunk 2t in group 0 and chunk 32 + t (all 16 bytes) into chunk 2t + 1 in group 1, and reads both
// back (own chunks only: no race) before any wait, after wait_group 1 and after wait_group 0:
// out[t][snapshot][chunk][word].
__global__ void cp_async_kernel(const int* src, int* out) {
  __shared__ Chunks<256> chunks;
  int* s = chunks.v;
  const int t = threadIdx.x;
  cp_async_16(s + 8 * t, src + 4 * t, t % 17);
  cp_async_commit();
  cp_async_16(s + 8 * t + 4, src + 4 * (32 + t), 16);
  cp_async_commit();
  int* o = out + t * 24;
  for (int i = 0; i < 8; ++i) o[i] = s[8 * t + i];
  cp_async_wait<1>();
  for (int i = 0; i < 8; ++i) o[8 + i] = s[8 * t + i];
  cp_async_wait<0>();
  for (int i = 0; i < 8; ++i) o[16 + i] = s[8 * t + i];
}

at::Tensor cp_async(const at::Tensor& src) {
  at::Tensor out = at::full({32, 3, 2, 4}, 7, at::kInt);
#if defined(SIMT_HARNESS)
  ::simt::cp_async_new_launch();
#endif
  cp_async_kernel<<<1, 32>>>(src.const_data_ptr<int>(), out.mutable_data_ptr<int>());
  return out;
}

// Thread 32 (warp 1) reads shared chunk 0, then (sync: __syncthreads) thread 0 copies into it with
// cp.async: without the barrier the copy's store races with the read.
__global__ void cp_async_race_kernel(const int* src, int* out, bool sync) {
  __shared__ Chunks<4> chunk;
  int* s = chunk.v;
  const int t = threadIdx.x;
  if (t == 0) s[0] = s[1] = s[2] = s[3] = 5;
  __syncthreads();
  if (t == 32) out[0] = s[0];
  if (sync) __syncthreads();
  if (t == 0) {
    cp_async_16(s, src, 16);
    cp_async_commit();
    cp_async_wait<0>();
    out[1] = s[0];
  }
}

at::Tensor cp_async_race(const at::Tensor& src, bool sync) {
  at::Tensor out = at::full({2}, -1, at::kInt);
#if defined(SIMT_HARNESS)
  ::simt::cp_async_new_launch();
#endif
  cp_async_race_kernel<<<1, 64>>>(src.const_data_ptr<int>(), out.mutable_data_ptr<int>(), sync);
  return out;
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
  m.impl("ldmatrix", &ldmatrix_op);
  m.impl("cp_async", &cp_async);
  m.impl("cp_async_race", &cp_async_race);
}
