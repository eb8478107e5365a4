// CPU kernel of ddpm_fast::winograd_conv3x3: a 3x3 convolution (stride 1, padding 1, no dilation,
// one group) of a channels_last float32 image by Winograd's minimal filtering F(4x4, 3x3) (Lavin &
// Gray, "Fast Algorithms for Convolutional Neural Networks", 2015), with the bias and an optional
// residual `add` fused into the output.
//
// Each 4x4 output tile is A^T [ (G g G^T) .* (B^T d B) ] A of the tile's 6x6 input patch d (zero
// outside the image) and the 3x3 kernel g, points 0, +-1, +-2, inf. Per tile and input channel the
// input transform gives 36 values; the 36 (tile, Cin) x (Cin, Cout) products are GEMMs (this
// file's AVX-512 kernel where the CPU has it and Cout % 16 == 0, else BLAS's batched GEMM) against
// the transformed weight U = G g G^T, (36, Cin, Cout) or its column panels, computed once in
// float64 by the caller (ddpm_fast.fast_layers.winograd_weight); the output transform A^T m A,
// + bias + add, writes the 4x4 tile. That is 36 instead of 144 multiply-adds per tile, channel
// pair (4x fewer) for the GEMM; the transforms are additions over channel vectors.
//
// The tiles run in chunks (each chunk's transformed input and GEMM output stay in the cache);
// chunks are spread over at::parallel_for (a scratch buffer per thread). Transforms are vectorised
// along C (channels_last puts C innermost), compiled for AVX-512, AVX2 and the baseline (chosen at
// run time by cpu_isa.h).
//
// Accuracy: the transforms' constants reach 25 (B^T B) and 1/576 (G G^T); fp32 errors are about 20x
// those of a direct fp32 convolution (relative ~1e-6 of the output's scale instead of ~5e-8),
// which is why the caller uses this path only for float32 models and lets it be turned off.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DDPM_WINO_X86 1  // the AVX-512 / AVX2 builds of the transforms and the AVX-512 GEMM
#endif

