// Where the CPU kernel's noise draws (csrc/cpu/diffusion_step.cpp's portable fill,
// csrc/cpu/philox_avx2.h, philox_avx512.h) put their normals: a draw produces whole groups of
// Philox blocks (4 elements each, block i // 4 for element i), so the elements first .. first +
// count - 1 of a sample go straight to z when they start on a block and fill whole groups, and
// through the staging buffer tmp (count + 72 floats: a group is at most 64 normals) otherwise.
#pragma once

#include <cstdint>
#include <cstring>

namespace ddpm_fast {

struct NormalsStaging {
  int64_t block0;  // the first block drawn
  int64_t blocks;  // how many blocks cover the elements
  int64_t offset;  // the first element's lane in block0
  float* dst;      // where normal 4 (block - block0) + lane goes: z or tmp

  // group_blocks: the blocks one step of the draw produces.
  inline NormalsStaging(int64_t first, int64_t count, int64_t group_blocks, float* z, float* tmp)
      : block0(first >> 2),
        blocks(((first & 3) + count + 3) >> 2),
        offset(first & 3),
        dst(offset == 0 && count % (4 * group_blocks) == 0 ? z : tmp) {}

  // Moves staged normals to z (nothing to do when they were drawn there).
  inline void finish(float* z, int64_t count) const {
    if (dst != z) std::memcpy(z, dst + offset, count * sizeof(float));
  }
};

}  // namespace ddpm_fast
