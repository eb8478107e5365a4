"""The CUDA C++ kernels (csrc/cuda/*.cu) executed on the CPU by the SIMT harness (tests/simt, issue 24).

Every kernel of the three .cu files runs from its real host launcher on CPU tensors and is compared
with ddpm_fast.reference; the harness checks every memory access (global bounds, shared-memory
races) and every barrier (tests/simt/simt_runtime.cpp). Each check is shown failing on a planted
bug in a patched copy of a real kernel (PLANTS below), and the grid-limit fixes of issue 16 are
run under reduced grid limits. The first run builds the harness (~2-3 min on 2 cores, cached under
build/simt/ by content hash).
"""
from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from ddpm_fast import philox, reference
from ddpm_fast.step_layout import METHODS, NOISE_MODES, PREDICTIONS, PROJECTIONS, VARIANCES, code
from test_attention import HALF_DTYPES, check_close, make_qkv, strided_qkv
from test_diffusion_step import assert_step_equal, full_options, make_case
from test_group_norm_scale_shift import OPTIONS, adversarial_input, check, layout, make_inputs, variance_error

pytestmark = pytest.mark.simt

_spec = importlib.util.spec_from_file_location("simt_build", Path(__file__).parent / "simt" / "build.py")
simt_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(simt_build)

MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535

# Planted bugs in a patched copy of csrc/cuda/group_norm_scale_shift.cu (the quickest file to
# build), each behind ::simt::planted(bit): off unless a test sets the bit (configure(plants=...)).
# Bit 6 is no bug: it selects the int64-index kernels, which otherwise need 2^30 elements.
OOB_STORE, RACE, DIVERGENT_BARRIER, UNCLAMPED_GRID, WARP_REDUCTION, INT64_INDEX = 1, 2, 3, 4, 5, 6
PLANTS = (
    # an off-by-one store: coefficients_kernel also writes channel cg of its group
    ("for (int64_t j = threadIdx.x; j < cg; j += kCoefThreads) {",
     "for (int64_t j = threadIdx.x; j < cg + (::simt::planted(1) ? 1 : 0); j += kCoefThreads) {"),
    # a removed __syncthreads: warp 0 reads per_warp before the other warps' lane 0 wrote it
    ("  if (lane == 0) per_warp[warp] = m;\n  __syncthreads();",
     "  if (lane == 0) per_warp[warp] = m;\n  if (!::simt::planted(2)) __syncthreads();"),
    # a divergent barrier: threads without a channel to write return before __syncthreads
    ("  if (threadIdx.x == 0) {\n    s_mean = m.mean;",
     "  if (::simt::planted(3) && threadIdx.x >= cg) return;\n  if (threadIdx.x == 0) {\n    s_mean = m.mean;"),
    # issue 16's grid-axis bug: NCHW splits on grid axis y not clamped to its limit
    ("int64_t splits = std::clamp<int64_t>(ceil_div(target_blocks, ng), 1,\n"
     "                                         std::min<int64_t>(max_splits, max_y));",
     "int64_t splits = std::clamp<int64_t>(ceil_div(target_blocks, ng), 1,\n"
     "      ::simt::planted(4) ? max_splits : std::min<int64_t>(max_splits, max_y));"),
    # the wrong warp reduction (the example): shuffle offsets from 8, not 16
    ("for (int offset = 16; offset > 0; offset >>= 1) m = gn::moments_merge",
     "for (int offset = ::simt::planted(5) ? 8 : 16; offset > 0; offset >>= 1) m = gn::moments_merge"),
    ("const bool small = x.numel() < std::numeric_limits<int32_t>::max() / 2;",
     "const bool small = x.numel() < std::numeric_limits<int32_t>::max() / 2 && !::simt::planted(6);"),
)

STEMS = ("group_norm_scale_shift", "attention", "diffusion_step")


@pytest.fixture(scope="module")
def ops():
    """Op namespaces of the three kernel builds, the harness self-test and the planted copy (by stem
    or tag); tracked allocations on while the module runs."""
    simt_build.load_runtime()
    jobs = [(stem, (), "") for stem in (*STEMS, "selftest")] + [("group_norm_scale_shift", PLANTS, "planted")]
    simt_build.build_kernels(jobs)  # compiles what is not cached, in parallel
    names = {tag or stem: getattr(torch.ops, simt_build.load_kernels(stem, patches, tag))
             for stem, patches, tag in jobs}
    torch.ops.simt.enable()
    yield names
    torch.ops.simt.disable()


@pytest.fixture(autouse=True)
def limits(ops):
    """The default device model for each test: a real GPU's grid limits, 4 SMs, no plant."""
    configure()


