// SIMD values and in-kernel noise of the CPU kernels of ddpm_fast::diffusion_step and its backward
// (csrc/cpu/diffusion_step.cpp, diffusion_step_backward.cpp): GCC vector extensions of the register
// width of the instruction set a calling function is compiled for, the overloads the shared
// per-element math (csrc/include/diffusion_step_math.h, diffusion_step_backward_math.h) needs for
// them, the noise draw of a run of elements (portable, AVX2 or AVX-512 Philox), aligned scratch,
// and the split of a call into work items run for the widest instruction set (run_parallel).
// Everything is always inlined into the ISA-specific callers (no vector value crosses an ABI
// boundary).
#pragma once
// Vector-extension values cross no ABI boundary (everything is always inlined): GCC's notes on how
// their calling convention depends on -mavx* do not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu_isa.h"
#include "ddpm_fast_common.h"
#include "diffusion_step_args.h"
#include "diffusion_step_math.h"
#include "normals_staging.h"
#include "philox.h"
#include "philox_avx2.h"
#include "philox_avx512.h"

namespace ddpm_fast {
namespace {

#define DDPM_CPU_INLINE inline __attribute__((always_inline))

// ---- SIMD values: GCC vector extensions of kBytes (the register width of the instruction set the
// calling function is compiled for: 64 AVX-512, 32 AVX2, 16 SSE2) ----------------------------------
template <int kBytes>
struct VecTypes;
#define DDPM_VEC_TYPES(bytes)                                      \
  template <>                                                      \
  struct VecTypes<bytes> {                                         \
    typedef float F __attribute__((vector_size(bytes)));           \
    typedef int32_t I __attribute__((vector_size(bytes)));         \
  };
DDPM_VEC_TYPES(16)
DDPM_VEC_TYPES(32)
DDPM_VEC_TYPES(64)
#undef DDPM_VEC_TYPES

template <int kBytes>
struct Vec {
  using F = typename VecTypes<kBytes>::F;
  using I = typename VecTypes<kBytes>::I;
  static constexpr int kLanes = kBytes / 4;
  F v;

  DDPM_CPU_INLINE Vec() = default;
  DDPM_CPU_INLINE Vec(F a) : v(a) {}              // NOLINT(google-explicit-constructor)
  DDPM_CPU_INLINE Vec(float s) : v(F{} + s) {}    // NOLINT(google-explicit-constructor): broadcast
  // The first n lanes from p (n <= kLanes), zeros after.
  static DDPM_CPU_INLINE Vec load(const float* p, int n) {
    Vec r;
    if (n == kLanes) {
      std::memcpy(&r.v, p, kBytes);
    } else {
      float lanes[kLanes] = {};
      std::memcpy(lanes, p, n * sizeof(float));
      std::memcpy(&r.v, lanes, kBytes);
    }
    return r;
  }
  DDPM_CPU_INLINE void store(float* p, int n) const {
    if (n == kLanes) {
      std::memcpy(p, &v, kBytes);
    } else {
      float lanes[kLanes];
      std::memcpy(lanes, &v, kBytes);
      std::memcpy(p, lanes, n * sizeof(float));
    }
  }
  // Lanes n.. set to zero.
  DDPM_CPU_INLINE Vec first(int n) const {
    if (n == kLanes) return *this;
    I lane{};
    for (int l = 0; l < kLanes; ++l) lane[l] = l;
    return Vec(lane < n ? v : F{});
  }
  DDPM_CPU_INLINE float sum() const {
    float s = 0.0f;
    for (int l = 0; l < kLanes; ++l) s += v[l];
    return s;
  }
};

#define DDPM_VEC_BINARY(op)                                                                   \
  template <int B>                                                                            \
  DDPM_CPU_INLINE Vec<B> operator op(Vec<B> a, Vec<B> b) {                                    \
    return Vec<B>(a.v op b.v);                                                                \
  }                                                                                           \
  template <int B>                                                                            \
  DDPM_CPU_INLINE Vec<B> operator op(Vec<B> a, float b) {                                     \
    return Vec<B>(a.v op b);                                                                  \
  }                                                                                           \
  template <int B>                                                                            \
  DDPM_CPU_INLINE Vec<B> operator op(float a, Vec<B> b) {                                     \
    return Vec<B>(a op b.v);                                                                  \
  }
DDPM_VEC_BINARY(+)
DDPM_VEC_BINARY(-)
DDPM_VEC_BINARY(*)
DDPM_VEC_BINARY(/)
#undef DDPM_VEC_BINARY

// The helpers step::step_element needs (found by argument-dependent lookup).
// e^x for |x| < 87 as 2^n e^r, |r| <= ln(2) / 2, Taylor to r^7 (relative error ~1e-7).
template <int B>
DDPM_CPU_INLINE Vec<B> step_exp(Vec<B> a) {
  using F = typename Vec<B>::F;
  using I = typename Vec<B>::I;
  F x = a.v < -87.0f ? F{} - 87.0f : a.v;
  x = x > 88.0f ? F{} + 88.0f : x;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: (t + kRound) - kRound rounds t to an integer
  const F n = (x * 1.44269504088896341f + kRound) - kRound;
  const F r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  const F p =
      1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6.0f + r * (1.0f / 24.0f + r * (1.0f / 120.0f +
                                                                               r * (1.0f / 720.0f +
                                                                                    r * (1.0f / 5040.0f)))))));
  const I scale = (__builtin_convertvector(n, I) + 127) << 23;
  return Vec<B>(p * (F)scale);
}

