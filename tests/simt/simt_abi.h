// SIMT test harness: what the kernel side (simt.h, compiled into each kernel build) and the
// runtime (simt_runtime.cpp) share: CUDA's index types and the runtime's entry points.
#pragma once

#include <cstddef>
#include <cstdint>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

namespace simt {

uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
void sync_block(int line);
void sync_warp(unsigned mask, int line);
// Shuffles: the calling lane's 64-bit word in, the source lane's word out (see CUDA's rules).
enum ShflMode : int { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflXor = 3 };
uint64_t shuffle(unsigned mask, uint64_t value, int mode, int arg, int width, int line);
// Storage of a per-block __shared__ variable (`key` names it: one per declaration).
void* static_shared(const char* key, size_t bytes, size_t align);
void* dynamic_shared();
// Host side of a launch: runs `body(ctx)` for every thread of every block.
using ThreadBody = void (*)(void* ctx);
void run_grid(const char* name, const void* fn, dim3 grid, dim3 block, size_t smem, ThreadBody body,
              void* ctx);
int device_attribute(int attr);
void set_func_max_dynamic_smem(const void* fn, int bytes);
bool planted(int which);  // test-selected planted bugs (tests/test_simt.py); false by default
// Atomics run without a race check (one fiber at a time: plain read-modify-write).
void atomic_begin();
void atomic_end();

}  // namespace simt