// The vector helpers below are always inlined into functions compiled for the vector ISA: the ABI
// note GCC gives for their vector return values does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace ddpm_fast {
namespace {

constexpr int kTile = 4;             // output tile side (m)
constexpr int kPatch = 6;            // input patch side (m + r - 1)
constexpr int kPoints = 36;          // kPatch * kPatch
// Transformed input per chunk: 2 MB (tiles per chunk = this / (36 Cin)); 0.5-8 MB measured within
// noise of each other on a Zen 4 core, 0.5 MB slower at batch 1.
constexpr int64_t kChunkFloats = 1 << 19;

#define DDPM_WINO_INLINE inline __attribute__((always_inline))

// B^T applied to one patch column/row d0..d5 (6 values -> 6).
#define DDPM_WINO_BT(d0, d1, d2, d3, d4, d5, r)  \
  do {                                            \
    r[0] = 4.0f * d0 - 5.0f * d2 + d4;            \
    r[1] = d3 + d4 - 4.0f * (d1 + d2);            \
    r[2] = d4 - d3 + 4.0f * (d1 - d2);            \
    r[3] = d4 - d2 + 2.0f * (d3 - d1);            \
    r[4] = d4 - d2 + 2.0f * (d1 - d3);            \
    r[5] = 4.0f * d1 - 5.0f * d3 + d5;            \
  } while (0)

// A^T applied to m0..m5 (6 values -> 4).
#define DDPM_WINO_AT(m0, m1, m2, m3, m4, m5, r)                  \
  do {                                                            \
    const auto s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4; \
    r[0] = m0 + s12 + s34;                                        \
    r[1] = d12 + 2.0f * d34;                                      \
    r[2] = s12 + 4.0f * s34;                                      \
    r[3] = d12 + 8.0f * d34 + m5;                                 \
  } while (0)

// Floats between the matrices of consecutive points in the chunk buffers (36 matrices of `rows`
// x `cols`): the size plus 16 floats, so that the transforms' 36 concurrent row streams do not
// share cache sets (with power-of-two sizes they all did: 32 KB apart at 256 tiles x 32 channels).
inline int64_t point_stride(int64_t rows, int64_t cols) { return rows * cols + 16; }

struct Geometry {
  int64_t batch, height, width, cin, cout, tiles_h, tiles_w, tiles;
};

// The transforms work on V: float (one channel) or a GCC vector of channels (the target attribute
// of the calling function picks the instructions: 16 lanes = one zmm with AVX-512, two ymm with
// AVX2). Loads and stores are unaligned.
template <int L>
struct Lanes {
  typedef float type __attribute__((vector_size(sizeof(float) * L)));
};
template <>
struct Lanes<1> {
  typedef float type;
};

template <typename V>
DDPM_WINO_INLINE V load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
DDPM_WINO_INLINE void store(float* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// Input transform of the channels [c, c + lanes) of one tile: src[a * 6 + b] points at the patch
// pixel (a, b) (a zero row outside the image), dst[k] at the tile's row of V[k].
template <typename V>
DDPM_WINO_INLINE void input_block(const float* const* src, float* const* dst, int64_t c) {
  V t[kPoints];
  for (int b = 0; b < kPatch; ++b) {
    V r[kPatch];
    DDPM_WINO_BT(load<V>(src[0 * 6 + b] + c), load<V>(src[1 * 6 + b] + c), load<V>(src[2 * 6 + b] + c),
                 load<V>(src[3 * 6 + b] + c), load<V>(src[4 * 6 + b] + c), load<V>(src[5 * 6 + b] + c), r);
    for (int a = 0; a < kPatch; ++a) t[a * 6 + b] = r[a];
  }
  for (int a = 0; a < kPatch; ++a) {
    V r[kPatch];
    DDPM_WINO_BT(t[a * 6 + 0], t[a * 6 + 1], t[a * 6 + 2], t[a * 6 + 3], t[a * 6 + 4], t[a * 6 + 5], r);
    for (int b = 0; b < kPatch; ++b) store(dst[a * 6 + b] + c, r[b]);
  }
}

// Output transform of the channels [c, c + lanes) of one tile: m[k] points at the tile's row of
// M[k], out[p * 4 + q] at output pixel (p, q) (nullptr outside the image), add likewise (or all
// null); bias may be null.
template <typename V>
DDPM_WINO_INLINE void output_block(const float* const* m, float* const* out, const float* const* add,
                                   const float* bias, int64_t c) {
  V s[kTile * kPatch];
  for (int b = 0; b < kPatch; ++b) {
    V r[kTile];
    DDPM_WINO_AT(load<V>(m[0 * 6 + b] + c), load<V>(m[1 * 6 + b] + c), load<V>(m[2 * 6 + b] + c),
                 load<V>(m[3 * 6 + b] + c), load<V>(m[4 * 6 + b] + c), load<V>(m[5 * 6 + b] + c), r);
    for (int p = 0; p < kTile; ++p) s[p * 6 + b] = r[p];
  }
  const V shift = bias ? load<V>(bias + c) : V{} ;
  for (int p = 0; p < kTile; ++p) {
    V r[kTile];
    DDPM_WINO_AT(s[p * 6 + 0], s[p * 6 + 1], s[p * 6 + 2], s[p * 6 + 3], s[p * 6 + 4], s[p * 6 + 5], r);
    for (int q = 0; q < kTile; ++q) {
      float* o = out[p * 4 + q];
      if (o == nullptr) continue;
      const float* ad = add[p * 4 + q];
      store(o + c, ad != nullptr ? r[q] + shift + load<V>(ad + c) : r[q] + shift);
    }
  }
}

struct Args {
  Geometry g;
  const float* x;     // (N, H, W, Cin)
  const float* zeros; // Cin zeros
  const float* bias;  // (Cout,) or null
  const float* add;   // (N, H, W, Cout) or null
  float* y;           // (N, H, W, Cout)
};

// Tile t -> (n, ti, tj).
DDPM_WINO_INLINE void tile_origin(const Geometry& g, int64_t t, int64_t& n, int64_t& row, int64_t& col) {
  n = t / (g.tiles_h * g.tiles_w);
  const int64_t rem = t % (g.tiles_h * g.tiles_w);
  row = (rem / g.tiles_w) * kTile;
  col = (rem % g.tiles_w) * kTile;
}

// V[k][i][:] for the tiles t0 + i, i < count; v is (36, count, Cin).
template <int L>
DDPM_WINO_INLINE void input_transform(const Args& a, int64_t t0, int64_t count, float* v) {
  const Geometry& g = a.g;
  const float* src[kPoints];
  float* dst[kPoints];
  for (int64_t i = 0; i < count; ++i) {
    int64_t n, row, col;
    tile_origin(g, t0 + i, n, row, col);
    for (int p = 0; p < kPatch; ++p) {
      const int64_t r = row - 1 + p;
      for (int q = 0; q < kPatch; ++q) {
        const int64_t s = col - 1 + q;
        const bool inside = r >= 0 && r < g.height && s >= 0 && s < g.width;
        src[p * 6 + q] = inside ? a.x + ((n * g.height + r) * g.width + s) * g.cin : a.zeros;
      }
    }
    const int64_t stride = point_stride(count, g.cin);
    for (int k = 0; k < kPoints; ++k) dst[k] = v + k * stride + i * g.cin;
    int64_t c = 0;
    for (; c + L <= g.cin; c += L) input_block<typename Lanes<L>::type>(src, dst, c);
    for (; c < g.cin; ++c) input_block<float>(src, dst, c);
  }
}

// Output tiles t0 + i from M (36, count, Cout).
template <int L>
DDPM_WINO_INLINE void output_transform(const Args& a, int64_t t0, int64_t count, const float* m) {
  const Geometry& g = a.g;
  const float* rows[kPoints];
  float* out[kTile * kTile];
  const float* add[kTile * kTile];
  for (int64_t i = 0; i < count; ++i) {
    int64_t n, row, col;
    tile_origin(g, t0 + i, n, row, col);
    for (int p = 0; p < kTile; ++p) {
      for (int q = 0; q < kTile; ++q) {
        const bool inside = row + p < g.height && col + q < g.width;
        const int64_t offset = ((n * g.height + row + p) * g.width + col + q) * g.cout;
        out[p * 4 + q] = inside ? a.y + offset : nullptr;
        add[p * 4 + q] = inside && a.add ? a.add + offset : nullptr;
      }
    }
    const int64_t stride = point_stride(count, g.cout);
    for (int k = 0; k < kPoints; ++k) rows[k] = m + k * stride + i * g.cout;
    int64_t c = 0;
    for (; c + L <= g.cout; c += L) output_block<typename Lanes<L>::type>(rows, out, add, a.bias, c);
    for (; c < g.cout; ++c) output_block<float>(rows, out, add, a.bias, c);
  }
}

using Transform = void (*)(const Args&, int64_t, int64_t, float*);
using OutTransform = void (*)(const Args&, int64_t, int64_t, const float*);

void input_baseline(const Args& a, int64_t t0, int64_t count, float* v) { input_transform<4>(a, t0, count, v); }

void output_baseline(const Args& a, int64_t t0, int64_t count, const float* m) {
  output_transform<4>(a, t0, count, m);
}

// The calling thread's scratch buffer of at least `floats` floats: the transformed input and the
// GEMM output of a chunk (a few MB). Kept for the thread's lifetime and only grown: a fresh
// allocation per call came from mmap, and its page faults cost as much as the transforms.
float* scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) {
    buffer = std::vector<float>();  // free the old one first
    buffer.resize(floats);
  }
  return buffer.data();
}

