"""The Triton kernels' GPU launch concerns: device guard, 64-bit sample offsets, grid-axis limits,
the deterministic attention tile table and the head-dim error.

The `cuda`-marked tests need a GPU (the first GPU session runs them with `pytest -m cuda`); the
others check on any machine what does not need one (the tile table itself, the head-dim error
under the interpreter). That the kernels compile for sm_80/sm_90 without spills is
tests/test_offline_compile.py's.
"""
from __future__ import annotations

import pytest
import torch

from ddpm_fast import ops, reference
from ddpm_fast._registry import backends

needs_triton = pytest.mark.skipif(not backends()["triton"], reason="triton backend unavailable here")


def _attention_kernels():
    from ddpm_fast.kernels import attention

    return attention


# ---- the tile table (no GPU needed) -----------------------------------------------------------------
@needs_triton
def test_tile_table_covers_every_key_and_fits_tl_dot():
    att = _attention_kernels()
    for arch in att.ARCHS:
        for bucket in (*att.T_BUCKETS, 0):
            for width in att.D_BUCKETS:
                for kind in ("16", "32"):
                    block_m, block_n, warps, stages = att.TILE_TABLE[arch, bucket, width, kind]
                    assert block_m >= 16 and block_n >= 16 and warps in (4, 8) and stages >= 1
    assert len(att.TILE_TABLE) == len(att.ARCHS) * (len(att.T_BUCKETS) + 1) * len(att.D_BUCKETS) * 2


@needs_triton
@pytest.mark.parametrize("capability", [80, 86, 89, 90, 100])
def test_tile_choice_is_a_function_of_arch_t_bucket_head_dim_and_dtype(capability):
    att = _attention_kernels()
    for t in (1, 16, 32, 33, 64, 128, 129, 256, 4096):
        for head_dim in (1, 8, 32, 64, 65, 96, 128, 192, 256):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                first = att.tile_config(capability, t, head_dim, dtype)
                arch, bucket, width, kind = att.table_key(capability, t, head_dim, dtype)
                assert arch == (90 if capability >= 90 else 80)
                assert bucket == (32 if t <= 32 else 128 if t <= 128 else 0)
                assert width == max(64, att.block_d(head_dim)) and width >= head_dim
                assert kind == ("32" if dtype == torch.float32 else "16")
                assert att.tile_config(capability, t, head_dim, dtype) == first
                assert tuple(first.values()) == att.TILE_TABLE[arch, bucket, width, kind]


@needs_triton
@pytest.mark.parametrize("head_dim", [257, 512])
def test_unsupported_head_dim_is_a_value_error(head_dim, triton_device):
    qkv = torch.zeros(1, 3 * head_dim, 4, device=triton_device)
    with pytest.raises(ValueError, match=f"head dims C/num_heads from 1 to 256; got {head_dim}"):
        ops.attention(qkv, 1, backend="triton")


def test_autotune_only_on_request(monkeypatch):
    pytest.importorskip("triton")
    att = _attention_kernels()
    monkeypatch.delenv("DDPM_FAST_AUTOTUNE", raising=False)
    assert not att.autotune_requested()
    monkeypatch.setenv("DDPM_FAST_AUTOTUNE", "1")
    assert att.autotune_requested()


# ---- on a GPU ---------------------------------------------------------------------------------------
def _free_gib() -> float:
    free, _total = torch.cuda.mem_get_info()
    return free / 2**30


