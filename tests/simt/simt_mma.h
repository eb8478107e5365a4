// SIMT test harness: warp-level matrix multiply-accumulate emulated from the PTX ISA's fragment
// layouts, for tensor-core kernels whose `mma.sync` sits in a small inline wrapper:
//
//   #if defined(SIMT_HARNESS)
//     ::simt::mma_m16n8k16_f32_f16(d, a, b, c);
//   #else
//     asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 ..." ...);
//   #endif
//
// mma.m16n8k16 with .f16 A/B and .f32 C/D (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
// floating point type"), lane = 4 * groupID + t:
//   A (16 x 16, row):  a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
//                      a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   B (16 x 8, col):   b[0] = B[2t, 2t+1][g]      b[1] = B[2t+8, 2t+9][g]
//   C, D (16 x 8):     c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// Each 32-bit register holds two fp16 values, the lower index in the low half. All 32 lanes of
// the warp must call it (it gathers the fragments with shuffles). Products are exact in fp32 and
// summed in k order (the hardware's order is unspecified: compare with a tolerance).
#pragma once

#include <c10/util/Half.h>

#include <cstdint>

namespace simt {

inline float half_bits_to_float(uint32_t bits16) {
  return static_cast<float>(c10::Half(static_cast<uint16_t>(bits16), c10::Half::from_bits()));
}

inline void mma_m16n8k16_f32_f16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  float A[16][16], B[16][8];
  for (int src = 0; src < 32; ++src) {
    const int g = src / 4, t = src % 4;
    uint32_t ra[4], rb[2];
    for (int i = 0; i < 4; ++i) ra[i] = __shfl_sync(0xffffffffu, a[i], src);
    for (int i = 0; i < 2; ++i) rb[i] = __shfl_sync(0xffffffffu, b[i], src);
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = half_bits_to_float(ra[0] >> (16 * h) & 0xffffu);
      A[g + 8][2 * t + h] = half_bits_to_float(ra[1] >> (16 * h) & 0xffffu);
      A[g][2 * t + 8 + h] = half_bits_to_float(ra[2] >> (16 * h) & 0xffffu);
      A[g + 8][2 * t + 8 + h] = half_bits_to_float(ra[3] >> (16 * h) & 0xffffu);
      B[2 * t + h][g] = half_bits_to_float(rb[0] >> (16 * h) & 0xffffu);
      B[2 * t + 8 + h][g] = half_bits_to_float(rb[1] >> (16 * h) & 0xffffu);
    }
  }
  const int lane = static_cast<int>(thread_idx().x + block_dim().x * (thread_idx().y + block_dim().y * thread_idx().z)) % 32;
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    d[i] = acc;
  }
}

}  // namespace simt