#ifdef DDPM_WINO_X86
__attribute__((target("arch=x86-64-v4,prefer-vector-width=512"))) void input_avx512(const Args& a, int64_t t0,
                                                                                     int64_t count, float* v) {
  input_transform<16>(a, t0, count, v);
}
__attribute__((target("arch=x86-64-v3"))) void input_avx2(const Args& a, int64_t t0, int64_t count, float* v) {
  input_transform<8>(a, t0, count, v);
}

__attribute__((target("arch=x86-64-v4,prefer-vector-width=512"))) void output_avx512(const Args& a, int64_t t0,
                                                                                      int64_t count, const float* m) {
  output_transform<16>(a, t0, count, m);
}
__attribute__((target("arch=x86-64-v3"))) void output_avx2(const Args& a, int64_t t0, int64_t count,
                                                           const float* m) {
  output_transform<8>(a, t0, count, m);
}

// ---- The 36 GEMMs with AVX-512 -----------------------------------------------------------------
// m[k] (count x Cout) = v[k] (count x Cin) . u[k] (Cin x Cout), all row-major, for Cout a multiple
// of 16. BLAS's batched GEMM ran these thin products (count 16-64 rows at batch 1, Cin 32-64 in
// small models) at 45-60% of the core's FMA peak; a register block of 8 rows x 32 columns (16
// accumulators, the row values broadcast from memory) keeps the FMA unit busy and reads u's rows
// contiguously (u stays in L1/L2 across the row blocks).
template <int MR, int NV>
__attribute__((target("arch=x86-64-v4,prefer-vector-width=512"), always_inline)) inline void gemm_block(
    const float* a, const float* b, float* c, int64_t k_len, int64_t lda, int64_t ldb, int64_t ldc, int64_t jstride) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_len; ++k) {
    __m512 bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = _mm512_loadu_ps(b + k * ldb + j * jstride);
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + k]);
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
}