@pytest.mark.cuda
def test_launches_run_on_the_inputs_device():
    """Tensors on cuda:1 while cuda:0 is current: every Triton launcher runs on cuda:1 (else the
    kernel reads cuda:1 memory from cuda:0: an illegal access or wrong numbers)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 9, 7, generator=gen).to(dev)
    scale, shift = (torch.randn(2, 32, generator=gen).to(dev) for _ in range(2))
    for big in (False, True):  # the one-kernel path and the moments + apply path
        xi = torch.randn(2, 32, 64, 64, generator=gen).to(dev) if big else x
        out = ops.group_norm_scale_shift(xi, 8, scale=scale, shift=shift, silu=True, backend="triton")
        torch.testing.assert_close(out, reference.group_norm_scale_shift(xi, 8, scale=scale, shift=shift,
                                                                         silu=True), atol=1e-5, rtol=1e-4)
    qkv = torch.randn(2, 3 * 64, 40, generator=gen).to(dev)
    torch.testing.assert_close(ops.attention(qkv, 2, backend="triton"), reference.attention(qkv, 2),
                               atol=1e-5, rtol=1e-4)
    coef = torch.rand(2, 13, generator=gen).to(dev) + 0.5
    seed = torch.tensor([3, 4], device=dev)
    for projection in (None, "pixel", "sample"):
        got, _ = ops.diffusion_step(x[:, :3], x[:, 3:6], coef, seed=seed, step=5, project_noise=projection,
                                    backend="triton")
        want, _ = ops.diffusion_step(x[:, :3], x[:, 3:6], coef, seed=seed, step=5, project_noise=projection,
                                     backend="torch")
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.cuda.current_device() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["one_kernel", "moments_apply"])
def test_group_norm_past_2_31_elements(path):
    """A batch of more than 2^31 elements (each sample fewer): the samples past element 2^31 match
    the reference computed on them alone (a 32-bit n * s_n offset would wrap to the first ones)."""
    shape = (65600, 512, 8, 8) if path == "one_kernel" else (34, 256, 512, 512)  # 2.15e9, 2.28e9 elements
    if _free_gib() < 12:
        pytest.skip("needs 12 GiB of free GPU memory")
    n, c = shape[:2]
    x = torch.empty(shape, dtype=torch.float16, device="cuda")
    x.view(-1)[:] = 0.5
    tail = slice(n - 3, n)
    x[tail] = torch.randn((3, *shape[1:]), device="cuda", dtype=torch.float16) * 2 + 1
    scale = torch.randn(n, c, device="cuda") * 0.1
    shift = torch.randn(n, c, device="cuda") * 0.1
    assert x.numel() > 2**31
    out = ops.group_norm_scale_shift(x, 32, scale=scale, shift=shift, silu=True, backend="triton")
    expected = reference.group_norm_scale_shift(x[tail], 32, scale=scale[tail], shift=shift[tail], silu=True)
    torch.testing.assert_close(out[tail].float(), expected.float(), atol=2e-2, rtol=2e-2)
    del out, x


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["legacy", "new"])
def test_attention_with_more_than_65535_batch_heads(layout):
    """B x heads = 70000 (past grid axis 1's 65535) at T = 16: every (sample, head) is computed."""
    batch, heads, head_dim, t = 35000, 2, 8, 16
    qkv = torch.randn(batch, 3 * heads * head_dim, t, device="cuda", dtype=torch.float16)
    out = ops.attention(qkv, heads, layout, backend="triton")
    for rows in (slice(0, 4), slice(batch // 2, batch // 2 + 4), slice(batch - 4, batch)):
        torch.testing.assert_close(out[rows].float(), reference.attention(qkv[rows], heads, layout).float(),
                                   atol=2e-3, rtol=2e-3)


@pytest.mark.cuda
def test_attention_tile_is_the_tables_and_repeatable(monkeypatch):
    """Without DDPM_FAST_AUTOTUNE the launch takes TILE_TABLE's tile (the autotuner never runs)
    and two calls give bitwise equal outputs."""
    att = _attention_kernels()
    monkeypatch.delenv("DDPM_FAST_AUTOTUNE", raising=False)
    major, minor = torch.cuda.get_device_capability()
    seen = []
    original = att._attention_fwd.run

    def spy(*args, **kwargs):
        seen.append({k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")})
        return original(*args, **kwargs)

    monkeypatch.setattr(att._attention_fwd, "run", spy)
    for t, head_dim, dtype in ((16, 64, torch.float16), (256, 64, torch.bfloat16), (100, 128, torch.float32)):
        qkv = torch.randn(2, 3 * 2 * head_dim, t, device="cuda", dtype=dtype)
        first = ops.attention(qkv, 2, backend="triton")
        second = ops.attention(qkv, 2, backend="triton")
        assert torch.equal(first, second)
        assert seen[-1] == seen[-2] == att.tile_config(10 * major + minor, t, head_dim, dtype)
    assert not att._attention_fwd_tuned.cache  # no timing run


@pytest.mark.cuda
def test_unsupported_head_dim_on_gpu_is_a_value_error():
    qkv = torch.zeros(1, 3 * 512, 4, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="head dims C/num_heads from 1 to 256; got 512"):
        ops.attention(qkv, 1, backend="triton")