def configure(*, max_grid_x=MAX_GRID_X, max_grid_yz=MAX_GRID_YZ, sms=4, plants=()):
    torch.ops.simt.configure(max_grid_x, max_grid_yz, max_grid_yz, sms, sum(1 << p for p in plants))


class Executed:
    """Asserts that the harness really ran kernel threads and checked accesses inside the block."""

    def __enter__(self):
        self.before = torch.ops.simt.stats()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            after = torch.ops.simt.stats()
            launches, blocks, threads, global_accesses = (a - b for a, b in zip(after[:4], self.before[:4]))
            assert launches > 0 and blocks > 0 and threads > 0 and global_accesses > 0, after
        return False


# ---- the harness itself: CUDA's numbering, shuffles, warp and block ordering, launch limits ------

def test_thread_numbering_is_x_fastest_with_warps_by_linear_id(ops):
    out = ops["selftest"].numbering(8, 5, 2, 2)
    linear = torch.arange(80).repeat(2)
    want = torch.stack([linear % 8, linear // 8 % 5, linear // 40, linear // 32 * 32], 1).int()
    assert torch.equal(out, want)
    out = ops["selftest"].numbering(4, 1, 1, 1)  # a single partial warp: mask 0xf
    assert torch.equal(out[:, 3], torch.zeros(4, dtype=torch.int32))


def expected_shuffle(mode, arg, width):
    """CUDA's __shfl_*_sync over a block of 64 threads holding 100 t + 7 (full masks)."""
    out = []
    for t in range(64):
        lane, base = t % 32, t - t % 32
        group, within = lane // width * width, lane % width
        if mode == "idx":
            src = group + arg % width
        elif mode == "up":
            src = lane - arg if within >= arg else lane
        elif mode == "down":
            src = lane + arg if within + arg < width else lane
        else:  # xor: lanes of later groups are out of range (own value); earlier ones are read
            src = lane ^ arg if (lane ^ arg) < group + width else lane
        out.append(100 * (base + src) + 7)
    return torch.tensor(out, dtype=torch.int32)


SHUFFLES = [(mode, arg, width) for width in (32, 16, 8, 4) for mode, args in
            (("idx", (0, 3, 37)), ("up", (1, 3, 16)), ("down", (1, 3, 16)), ("xor", (1, 2, 8, 16, 31)))
            for arg in args]


@pytest.mark.parametrize("mode,arg,width", SHUFFLES, ids=str)
def test_shuffles_follow_cuda_semantics(ops, mode, arg, width):
    got = ops["selftest"].shuffle(("idx", "up", "down", "xor").index(mode), arg, width)
    assert torch.equal(got, expected_shuffle(mode, arg, width))


@pytest.mark.parametrize("sync,other_warp,race", [(0, False, True), (1, False, False), (1, True, True),
                                                  (2, True, False)])
def test_syncwarp_orders_one_warp_and_syncthreads_the_block(ops, sync, other_warp, race):
    """s[t] = t, then a read of s[t ^ 1] (same warp) or s[t ^ 32] (other warp) after no barrier,
    __syncwarp or __syncthreads: only a barrier that covers both threads avoids a race."""
    if race:
        with pytest.raises(RuntimeError, match=r"exchange_kernel, block \(0,0,0\).*shared-memory race"):
            ops["selftest"].exchange(sync, other_warp)
    else:
        got = ops["selftest"].exchange(sync, other_warp)
        assert torch.equal(got, (torch.arange(64) ^ (32 if other_warp else 1)).float())


def test_dynamic_shared_memory_and_launch_limits(ops):
    assert torch.equal(ops["selftest"].dynamic(64, 64), 2.0 * torch.arange(64))
    with pytest.raises(RuntimeError, match="thread \\(60,0,0\\).*beyond the block's 240 bytes of shared memory"):
        ops["selftest"].dynamic(64, 60)
    with pytest.raises(RuntimeError, match="too much dynamic shared memory"):
        ops["selftest"].dynamic(64, 13000)  # 52000 bytes without cudaFuncSetAttribute
    with pytest.raises(RuntimeError, match="more than 1024 threads per block"):
        ops["selftest"].numbering(32, 33, 1, 1)


def test_emulated_mma_m16n8k16_matches_matrix_product(ops):
    """Point 3 of issue 24: the m16n8k16 fragments (tests/simt/simt_mma.h) against A B + C."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g).half()
    b = torch.randn(16, 8, generator=g).half()
    c = torch.randn(16, 8, generator=g)
    torch.testing.assert_close(ops["selftest"].mma(a, b, c), a.float() @ b.float() + c, atol=1e-5, rtol=1e-5)


def test_emulated_mma_m16n8k16_bf16_matches_matrix_product(ops):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 16, generator=g).bfloat16()
    b = torch.randn(16, 8, generator=g).bfloat16()
    c = torch.randn(16, 8, generator=g)
    torch.testing.assert_close(ops["selftest"].mma(a, b, c), a.float() @ b.float() + c, atol=1e-5, rtol=1e-5)


def expected_ldmatrix(n, trans, col0=0):
    """PTX ldmatrix .x{n}[.trans] over matrices with element (j, r, c) = 256 j + 16 r + c + col0:
    register j of lane 4g + t packs elements (g, 2t), (g, 2t + 1) of matrix j, low half first; with
    .trans (2t, g), (2t + 1, g)."""
    out = torch.full((32, 4), -1, dtype=torch.int64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for j in range(n):
            lo, hi = ((256 * j + 16 * (2 * t) + g, 256 * j + 16 * (2 * t + 1) + g) if trans
                      else (256 * j + 16 * g + 2 * t, 256 * j + 16 * g + 2 * t + 1))
            out[lane, j] = (lo + col0) | (hi + col0) << 16
    return out


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_emulated_ldmatrix_follows_ptx_fragments(ops, n, trans):
    assert torch.equal(ops["selftest"].ldmatrix(n, trans, 0), expected_ldmatrix(n, trans))
    assert torch.equal(ops["selftest"].ldmatrix(n, trans, 8), expected_ldmatrix(n, trans, 8))
    # a row address 8 bytes off its 16-byte alignment (undefined on the GPU) does not read the
    # 8 values from there: the emulation drops the low address bits
    assert torch.equal(ops["selftest"].ldmatrix(n, trans, 4), expected_ldmatrix(n, trans, 0))


def test_emulated_cp_async_groups_zero_fill_and_wait(ops):
    """Lane t: chunk 2t from src chunk t with src-size t % 17 (group 0), chunk 2t + 1 from src chunk
    32 + t (group 1); read back before a wait (poison: all ones), after wait_group 1 (group 0 landed)
    and wait_group 0 (both)."""
    src = torch.arange(1, 64 * 4 + 1, dtype=torch.int32) * 0x01010101
    out = ops["selftest"].cp_async(src)
    src_bytes = src.view(64, 4).view(torch.uint8)  # (64, 16)
    first = torch.zeros(32, 16, dtype=torch.uint8)
    for t in range(32):
        first[t, :t % 17] = src_bytes[t, :t % 17]
    first, second = first.view(torch.int32), src_bytes[32:].contiguous().view(torch.int32)
    poison = torch.full((32, 4), -1, dtype=torch.int32)
    assert torch.equal(out[:, 0, 0], poison) and torch.equal(out[:, 0, 1], poison)
    assert torch.equal(out[:, 1, 0], first) and torch.equal(out[:, 1, 1], poison)
    assert torch.equal(out[:, 2, 0], first) and torch.equal(out[:, 2, 1], second)


def test_emulated_cp_async_store_is_race_checked(ops):
    """A cp.async into shared memory another warp read in the same barrier interval is a race."""
    src = torch.arange(4, dtype=torch.int32) + 40
    assert torch.equal(ops["selftest"].cp_async_race(src, True), torch.tensor([5, 40], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="cp_async_race_kernel.*shared-memory race"):
        ops["selftest"].cp_async_race(src, False)


# ---- GroupNorm + scale-shift + SiLU -------------------------------------------------------------

def run_gn(ops, x, groups, w, b, s, t, silu, eps=1e-5):
    with Executed():
        return ops["group_norm_scale_shift"].group_norm_scale_shift(x, groups, w, b, s, t, eps, silu)


# (shape, groups): vector and scalar paths of NCHW (pixels % kVec) and channels-last (C % kVec),
# partial channel tiles (C % 32), 1-D and 3-D spatial, split groups (several moments blocks per
# group), multi-block apply.
# C = 12 (channels-last fp16/bf16: scalar loads), 96 (a tile of 16 channel vectors) and 320 (two
# tiles of 32 vectors, the second partial) for the channels-last tiling.
GN_SHAPES = [((2, 64, 4, 4), 32), ((3, 32, 7, 9), 8), ((2, 40, 5), 4), ((1, 36, 3, 3), 6),
             ((1, 32, 32, 32), 2), ((2, 16, 2, 3, 4), 4), ((2, 12, 5, 7), 3), ((1, 96, 3, 3), 3),
             ((2, 320, 3, 2), 8)]


# every dtype with the two layouts the kernels read; the others (copied to NCHW by the host
# code first) in fp32
GN_LAYOUTS = [(dtype, kind) for dtype in (torch.float32, torch.float16, torch.bfloat16)
              for kind in ("nchw", "channels_last", "permuted", "strided")
              if dtype == torch.float32 or kind in ("nchw", "channels_last")]


@pytest.mark.parametrize("dtype,kind", GN_LAYOUTS, ids=str)
@pytest.mark.parametrize("shape,groups", GN_SHAPES, ids=str)
def test_group_norm_matches_reference(ops, shape, groups, dtype, kind):
    x, w, b, s, t = make_inputs(shape, dtype, seed=len(shape) + groups)
    x = layout(x, kind)
    check(run_gn(ops, x, groups, w, b, s, t, True), x, groups, w, b, s, t, True)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "".join(k[0] if v else "-" for k, v in o.items()))
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_group_norm_optional_arguments(ops, opts, silu, kind):
    x, w, b, s, t = make_inputs((2, 32, 3, 5), **opts)
    x = layout(x, kind)
    check(run_gn(ops, x, 8, w, b, s, t, silu), x, 8, w, b, s, t, silu)


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("sms", [1, 64])
def test_group_norm_split_counts_and_large_mean(ops, kind, sms):
    """The number of SMs sets how many blocks share a group (1: one per group; 64: many); x has a
    large mean, so the result is compared with the reference on the (exactly) centred data, as in
    test_group_norm_scale_shift.test_cpu_large_mean_is_stable (PyTorch's own channels-last CPU
    group_norm loses precision there)."""
    configure(sms=sms)
    x, w, b, s, t = make_inputs((2, 64, 16, 16))
    shifted = layout(x * 4 + 100.0, kind)
    y = run_gn(ops, shifted, 4, w, b, s, t, False)
    ref = reference.group_norm_scale_shift(shifted - 100.0, 4, w, b, s, t, 1e-5, False)
    # fp32 statistics: the group mean of values near 100 is rounded to ulp(100) / 2 = 4e-6, which
    # the normalisation multiplies by rstd |weight| |1 + scale| (up to ~5 here); E[x^2] - E[x]^2
    # would be off by ~3e-2.
    torch.testing.assert_close(y, ref, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", ["outlier", "outlier_first", "mean_1e4", "1e6_group"])
def test_group_norm_statistics_adversarial_fp32(ops, case, kind):
    """Issue 17: variance within 1e-6 relative of float64 (measured 4.4e-7 at most; the previous
    kernel: outlier 2.5e-7, outlier_first 1.8e-5 / 6.5e-6, mean_1e4 4.4e-5 / 8.5e-5, 1e6_group
    5.9e-7 / 1.8e-5 (nchw / channels-last)). 132 SMs: a GPU's split of the groups over blocks."""
    configure(sms=132)
    x, groups = adversarial_input(case)
    x = layout(x, kind)
    y = run_gn(ops, x, groups, None, None, None, None, False)
    assert variance_error(x, y, groups) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_group_norm_misaligned_input_scalar_path(ops, kind, dtype):
    """x starting one element past a 16-byte boundary: the kernels load one element at a time."""
    shape = (2, 32, 6, 8)
    x, w, b, s, t = make_inputs(shape, dtype, seed=4)
    dims = (0, 2, 3, 1) if kind == "channels_last" else (0, 1, 2, 3)
    storage = torch.empty(x.numel() + 1, dtype=dtype)
    x = storage[1:].view(*[shape[d] for d in dims]).copy_(x.permute(*dims))
    x = x.permute(*[dims.index(d) for d in range(4)])
    assert x.data_ptr() % 16 != 0 and layout(x, kind).data_ptr() == x.data_ptr()
    check(run_gn(ops, x, 8, w, b, s, t, True), x, 8, w, b, s, t, True)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_group_norm_strided_parameters_read_in_place(ops, kind, param_dtype):
    """AdaGN's scale, shift = emb_out.chunk(2, 1) ((N, C) views with row stride 2C) and a strided
    weight/bias, in the model's dtype: read where they lie (no contiguous fp32 copies)."""
    x, _, _, _, _ = make_inputs((3, 32, 5, 4), torch.float16, seed=6)
    x = layout(x, kind)
    g = torch.Generator().manual_seed(7)
    emb_out = (0.5 * torch.randn(3, 64, generator=g)).to(param_dtype)
    scale, shift = emb_out.chunk(2, 1)
    affine = torch.randn(2, 64, generator=g).to(param_dtype)
    w, b = affine[0, ::2], affine[1, 1::2]
    assert not (scale.is_contiguous() or shift.is_contiguous() or w.is_contiguous())
    check(run_gn(ops, x, 8, w, b, scale, shift, True), x, 8, w, b, scale, shift, True)


# ---- attention ----------------------------------------------------------------------------------

def run_attention(ops, qkv, heads, layout_name):
    with Executed():
        return ops["attention"].attention(qkv, heads, layout_name == "legacy")


# head dims: the exact tiles (32, 64, 128) and the generic ones (8, 16 -> 16, 24 -> 32, 40 -> 64,
# 100 -> 128, 200 -> 256 with 2 keys per thread); T: one key, partial key tiles, several query blocks.
ATTENTION_CASES = [(1, 1, 32, 1), (2, 2, 64, 17), (1, 1, 128, 70), (1, 2, 8, 33), (1, 2, 24, 40),
                   (1, 1, 40, 64), (1, 1, 100, 20), (1, 1, 200, 9), (1, 2, 16, 130)]


# every dtype for each tile but the generic 16 and 256 ones (fp32 only: 1 block of 256 threads per
# (batch, head, 64 queries) makes these the slow cases)
ATTENTION_MATRIX = [(case, dtype) for case in ATTENTION_CASES for dtype in (torch.float32, torch.float16, torch.bfloat16)
                    if dtype == torch.float32 or case[2] not in (8, 200)]


@pytest.mark.parametrize("layout_name", ["legacy", "new"])
@pytest.mark.parametrize("case,dtype", ATTENTION_MATRIX, ids=str)
def test_attention_matches_reference(ops, case, dtype, layout_name):
    batch, heads, head_dim, length = case
    qkv = make_qkv(batch, heads, head_dim, length, dtype, seed=head_dim + length)
    check_close(run_attention(ops, qkv, heads, layout_name), qkv, heads, layout_name)


@pytest.mark.parametrize("layout_name", ["legacy", "new"])
def test_attention_strided_qkv(ops, layout_name):
    """q, k, v read through the input's strides (T not the innermost dim; a batch slice)."""
    base = make_qkv(3, 2, 32, 24)
    qkv = base.transpose(1, 2).contiguous().transpose(1, 2)[1:]
    assert not qkv.is_contiguous()
    check_close(run_attention(ops, qkv, 2, layout_name), qkv, 2, layout_name)


# ---- attention on the tensor cores (fp16 / bf16, head dims 32, 64, 128) --------------------------

TC_THREADS = 128  # threads per block of the tensor-core kernel (the scalar kernel's blocks have 256)


def run_attention_threads(ops, qkv, heads, layout_name):
    """run_attention, and the threads per block of the kernel that ran (which of the two it was)."""
    before = torch.ops.simt.stats()
    out = run_attention(ops, qkv, heads, layout_name)
    after = torch.ops.simt.stats()
    return out, (after[2] - before[2]) // (after[1] - before[1])


# (batch, heads, head dim, T): T not a multiple of the 64-query / 64-key tiles; several heads and
# batches (head and batch offsets); two and three key tiles (both double buffers reused).
TC_CASES = [(2, 2, 32, 80), (1, 1, 64, 136), (1, 1, 128, 80)]


@pytest.mark.parametrize("order", ["t", "c"])
@pytest.mark.parametrize("layout_name", ["legacy", "new"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", TC_CASES, ids=str)
def test_attention_tensor_cores_match_reference(ops, case, dtype, layout_name, order):
    """The mma.sync / ldmatrix / cp.async kernel (emulated: tests/simt/simt_mma.h) for both qkv
    layouts and both stride orders, read in place."""
    batch, heads, head_dim, length = case
    qkv = strided_qkv(make_qkv(batch, heads, head_dim, length, dtype, seed=head_dim + length), order)
    out, threads = run_attention_threads(ops, qkv, heads, layout_name)
    assert threads == TC_THREADS
    check_close(out, qkv, heads, layout_name)


@pytest.mark.parametrize("order,pad,length", [("t", 4, 84), ("c", 8, 70)], ids=str)
def test_attention_tensor_cores_padded_strides(ops, order, pad, length):
    """Strides past the sizes (a view of a padded buffer): T-contiguous with T = 84 in rows of 88 (the
    last 16-byte chunk of tokens straddles T: partly zero-filled) and channel-contiguous with
    stride_t = 3C + 8."""
    qkv = strided_qkv(make_qkv(1, 2, 32, length, torch.float16, seed=3, scale=2.0), order, pad)
    assert qkv.stride(2 if order == "t" else 1) == 1 and not qkv.is_contiguous()
    out, threads = run_attention_threads(ops, qkv, 2, "new")
    assert threads == TC_THREADS
    check_close(out, qkv, 2, "new")


def fallback_qkv(kind):
    qkv = make_qkv(1, 1, 64, 72, torch.bfloat16, seed=5)
    if kind == "misaligned":  # base 2 bytes past a 16-byte boundary
        return torch.cat([qkv.new_zeros(1), qkv.flatten()])[1:].view(qkv.shape)
    if kind == "no unit stride":  # every other token of a T-contiguous buffer: stride_t == 2
        return torch.repeat_interleave(qkv, 2, dim=2)[..., ::2]
    if kind == "stride_c not 8-aligned":  # T-contiguous, T = 72 + 1 elements per row
        return strided_qkv(qkv, "t", pad=1)
    return qkv.float()  # fp32: the scalar kernel


@pytest.mark.parametrize("kind", ["misaligned", "no unit stride", "stride_c not 8-aligned", "fp32"])
def test_attention_tensor_core_fallbacks(ops, kind):
    """Inputs the tensor-core kernel cannot read with 16-byte cp.async take the scalar kernel."""
    qkv = fallback_qkv(kind)
    out, threads = run_attention_threads(ops, qkv, 1, "legacy")
    assert threads == 256
    check_close(out, qkv, 1, "legacy")


# ---- the fused diffusion step -------------------------------------------------------------------

def run_step(op, x, model_output, coef, noise=None, *, seed=None, step=None, guidance_grad=None,
             method="ddpm", prediction="epsilon", variance="fixed_small", clip_denoised=True,
             noise_mode="normal", project_noise=None, clip=None, eps_from_x0=True, return_x0=True):
    """torch.ops.<build>.diffusion_step with ops.diffusion_step's keyword options -> (x_prev, x0)."""
    if seed is not None:
        step = torch.tensor(step, dtype=torch.int64)
    clip_lo, clip_hi = clip if clip is not None else (None, None)
    with Executed():
        x_prev, x0 = op.diffusion_step(
            x, model_output, coef, noise, seed, step, guidance_grad, code("method", method, METHODS),
            code("prediction", prediction, PREDICTIONS), code("variance", variance, VARIANCES),
            clip_denoised, code("noise_mode", noise_mode, NOISE_MODES),
            code("project_noise", project_noise, PROJECTIONS), clip_lo, clip_hi, eps_from_x0, return_x0)
    return x_prev, (x0 if return_x0 else None)


def step_both(op, case, **options):
    """(harness kernel, reference, inputs) for the given-noise path."""
    grad = case["grad"] if options.pop("guided", False) else None
    args = (case["x"], case["model_output"], case["coef"], case["noise"])
    got = run_step(op, *args, guidance_grad=grad, **options)
    want = reference.diffusion_step(*args, guidance_grad=grad, **options)
    return got, want, args[:3]


STEP_GRID = list(itertools.product(METHODS, VARIANCES, PREDICTIONS, PROJECTIONS))
FULL_OPTIONS = list(full_options())


@pytest.mark.parametrize("method,variance,prediction,project_noise", STEP_GRID, ids=lambda v: str(v))
def test_step_matches_reference(ops, method, variance, prediction, project_noise):
    """Every (method, variance, prediction, projection); the other options (clip_denoised, noise
    mode, x_t clip, guidance, DDIM's eps_from_x0) rotate so that every value of each is run."""
    i = STEP_GRID.index((method, variance, prediction, project_noise))
    case = make_case(variance=variance, seed=i)
    for k in range(4):
        options = dict(FULL_OPTIONS[(5 * i + 7 * k) % len(FULL_OPTIONS)])
        eps_from_x0 = method != "ddim" or k % 2 == 0
        got, want, inputs = step_both(ops["diffusion_step"], case, method=method, variance=variance,
                                      prediction=prediction, project_noise=project_noise,
                                      eps_from_x0=eps_from_x0, **options)
        assert_step_equal(got, want, inputs, project_noise)


# numel % 4 != 0 (scalar loads and per-element noise), several blocks per sample (the sample
# projection's partial sums over more than one block), a pixel count that is not a multiple of 4.
@pytest.mark.parametrize("spatial", [(5, 7), (33, 40), (3, 3)], ids=str)
@pytest.mark.parametrize("project_noise", PROJECTIONS)
def test_step_drawn_noise_matches_philox_reference(ops, spatial, project_noise):
    case = make_case(batch=2, spatial=spatial, seed=3)
    seed = torch.tensor([11, -(2**40) - 3], dtype=torch.int64)
    for step in (philox.INITIAL_NOISE_STEP, 7):
        kwargs = dict(method="ddim", project_noise=project_noise)
        got = run_step(ops["diffusion_step"], case["x"], case["model_output"], case["coef"], seed=seed,
                       step=step, **kwargs)
        noise = philox.philox_normal(seed, step, case["x"].shape[1:])
        want = reference.diffusion_step(case["x"], case["model_output"], case["coef"], noise, **kwargs)
        assert_step_equal(got, want, (case["x"], case["model_output"], case["coef"]), project_noise)


@pytest.mark.parametrize("dtype,mo_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                            (torch.float32, torch.float16)], ids=str)
@pytest.mark.parametrize("project_noise", PROJECTIONS)
def test_step_storage_dtypes(ops, dtype, mo_dtype, project_noise):
    case = make_case(spatial=(4, 8), dtype=dtype, seed=5)
    case["model_output"] = case["model_output"].to(mo_dtype)
    got, want, inputs = step_both(ops["diffusion_step"], case, method="ddpm", project_noise=project_noise)
    assert_step_equal(got, want, inputs, project_noise, rtol=2e-3 if mo_dtype != torch.float32 else 1e-5)


def test_step_sample_projection_per_sample_factor_is_deterministic(ops):
    """Issue 17: the sample projection reduces each sample's partial sums once (factor_kernel, one
    block per sample, fixed order), not in every block. 3 samples of 3 x 64 x 64 (12 blocks each):
    the reference's values, the same bits on a rerun, and with the samples in chunks of 2 (grid
    y limit 2: factor_kernel's blocks then start at batch_offset)."""
    case = make_case(batch=3, spatial=(64, 64), seed=9)
    seed = torch.tensor([5, 6, 7], dtype=torch.int64)
    args = (case["x"], case["model_output"], case["coef"])
    got = run_step(ops["diffusion_step"], *args, seed=seed, step=4, project_noise="sample")
    noise = philox.philox_normal(seed, 4, case["x"].shape[1:])
    want = reference.diffusion_step(*args, noise, project_noise="sample")
    assert_step_equal(got, want, args, "sample")
    again = run_step(ops["diffusion_step"], *args, seed=seed, step=4, project_noise="sample")
    configure(max_grid_yz=2)
    chunked = run_step(ops["diffusion_step"], *args, seed=seed, step=4, project_noise="sample")
    for other in (again, chunked):
        assert all(torch.equal(a, b) for a, b in zip(got, other))


# ---- issue 16: grid axes with a 65535 limit (run under a reduced limit) -------------------------

def test_grid_limit_group_norm_channels_last_batch(ops):
    """N no longer on grid axis z; splits clamped to the queried y limit."""
    configure(max_grid_yz=2, sms=64)
    for kind, shape, groups in (("nchw", (1, 8, 64, 64), 1), ("channels_last", (5, 32, 8, 8), 4),
                                ("channels_last", (1, 8, 64, 64), 1)):
        x, w, b, s, t = make_inputs(shape)
        x = layout(x, kind)
        check(run_gn(ops, x, groups, w, b, s, t, True), x, groups, w, b, s, t, True)


def test_grid_limit_attention_query_blocks(ops):
    """Query blocks folded into axis x: T = 200 (4 query blocks) under a y limit of 2 (before the
    fix they were grid axis y: an invalid launch here)."""
    configure(max_grid_yz=2)
    qkv = make_qkv(1, 2, 32, 200)
    check_close(run_attention(ops, qkv, 2, "new"), qkv, 2, "new")
    configure(max_grid_x=7)  # 1 * 2 * 4 = 8 blocks: a clear error, not a failed launch
    with pytest.raises(RuntimeError, match="exceed the grid limit 7"):
        ops["attention"].attention(qkv, 2, False)


@pytest.mark.parametrize("project_noise", PROJECTIONS)
def test_grid_limit_step_batch_chunks(ops, project_noise):
    """Samples in chunks of the y limit (2): a batch of 5 runs as 3 launches per kernel (the sample
    projection: statistics, per-sample factors, apply)."""
    configure(max_grid_yz=2)
    case = make_case(batch=5, spatial=(9, 9), seed=8)
    seed = torch.arange(5, dtype=torch.int64)
    before = torch.ops.simt.stats()[0]
    got = run_step(ops["diffusion_step"], case["x"], case["model_output"], case["coef"], seed=seed, step=3,
                   project_noise=project_noise)
    launches = torch.ops.simt.stats()[0] - before
    assert launches == (9 if project_noise == "sample" else 3)
    noise = philox.philox_normal(seed, 3, case["x"].shape[1:])
    want = reference.diffusion_step(case["x"], case["model_output"], case["coef"], noise,
                                    project_noise=project_noise)
    assert_step_equal(got, want, (case["x"], case["model_output"], case["coef"]), project_noise)


# ---- the harness's checks, each on its planted bug ----------------------------------------------

def run_planted(ops, shape=(2, 32, 3, 5), groups=8, kind="nchw", **params):
    """The planted GroupNorm copy on N(0, 1) data (no weight/bias/scale/shift unless given)."""
    opts = {**dict(weight=False, bias=False, scale=False, shift=False), **params}
    x, w, b, s, t = make_inputs(shape, **opts)
    x = layout(x, kind)
    with Executed():
        y = ops["planted"].group_norm_scale_shift(x, groups, w, b, s, t, 1e-5, False)
    return y, (x, groups, w, b, s, t, False)


def test_planted_copy_without_plants_matches_reference(ops):
    """The control: with every plant off the patched copy computes the real kernel's results."""
    for kind in ("nchw", "channels_last"):
        y, args = run_planted(ops, kind=kind, weight=True, scale=True)
        check(y, *args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 32, 4, 4), (2, 36, 3, 5)], ids=str)
def test_group_norm_int64_index_kernels(ops, shape, dtype, kind):
    """The index_t = int64_t instantiations (x with >= 2^30 elements on a GPU), selected here."""
    configure(plants=[INT64_INDEX])
    y, args = run_planted(ops, shape=shape, groups=4, kind=kind, dtype=dtype, weight=True, shift=True)
    check(y, *args)


def test_bounds_check_catches_off_by_one_store(ops):
    """(2, 32) coefficients of 8 bytes end at byte 512; the last group's block writes one more."""
    configure(plants=[OOB_STORE])
    with pytest.raises(RuntimeError, match=r"kernel coefficients_kernel, block \(15,0,0\), thread \(4,0,0\).*"
                                           r"out-of-bounds global write of \d bytes at \S+: byte offset 512 of an "
                                           r"allocation of 512 bytes"):
        run_planted(ops)


def test_race_check_catches_removed_syncthreads(ops):
    configure(plants=[RACE])
    with pytest.raises(RuntimeError, match=r"kernel moments_nchw_kernel<T, kVec, index_t>, block \(0,0,0\), "
                                           r"thread \(32,0,0\).*shared-memory race \(write after read\)"):
        run_planted(ops)


def test_barrier_check_catches_divergent_syncthreads(ops):
    """cg = 4 channels per group: threads 0-3 wait at the barrier, threads 4-127 returned."""
    configure(plants=[DIVERGENT_BARRIER])
    with pytest.raises(RuntimeError, match=r"kernel coefficients_kernel, block \(0,0,0\): barrier divergence: "
                                           r"4 of 128 threads wait at __syncthreads \(line \d+\) but 124 threads "
                                           r"returned without reaching it"):
        run_planted(ops)


def test_launch_check_catches_grid_axis_overflow(ops):
    """Issue 16's bug class: 8 splits of one group on grid axis y, whose limit is 2 here."""
    configure(max_grid_yz=2, sms=64, plants=[UNCLAMPED_GRID])
    with pytest.raises(RuntimeError, match=r"grid \(1,8,1\).*grid dims beyond the device's"):
        run_planted(ops, shape=(1, 8, 64, 64), groups=1)
    configure(max_grid_yz=2, sms=64)
    y, args = run_planted(ops, shape=(1, 8, 64, 64), groups=1)  # clamped: 2 splits
    check(y, *args)


def test_reference_comparison_catches_wrong_warp_reduction(ops):
    """Not a harness check but the value comparison: the issue's example bug (offsets from 8)."""
    configure(plants=[WARP_REDUCTION])
    y, args = run_planted(ops, shape=(2, 32, 16, 16))
    with pytest.raises(AssertionError, match="not close"):
        check(y, *args)


def test_untracked_tensor_is_reported(ops):
    """A tensor made before simt.enable() is not in the allocation table: reads are reported."""
    torch.ops.simt.disable()
    try:
        x = torch.randn(1, 32, 2, 2)
    finally:
        torch.ops.simt.enable()
    assert not torch.ops.simt.is_tracked(x)
    with pytest.raises(RuntimeError, match="out-of-bounds global read"):
        ops["group_norm_scale_shift"].group_norm_scale_shift(x, 8, None, None, None, None, 1e-5, False)