template <int NV>
__attribute__((target("arch=x86-64-v4,prefer-vector-width=512"))) void gemm_columns(
    const float* a, const float* b, float* c, int64_t rows, int64_t k_len, int64_t lda, int64_t ldb, int64_t ldc,
    int64_t jstride) {
  int64_t i = 0;
  for (; i + 8 <= rows; i += 8) gemm_block<8, NV>(a + i * lda, b, c + i * ldc, k_len, lda, ldb, ldc, jstride);
  switch (rows - i) {  // the last rows, one block
    case 7: gemm_block<7, NV>(a + i * lda, b, c + i * ldc, k_len, lda, ldb, ldc, jstride); break;
    case 6: gemm_block<6, NV>(a + i * lda, b, c + i * ldc, k_len, lda, ldb, ldc, jstride); break;
    case 5: gemm_block<5, NV>(a + i * lda, b, c + i * ldc, k_len, lda, ldb, ldc, jstride); break;
    case 4: gemm_block<4, NV>(a + i * lda, b, c + i * ldc, k_len, lda, ldb, ldc, jstride); break;
    case 3: gemm_block<3, NV>(a + i * lda, b, c + i * ldc, k_len, lda, ldb, ldc, jstride); break;
    case 2: gemm_block<2, NV>(a + i * lda, b, c + i * ldc, k_len, lda, ldb, ldc, jstride); break;
    case 1: gemm_block<1, NV>(a + i * lda, b, c + i * ldc, k_len, lda, ldb, ldc, jstride); break;
    default: break;
  }
}

// The 36 products of a chunk of `count` tiles: v (36, count, Cin), u (36, Cin, Cout), m (36,
// count, Cout). u's matrices are row-major, or with `panels` stored as (Cout / 16, Cin, 16): the
// row-major (Cin, 16) panels of 16 columns one after the other (fast_layers.winograd_panels). A
// register block reads two panels as two sequential streams; from row-major matrices it reads
// 128 bytes of every 4 * Cout, which is slower once u no longer sits in the cache (in a network,
// where each convolution's transformed weight comes from memory).
void gemm36_avx512(const float* v, const float* u, float* m, int64_t count, int64_t cin, int64_t cout, bool panels) {
  for (int k = 0; k < kPoints; ++k) {
    const float* a = v + k * point_stride(count, cin);
    const float* b = u + k * cin * cout;
    float* c = m + k * point_stride(count, cout);
    int64_t n = 0;
    const float* bn = b;  // columns [n, n + 32)
    const int64_t ldb = panels ? 16 : cout, jstride = panels ? 16 * cin : 16;
    for (; n + 32 <= cout; n += 32, bn += 2 * jstride) gemm_columns<2>(a, bn, c + n, count, cin, cin, ldb, cout, jstride);
    if (n < cout) gemm_columns<1>(a, bn, c + n, count, cin, cin, ldb, cout, jstride);  // cout % 32 == 16
  }
}
#endif  // DDPM_WINO_X86