// Like torch.clamp: NaN stays NaN.
template <int B>
DDPM_CPU_INLINE Vec<B> step_clamp(Vec<B> a, float lo, float hi) {
  using F = typename Vec<B>::F;
  const F r = a.v < lo ? F{} + lo : a.v;
  return Vec<B>(r > hi ? F{} + hi : r);
}

// g where lo < a < hi, else 0 (a bound or NaN: 0): the gradient torch.clamp passes back.
template <int B>
DDPM_CPU_INLINE Vec<B> step_clamp_pass(Vec<B> a, float lo, float hi, Vec<B> g) {
  using F = typename Vec<B>::F;
  return Vec<B>((a.v > lo) & (a.v < hi) ? g.v : F{});
}

// A __builtin_shuffle mask over two vectors a, b of L lanes: the `half` (0 low, 1 high) of their
// interleaving in runs of `run` lanes: a[0..run), b[0..run), a[run..2 run), b[run..2 run), ...
template <int B>
constexpr typename VecTypes<B>::I zip_mask(int half, int run) {
  constexpr int L = B / 4;
  typename VecTypes<B>::I mask{};
  for (int j = 0; j < L; ++j) {
    const int group = j / (2 * run), within = j % (2 * run);
    mask[j] = (within < run ? 0 : L) + half * (L / 2) + group * run + within % run;
  }
  return mask;
}

// Standard normals of elements first .. first + count - 1 of a sample (any alignment) into z;
// tmp holds count + 72 floats (csrc/cpu/normals_staging.h). B: the SIMD width in bytes (L = B / 4
// Philox blocks per iteration: their 4 outputs are computed lane-wise, then interleaved into
// element order with 8 shuffles). The AVX2 and AVX-512 kernels use csrc/cpu/philox_avx2.h and
// philox_avx512.h instead.
template <int B>
DDPM_CPU_INLINE void fill_normals(philox::Key key, philox::StepWords st, int64_t first, int64_t count, float* z,
                                  float* tmp) {
  constexpr int L = B / 4;
  using F = typename VecTypes<B>::F;
  const NormalsStaging at(first, count, L, z, tmp);
  for (int64_t j0 = 0; j0 < at.blocks; j0 += L) {
    uint32_t r[4][L];  // word k of the blocks j0 .. j0 + L - 1
    for (int l = 0; l < L; ++l) {
      uint32_t c[4] = {static_cast<uint32_t>(at.block0 + j0 + l), st.lo, st.hi, philox::kNoiseStream};
      philox::philox4x32_10(c, key);
      for (int k = 0; k < 4; ++k) r[k][l] = c[k];
    }
    float z0[L], z1[L], z2[L], z3[L];  // lane k of the blocks j0 .. j0 + L - 1
    for (int l = 0; l < L; ++l) {
      philox::box_muller(r[0][l], r[1][l], z0[l], z1[l]);
      philox::box_muller(r[2][l], r[3][l], z2[l], z3[l]);
    }
    F a, b, c, d;
    std::memcpy(&a, z0, B);
    std::memcpy(&b, z1, B);
    std::memcpy(&c, z2, B);
    std::memcpy(&d, z3, B);
    const F ab_lo = __builtin_shuffle(a, b, zip_mask<B>(0, 1)), ab_hi = __builtin_shuffle(a, b, zip_mask<B>(1, 1));
    const F cd_lo = __builtin_shuffle(c, d, zip_mask<B>(0, 1)), cd_hi = __builtin_shuffle(c, d, zip_mask<B>(1, 1));
    const F out[4] = {__builtin_shuffle(ab_lo, cd_lo, zip_mask<B>(0, 2)), __builtin_shuffle(ab_lo, cd_lo, zip_mask<B>(1, 2)),
                      __builtin_shuffle(ab_hi, cd_hi, zip_mask<B>(0, 2)), __builtin_shuffle(ab_hi, cd_hi, zip_mask<B>(1, 2))};
    std::memcpy(at.dst + 4 * j0, out, 4 * B);
  }
  at.finish(z, count);
}

