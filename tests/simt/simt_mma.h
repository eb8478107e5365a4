// SIMT test harness: the warp-level tensor-core instructions of sm_80, emulated from the PTX ISA's
// fragment layouts, for kernels whose PTX sits in small inline wrappers:
//
//   #if defined(SIMT_HARNESS)
//     ::simt::mma_m16n8k16_f32_f16(d, a, b, c);
//   #else
//     asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 ..." ...);
//   #endif
//
// mma.m16n8k16 with .f16 / .bf16 A/B and .f32 C/D (PTX ISA, "Matrix Fragments for mma.m16n8k16
// with floating point type"), lane = 4 * groupID + t:
//   A (16 x 16, row):  a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
//                      a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   B (16 x 8, col):   b[0] = B[2t, 2t+1][g]      b[1] = B[2t+8, 2t+9][g]
//   C, D (16 x 8):     c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// Each 32-bit register holds two 16-bit values, the lower index in the low half. All 32 lanes of
// the warp must call it (it gathers the fragments with shuffles). Products are exact in fp32 and
// summed in k order (the hardware's order is unspecified: compare with a tolerance).
//
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16 (ldmatrix<N, TRANS>): lanes 8j..8j+7
// give the row addresses of matrix j (16-byte aligned rows of 8 16-bit values; the low 4 address
// bits are dropped, as an unaligned address is undefined on the GPU); register j of lane 4g + t
// gets row g, elements 2t, 2t+1 of matrix j (with .trans: elements [2t][g], [2t+1][g]). The rows
// are read by the receiving lane through the instrumented loads (bounds and race checks).
//
// cp.async.cg.shared.global 16 B with src-size, commit_group, wait_group N (cp_async_16,
// cp_async_commit, cp_async_wait): the issue reads the source (checked loads, src-size bytes, the
// rest zero) and stores a poison pattern (0xff bytes: NaN in fp16, bf16 and fp32) into the 16
// destination bytes; the data is stored when a wait_group retires the copy's group. Both stores
// are checked: a copy into a buffer others still read races at the issue, a read of a copy before
// its wait sees NaNs. The pending copies of a thread are kept per (block, thread) in static
// storage; the copies an earlier block or launch left pending are dropped (a launcher using cp.async
// calls simt::cp_async_new_launch() before each launch in harness builds, so that a launch the
// harness stopped at an error leaves nothing to a later one).
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace simt {

inline float half_bits_to_float(uint32_t bits16) {
  return static_cast<float>(c10::Half(static_cast<uint16_t>(bits16), c10::Half::from_bits()));
}

inline float bf16_bits_to_float(uint32_t bits16) {
  const uint32_t u = (bits16 & 0xffffu) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline int lane_in_warp() {
  return static_cast<int>(thread_idx().x + block_dim().x * (thread_idx().y + block_dim().y * thread_idx().z)) % 32;
}

template <float (*TO_FLOAT)(uint32_t)>
inline void mma_m16n8k16_f32(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  float A[16][16], B[16][8];
  for (int src = 0; src < 32; ++src) {
    const int g = src / 4, t = src % 4;
    uint32_t ra[4], rb[2];
    for (int i = 0; i < 4; ++i) ra[i] = __shfl_sync(0xffffffffu, a[i], src);
    for (int i = 0; i < 2; ++i) rb[i] = __shfl_sync(0xffffffffu, b[i], src);
    for (int h = 0; h < 2; ++h) {
      A[g][2 * t + h] = TO_FLOAT(ra[0] >> (16 * h) & 0xffffu);
      A[g + 8][2 * t + h] = TO_FLOAT(ra[1] >> (16 * h) & 0xffffu);
      A[g][2 * t + 8 + h] = TO_FLOAT(ra[2] >> (16 * h) & 0xffffu);
      A[g + 8][2 * t + 8 + h] = TO_FLOAT(ra[3] >> (16 * h) & 0xffffu);
      B[2 * t + h][g] = TO_FLOAT(rb[0] >> (16 * h) & 0xffffu);
      B[2 * t + 8 + h][g] = TO_FLOAT(rb[1] >> (16 * h) & 0xffffu);
    }
  }
  const int lane = lane_in_warp();
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    out[i] = acc;
  }
  for (int i = 0; i < 4; ++i) d[i] = out[i];  // d may alias c
}

inline void mma_m16n8k16_f32_f16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  mma_m16n8k16_f32<half_bits_to_float>(d, a, b, c);
}

inline void mma_m16n8k16_f32_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  mma_m16n8k16_f32<bf16_bits_to_float>(d, a, b, c);
}