void check_float_channels_last(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "winograd_conv3x3: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "winograd_conv3x3: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast),
              "winograd_conv3x3: ", name, " must be a 4-D channels_last tensor, got shape ", t.sizes(), " strides ",
              t.strides());
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& add) {
  check_float_channels_last(x, "x");
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                  ((weight.dim() == 3 && weight.size(0) == kPoints && weight.size(1) == x.size(1)) ||
                   (weight.dim() == 4 && weight.size(0) == kPoints && weight.size(2) == x.size(1))),
              "winograd_conv3x3: weight must be the contiguous float32 (36, Cin, Cout) transformed weight (or its ",
              "(36, Cout / 16, Cin, 16) column panels) with Cin = ", x.size(1),
              " (ddpm_fast.fast_layers.winograd_weight), got ", weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK(x.size(1) > 0, "winograd_conv3x3: x must have at least one channel, got shape ", x.sizes());
  const bool panels = weight.dim() == 4;
  TORCH_CHECK(!panels || (weight.size(3) == 16 && cpu_isa::level() == cpu_isa::kAvx512),
              "winograd_conv3x3: the column-panel weight layout needs AVX-512 (DDPM_FAST_CPU_ISA caps it here: ",
              cpu_isa::name(), ") and panels of 16 columns, got ", weight.sizes());
  Geometry g{};
  g.batch = x.size(0);
  g.cin = x.size(1);
  g.height = x.size(2);
  g.width = x.size(3);
  g.cout = panels ? weight.size(1) * 16 : weight.size(2);
  g.tiles_h = (g.height + kTile - 1) / kTile;
  g.tiles_w = (g.width + kTile - 1) / kTile;
  g.tiles = g.batch * g.tiles_h * g.tiles_w;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == g.cout && bias->is_contiguous(),
                "winograd_conv3x3: bias must be a contiguous float32 (", g.cout, ",) CPU tensor, got ",
                bias->scalar_type(), " ", bias->sizes());
  }
  at::Tensor y = at::empty({g.batch, g.cout, g.height, g.width}, x.options(), at::MemoryFormat::ChannelsLast);
  if (add.has_value()) {
    check_float_channels_last(*add, "add");
    TORCH_CHECK(add->sizes() == y.sizes(), "winograd_conv3x3: add must have the output's shape ", y.sizes(),
                ", got ", add->sizes());
  }
  if (y.numel() == 0) return y;

  const at::Tensor zeros = at::zeros({g.cin}, x.options());
  Args a{g, x.data_ptr<float>(), zeros.data_ptr<float>(), bias.has_value() ? bias->data_ptr<float>() : nullptr,
         add.has_value() ? add->data_ptr<float>() : nullptr, y.data_ptr<float>()};

  Transform input = input_baseline;
  OutTransform output = output_baseline;
  bool own_gemm = false;  // the AVX-512 GEMM, else BLAS's batched one
#ifdef DDPM_WINO_X86
  switch (cpu_isa::level()) {
    case cpu_isa::kAvx512:
      input = input_avx512;
      output = output_avx512;
      own_gemm = g.cout % 16 == 0;
      break;
    case cpu_isa::kAvx2:
      input = input_avx2;
      output = output_avx2;
      break;
    default:
      break;
  }
#endif

  // Tiles per chunk: ~kChunkFloats of transformed input, at least 16 tiles (GEMM rows), and enough
  // chunks to give every thread one.
  const int64_t threads = at::get_num_threads();
  int64_t per_chunk = std::max<int64_t>(16, kChunkFloats / (kPoints * g.cin));
  per_chunk = std::min(per_chunk, std::max<int64_t>(16, (g.tiles + threads - 1) / threads));
  per_chunk = std::min(per_chunk, g.tiles);
  // Equal chunks (a thin last chunk made a GEMM of a few rows, measured up to 2x slower per tile).
  const int64_t chunks = (g.tiles + per_chunk - 1) / per_chunk;
  per_chunk = (g.tiles + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    float* v_buf = scratch(kPoints * (point_stride(per_chunk, g.cin) + point_stride(per_chunk, g.cout)));
    float* m_buf = v_buf + kPoints * point_stride(per_chunk, g.cin);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t t0 = chunk * per_chunk, count = std::min(per_chunk, g.tiles - t0);
      input(a, t0, count, v_buf);
#ifdef DDPM_WINO_X86
      if (own_gemm) {
        gemm36_avx512(v_buf, weight.data_ptr<float>(), m_buf, count, g.cin, g.cout, panels);
      } else
#endif
      {
        at::Tensor m = at::from_blob(m_buf, {kPoints, count, g.cout}, {point_stride(count, g.cout), g.cout, 1},
                                     x.options());
        at::bmm_out(m, at::from_blob(v_buf, {kPoints, count, g.cin}, {point_stride(count, g.cin), g.cin, 1},
                                     x.options()),
                    weight);
      }
      output(a, t0, count, m_buf);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("winograd_conv3x3", &winograd_conv3x3_cpu); }

}  // namespace ddpm_fast