// n floats aligned to a cache line (64 bytes), so that full-width SIMD loads and stores of the
// scratch never straddle two lines (malloc promises 16-byte alignment).
class AlignedFloats {
 public:
  explicit AlignedFloats(int64_t n)
      : data_(static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>((std::max<int64_t>(n, 1) + 15) / 16 * 64)))) {
    DDPM_CHECK(data_ != nullptr, "out of memory for ", n, " floats of scratch");
  }
  ~AlignedFloats() { std::free(data_); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  float* data() const { return data_; }

 private:
  float* data_;
};

// Elements per noise draw: run_elements draws the noise of kNoiseRun elements into an L1-resident
// buffer (4 KB at 1024), then steps them.
constexpr int64_t kNoiseRun = 1024;

// Scratch of one thread: the noise of a run, its Philox staging, and per-mode buffers.
struct Scratch {
  AlignedFloats z, tmp, buf;
  explicit Scratch(int64_t extra = 0) : z(kNoiseRun), tmp(kNoiseRun + 72), buf(extra) {}
};

// Standard normals of elements first .. first + count - 1 (count <= kNoiseRun) of the sample with
// key `key` into z, with the widest generator of the instruction set of B.
template <int B>
DDPM_CPU_INLINE void draw_normals(philox::Key key, philox::StepWords st, int64_t first, int64_t count, Scratch& s) {
  if constexpr (B == 64) {
    philox_avx512::fill_normals_avx512(key, st, first, count, s.z.data(), s.tmp.data());
  } else if constexpr (B == 32) {
    philox_avx2::fill_normals_avx2(key, st, first, count, s.z.data(), s.tmp.data());
  } else {
    fill_normals<B>(key, st, first, count, s.z.data(), s.tmp.data());
  }
}

// The inputs of a CPU step call (forward or backward): pointers into float32 contiguous tensors,
// the options and geometry. Each kernel's Call derives from it.
struct StepInputs {
  step::Options o;
  step::Geometry g;
  const float* x;
  const float* model_output;
  const float* noise;        // given noise, or null
  const float* grad;         // guidance gradient, or null
  const step::Coefs* coefs;  // (B,) rows, with derived values
  const int64_t* seed;       // (B,) when the noise is drawn, else null
  philox::StepWords step;
};

// The CPU step kernels' work: Kernels<B> (B: the SIMD width in bytes) has the always-inlined
//   static void items_plain / items_pixel / items_sample(const Call&, int64_t begin, int64_t end)
// for the projection modes, over work items: (sample, chunk of kChunk elements) without
// projection, (sample, block of kPixels pixels) for "pixel", samples for "sample". run_parallel
// compiles them for AVX-512, AVX2+FMA and the baseline, picks the widest the CPU allows once
// (csrc/include/cpu_isa.h: DDPM_FAST_CPU_ISA caps it) and runs the items under at::parallel_for.
constexpr int64_t kChunk = 4096;  // elements per work item (a multiple of every lane count)
constexpr int64_t kPixels = 256;  // pixels per work item of the pixel projection

template <class K, class Call>
DDPM_CPU_INLINE void run_items(const Call& a, int64_t begin, int64_t end) {
  switch (a.o.projection) {
    case step::kProjectPixel:
      K::items_pixel(a, begin, end);
      break;
    case step::kProjectSample:
      K::items_sample(a, begin, end);
      break;
    default:
      K::items_plain(a, begin, end);
  }
}

template <template <int> class Kernels, class Call>
struct IsaDispatch {
  __attribute__((target("arch=x86-64-v4,prefer-vector-width=512"))) static void avx512(const Call& a, int64_t begin,
                                                                                       int64_t end) {
    run_items<Kernels<64>>(a, begin, end);
  }
  __attribute__((target("arch=x86-64-v3"))) static void avx2(const Call& a, int64_t begin, int64_t end) {
    run_items<Kernels<32>>(a, begin, end);
  }
  static void baseline(const Call& a, int64_t begin, int64_t end) { run_items<Kernels<16>>(a, begin, end); }

  using Run = void (*)(const Call&, int64_t, int64_t);
  static Run pick() {
    switch (cpu_isa::level()) {
      case cpu_isa::kAvx512:
        return avx512;
      case cpu_isa::kAvx2:
        return avx2;
      default:
        return baseline;
    }
  }
};

template <template <int> class Kernels, class Call>
void run_parallel(const Call& a) {
  if (a.g.batch == 0 || a.g.numel == 0) return;
  static const typename IsaDispatch<Kernels, Call>::Run run = IsaDispatch<Kernels, Call>::pick();  // NOLINT
  int64_t items;
  switch (a.o.projection) {
    case step::kProjectPixel:
      items = a.g.batch * ((a.g.pixels + kPixels - 1) / kPixels);
      break;
    case step::kProjectSample:
      items = a.g.batch;
      break;
    default:
      items = a.g.batch * ((a.g.numel + kChunk - 1) / kChunk);
  }
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) { run(a, begin, end); });
}

}  // namespace
}  // namespace ddpm_fast