template <int N, bool TRANS>
inline void ldmatrix(uint32_t r[], const void* row_address) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix .x1, .x2 or .x4");
  const uint64_t mine = reinterpret_cast<uintptr_t>(row_address) & ~uint64_t{15};
  const int lane = lane_in_warp();
  const int g = lane / 4, t = lane % 4;
  for (int j = 0; j < N; ++j) {
    if constexpr (TRANS) {
      const auto* r0 = reinterpret_cast<const uint16_t*>(__shfl_sync(0xffffffffu, mine, 8 * j + 2 * t));
      const auto* r1 = reinterpret_cast<const uint16_t*>(__shfl_sync(0xffffffffu, mine, 8 * j + 2 * t + 1));
      r[j] = static_cast<uint32_t>(r0[g]) | static_cast<uint32_t>(r1[g]) << 16;
    } else {
      const auto* row = reinterpret_cast<const uint16_t*>(__shfl_sync(0xffffffffu, mine, 8 * j + g));
      r[j] = static_cast<uint32_t>(row[2 * t]) | static_cast<uint32_t>(row[2 * t + 1]) << 16;
    }
  }
}

struct CpAsyncCopy {
  uint32_t* dst;
  uint32_t data[4];
  int64_t group;
};

// One thread's copies in flight, in static storage (a kernel thread's heap allocations would be
// untracked memory): copies[0..count) in issue order; groups are numbered in commit order,
// `open_group` is the one being filled, `oldest` the oldest not yet retired.
inline uint64_t& cp_async_launch() {
  static uint64_t launch = 0;
  return launch;
}

inline void cp_async_new_launch() { ++cp_async_launch(); }

struct CpAsyncThread {
  static constexpr int kMaxCopies = 64;
  uint64_t launch = 0;
  uint64_t block = ~uint64_t{0};
  int count = 0;
  int64_t open_group = 0, oldest = 0;
  CpAsyncCopy copies[kMaxCopies];

  void retire_oldest() {  // stores the oldest group's data, drops its copies
    int kept = 0;
    for (int i = 0; i < count; ++i) {
      if (copies[i].group == oldest) {
        volatile uint32_t* d = copies[i].dst;
        for (int w = 0; w < 4; ++w) d[w] = copies[i].data[w];  // checked stores
      } else {
        copies[kept++] = copies[i];
      }
    }
    count = kept;
    ++oldest;
  }
};

inline CpAsyncThread& cp_async_thread() {
  static CpAsyncThread threads[1024];
  const dim3 bd = block_dim(), gd = grid_dim();
  const uint3 t = thread_idx(), b = block_idx();
  const uint64_t block = b.x + static_cast<uint64_t>(gd.x) * (b.y + static_cast<uint64_t>(gd.y) * b.z);
  CpAsyncThread& st = threads[t.x + bd.x * (t.y + bd.y * t.z)];
  if (st.block != block || st.launch != cp_async_launch()) {  // a new block or launch: drop the old copies
    st.block = block;
    st.launch = cp_async_launch();
    st.count = 0;
    st.open_group = st.oldest = 0;
  }
  return st;
}

inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  CpAsyncThread& st = cp_async_thread();
  // Full: the oldest committed group completes early (the GPU may complete copies before a wait).
  while (st.count == CpAsyncThread::kMaxCopies && st.oldest < st.open_group) st.retire_oldest();
  if (st.count == CpAsyncThread::kMaxCopies) st.oldest = st.open_group, st.retire_oldest(), --st.oldest;
  CpAsyncCopy& copy = st.copies[st.count++];
  copy.dst = reinterpret_cast<uint32_t*>(reinterpret_cast<uintptr_t>(dst) & ~uintptr_t{15});
  copy.group = st.open_group;
  uint8_t bytes[16] = {};
  if (src_bytes > 0) {
    const auto* s = reinterpret_cast<const volatile uint8_t*>(reinterpret_cast<uintptr_t>(src) & ~uintptr_t{15});
    for (int i = 0; i < src_bytes && i < 16; ++i) bytes[i] = s[i];  // checked loads
  }
  std::memcpy(copy.data, bytes, sizeof bytes);
  volatile uint32_t* d = copy.dst;
  for (int i = 0; i < 4; ++i) d[i] = 0xffffffffu;  // checked stores: the poison until the wait
}

inline void cp_async_commit() { ++cp_async_thread().open_group; }

inline void cp_async_wait(int pending_groups) {
  CpAsyncThread& st = cp_async_thread();
  while (st.open_group - st.oldest > pending_groups) st.retire_oldest();
}

}  // namespace simt
