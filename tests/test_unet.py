"""ddpm_fast.UNet against guided-diffusion: the golden forward, state_dict compatibility, the
published configurations' structure, the blocks against their formulas, dtypes and channels_last."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_weights as randomize

import ddpm_fast
from ddpm_fast.unet import AttentionBlock, ResBlock, UNet, timestep_embedding

CL = torch.channels_last


def golden_model(golden, **kw):
    model = UNet(**golden["config"], **kw).eval()
    model.load_state_dict(golden["state_dict"], strict=True)
    return model


def run(model, golden, channels_last=False):
    x = golden["x"].contiguous(memory_format=CL) if channels_last else golden["x"]
    with torch.no_grad():
        return model(x, golden["t"], y=golden["y"])


# ---- the golden forward ------------------------------------------------------------------------

def test_golden_keys_and_shapes_match(golden_unet):
    model = UNet(**golden_unet["config"])
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in golden_unet["state_dict"].items()}
    assert own == theirs
    result = model.load_state_dict(golden_unet["state_dict"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_golden_forward(golden_unet, backend):
    model = golden_model(golden_unet, backend=backend)
    out = run(model, golden_unet)
    assert out.shape == golden_unet["out"].shape and out.dtype == torch.float32
    torch.testing.assert_close(out, golden_unet["out"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_golden_forward_channels_last(golden_unet, backend):
    model = golden_model(golden_unet, backend=backend).to(memory_format=CL)
    out = run(model, golden_unet, channels_last=True)
    torch.testing.assert_close(out, golden_unet["out"], rtol=0, atol=1e-4)
    assert out.is_contiguous(memory_format=CL)


def test_cpu_backend_when_kernels_are_built(golden_unet):
    """backend="cpu" runs the C++ kernels where both ops have one, and matches the golden."""
    from ddpm_fast._registry import has_kernel

    if not (has_kernel("group_norm_scale_shift", "CPU") and has_kernel("attention", "CPU")):
        with pytest.raises(ValueError, match="backend='cpu'"):
            run(golden_model(golden_unet, backend="cpu"), golden_unet)
        return
    for channels_last in (False, True):
        model = golden_model(golden_unet, backend="cpu")
        if channels_last:
            model = model.to(memory_format=CL)
        torch.testing.assert_close(run(model, golden_unet, channels_last), golden_unet["out"], rtol=0, atol=1e-4)


def test_fast_paths_equal_the_plain_model(golden_unet):
    """The fused timestep projections, prepacked convs and fused residual adds change nothing; the
    fast switch can be turned off on any backend."""
    plain = run(golden_model(golden_unet, backend="torch"), golden_unet)
    assert golden_model(golden_unet, backend="torch").fast is False
    for fast in (True, False):
        model = golden_model(golden_unet, fast=fast).to(memory_format=CL)
        assert model.fast is fast and all(m.fast is fast for m in model._ops_modules())
        torch.testing.assert_close(run(model, golden_unet, channels_last=True), plain, rtol=0, atol=5e-5)


def test_caches_follow_weight_changes(golden_unet):
    """The fused-projection and packed-conv caches are rebuilt when weights change in place."""
    model = golden_model(golden_unet).to(memory_format=CL)
    first = run(model, golden_unet, channels_last=True)
    with torch.no_grad():
        model.input_blocks[1][0].emb_layers[1].weight.mul_(1.5)
        model.input_blocks[1][0].out_layers[3].weight.add_(0.01)
        model.middle_block[0].in_layers[2].weight.mul_(0.5)
    plain = copy.deepcopy(model)
    plain.backend, plain.fast = "torch", False
    second = run(model, golden_unet, channels_last=True)
    assert (second - first).abs().max() > 1e-2
    torch.testing.assert_close(second, run(plain, golden_unet), rtol=0, atol=5e-5)
    # a state_dict load replaces the weights as well
    model.load_state_dict(golden_unet["state_dict"])
    torch.testing.assert_close(run(model, golden_unet, channels_last=True), golden_unet["out"], rtol=0, atol=1e-4)


def test_deepcopy_and_batch_change_after_use(golden_unet):
    model = golden_model(golden_unet).to(memory_format=CL)
    run(model, golden_unet, channels_last=True)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(run(clone, golden_unet, channels_last=True), golden_unet["out"], rtol=0, atol=1e-4)
    # one sample at a time (another input shape for the packed weights): the same rows
    x = golden_unet["x"].contiguous(memory_format=CL)
    with torch.no_grad():
        one = clone(x[1:], golden_unet["t"][1:], y=golden_unet["y"][1:])
    torch.testing.assert_close(one, golden_unet["out"][1:], rtol=0, atol=1e-4)


def test_gradients_flow_with_autograd(golden_unet):
    """With autograd recording the model takes differentiable paths (reference ops, no packed
    weights) on every backend, and its gradients are those of the plain reference model."""
    grads = {}
    for backend in ("auto", "torch"):
        model = golden_model(golden_unet, backend=backend, fast=True).to(memory_format=CL).train()
        x = golden_unet["x"].contiguous(memory_format=CL).requires_grad_(True)
        out = model(x, golden_unet["t"], y=golden_unet["y"])  # dropout is 0 in this configuration
        torch.testing.assert_close(out.detach(), golden_unet["out"], rtol=0, atol=1e-4)
        out.square().mean().backward()
        assert all(p.grad is not None for p in model.parameters())
        grads[backend] = (x.grad, model.input_blocks[1][0].emb_layers[1].weight.grad,
                          model.middle_block[1].qkv.weight.grad, model.out[0].weight.grad)
    for got, want in zip(grads["auto"], grads["torch"]):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_input_gradients_after_inference_mode_use(golden_unet):
    """Caches built under inference_mode do not block a later gradient with respect to x (frozen
    weights, as for guidance through the model)."""
    model = golden_model(golden_unet).to(memory_format=CL).requires_grad_(False)
    x = golden_unet["x"].contiguous(memory_format=CL)
    with torch.inference_mode():
        model(x, golden_unet["t"], golden_unet["y"])
    x = x.clone().requires_grad_(True)
    out = model(x, golden_unet["t"], golden_unet["y"])
    torch.testing.assert_close(out.detach(), golden_unet["out"], rtol=0, atol=1e-4)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---- dtypes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,atol,rtol_norm", [("fp16", 0.02, 3e-3), ("bf16", 0.15, 2e-2),
                                                 ("bf16-whole", 0.15, 2e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_precision_close_to_fp32(golden_unet, mode, atol, rtol_norm, channels_last):
    model = golden_model(golden_unet)
    if mode == "fp16":
        model.convert_to_fp16()
    elif mode == "bf16":
        model.convert_to_bf16()
    else:
        model = model.to(torch.bfloat16)
    half = torch.float16 if mode == "fp16" else torch.bfloat16
    assert model.dtype == half
    assert model.middle_block[1].qkv.weight.dtype == half
    if mode != "bf16-whole":  # guided-diffusion's split: norms, embeddings and the head stay fp32
        assert model.middle_block[0].in_layers[0].weight.dtype == torch.float32
        assert model.middle_block[0].emb_layers[1].weight.dtype == torch.float32
        assert model.time_embed[0].weight.dtype == torch.float32
        assert model.label_emb.weight.dtype == torch.float32
        assert model.out[2].weight.dtype == torch.float32
    if channels_last:
        model = model.to(memory_format=CL)
    out = run(model, golden_unet, channels_last)
    ref = golden_unet["out"]
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < atol
    assert (out - ref).norm() / ref.norm() < rtol_norm


def test_convert_to_fp32_undoes_fp16(golden_unet):
    model = golden_model(golden_unet).convert_to_fp16().convert_to_fp32()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(run(model, golden_unet), golden_unet["out"], rtol=0, atol=2e-2)


def test_use_fp16_flag_converts_the_torso():
    with torch.device("meta"):
        model = UNet(image_size=32, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                     attention_resolutions=(2,), channel_mult=(1, 2), use_fp16=True)
    assert model.dtype == torch.float16
    assert model.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32


# ---- structure of the published models --------------------------------------------------------

# guided-diffusion's README flags (class-conditional ImageNet models) -> parameter counts of its
# UNetModel, and the UNetModel arguments create_model derives from them.
PUBLISHED = {
    "64x64": (295.9e6, dict(image_size=64, model_channels=192, num_res_blocks=3, attention_resolutions=(2, 4, 8),
                            channel_mult=(1, 2, 3, 4), num_head_channels=64, use_new_attention_order=True,
                            dropout=0.1)),
    "128x128": (421.5e6, dict(image_size=128, model_channels=256, num_res_blocks=2,
                              attention_resolutions=(4, 8, 16), channel_mult=(1, 1, 2, 3, 4), num_heads=4)),
    "256x256": (553.8e6, dict(image_size=256, model_channels=256, num_res_blocks=2,
                              attention_resolutions=(8, 16, 32), channel_mult=(1, 1, 2, 2, 4, 4),
                              num_head_channels=64)),
    "512x512": (559.0e6, dict(image_size=512, model_channels=256, num_res_blocks=2,
                              attention_resolutions=(16, 32, 64), channel_mult=(0.5, 1, 1, 2, 2, 4, 4),
                              num_head_channels=64)),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configurations_parameter_counts(name):
    count, kw = PUBLISHED[name]
    with torch.device("meta"):
        model = UNet(in_channels=3, out_channels=6, num_classes=1000, use_scale_shift_norm=True,
                     resblock_updown=True, **kw)
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e5) == round(count / 1e5)
    keys = model.state_dict().keys()
    # resblock_updown: the downsampler after level 0 is a ResBlock, not a conv
    assert "input_blocks.%d.0.in_layers.2.weight" % (kw["num_res_blocks"] + 1) in keys
    assert not any(".op." in k for k in keys)
    assert model.label_emb.weight.shape == (1000, 4 * kw["model_channels"])
    assert model.out[2].weight.shape[0] == 6


def test_heads_follow_num_head_channels_and_num_heads_upsample():
    with torch.device("meta"):
        model = UNet(image_size=32, in_channels=3, model_channels=64, out_channels=3, num_res_blocks=1,
                     attention_resolutions=(1, 2), channel_mult=(1, 2), num_heads=4, num_heads_upsample=2)
        by_channels = UNet(image_size=32, in_channels=3, model_channels=64, out_channels=3, num_res_blocks=1,
                           attention_resolutions=(1, 2), channel_mult=(1, 2), num_heads=4, num_head_channels=32)
    enc = [m.num_heads for m in model.input_blocks.modules() if isinstance(m, AttentionBlock)]
    dec = [m.num_heads for m in model.output_blocks.modules() if isinstance(m, AttentionBlock)]
    assert enc == [4, 4] and dec == [2] * 4 and model.middle_block[1].num_heads == 4
    assert [m.num_heads for m in by_channels.modules() if isinstance(m, AttentionBlock)] == \
        [64 // 32, 128 // 32, 128 // 32, 128 // 32, 128 // 32, 64 // 32, 64 // 32]


def test_small_variants_run_in_every_layout():
    """resblock_updown, plain (non scale-shift) ResBlocks, no conv_resample and the new attention
    order: same output with and without the fast paths, NCHW or channels_last."""
    torch.manual_seed(0)
    kw = dict(image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
              attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2)
    for extra in (dict(resblock_updown=True, use_scale_shift_norm=True, use_new_attention_order=True),
                  dict(conv_resample=False, use_scale_shift_norm=False),
                  dict(num_classes=5, model_channels=64, channel_mult=(0.5, 1.5, 2))):
        model = randomize(UNet(**{**kw, **extra}).eval())
        x = torch.randn(3, 3, 16, 16)
        t = torch.tensor([0.0, 10.5, 999.0])
        y = torch.tensor([0, 4, 2]) if "num_classes" in extra else None
        plain = copy.deepcopy(model)
        plain.backend, plain.fast = "torch", False
        with torch.no_grad():
            want = plain(x, t, y)
            assert want.shape == (3, 3, 16, 16) and torch.isfinite(want).all()
            torch.testing.assert_close(model(x, t, y), want, rtol=0, atol=1e-4)
            got = model.to(memory_format=CL)(x.contiguous(memory_format=CL), t, y)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


# ---- the blocks against their formulas ----------------------------------------------------------

def gn(x, norm):
    return F.group_norm(x, 32, norm.weight, norm.bias, 1e-5)


def resblock_formula(blk, x, emb):
    """guided-diffusion's ResBlock._forward written out with plain torch functions."""
    h = F.silu(gn(x, blk.in_layers[0]))
    if blk.up or blk.down:
        resample = (lambda t: F.interpolate(t, scale_factor=2, mode="nearest")) if blk.up else \
            (lambda t: F.avg_pool2d(t, 2))
        h, x = resample(h), resample(x)
    h = blk.in_layers[2](h)
    e = F.linear(F.silu(emb), blk.emb_layers[1].weight, blk.emb_layers[1].bias)[:, :, None, None]
    if blk.use_scale_shift_norm:
        scale, shift = e.chunk(2, dim=1)
        h = F.silu(gn(h, blk.out_layers[0]) * (1 + scale) + shift)
    else:
        h = F.silu(gn(h + e, blk.out_layers[0]))
    h = blk.out_layers[3](h)
    skip = x if isinstance(blk.skip_connection, torch.nn.Identity) else blk.skip_connection(x)
    return skip + h


@pytest.mark.parametrize("updown,out_ch", [("none", 64), ("none", 96), ("up", 64), ("down", 64)])
@pytest.mark.parametrize("scale_shift", [True, False])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_resblock_matches_formula(scale_shift, updown, out_ch, backend):
    """Plain and AdaGN ResBlocks, identity and 1x1 skips, nearest-up and average-down variants."""
    torch.manual_seed(1)
    blk = randomize(ResBlock(64, 128, out_channels=out_ch, use_scale_shift_norm=scale_shift,
                             up=updown == "up", down=updown == "down"), seed=2).eval()
    blk.backend = backend
    x, emb = torch.randn(2, 64, 8, 8), torch.randn(2, 128)
    with torch.no_grad():
        want = resblock_formula(blk, x, emb)
        torch.testing.assert_close(blk(x, emb), want, rtol=1e-5, atol=1e-4)
        blk = blk.to(memory_format=CL)
        torch.testing.assert_close(blk(x.contiguous(memory_format=CL), emb), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_attention_block_matches_guided_diffusion_math(new_order, backend):
    torch.manual_seed(3)
    blk = randomize(AttentionBlock(64, num_heads=4, use_new_attention_order=new_order), seed=4).eval()
    blk.backend = backend
    x = torch.randn(2, 64, 6, 5)
    with torch.no_grad():
        b, c, *sp = x.shape
        qkv = F.conv1d(gn(x, blk.norm).reshape(b, c, -1), blk.qkv.weight, blk.qkv.bias)
        heads, ch, t = 4, 16, 30
        if new_order:
            q, k, v = (z.reshape(b * heads, ch, t) for z in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * heads, 3 * ch, t).split(ch, dim=1)
        s = 1 / math.sqrt(math.sqrt(ch))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, t)
        want = x + F.conv1d(a, blk.proj_out.weight, blk.proj_out.bias).reshape(x.shape)
        torch.testing.assert_close(blk(x), want, rtol=1e-5, atol=1e-5)
        blk = blk.to(memory_format=CL)
        got = blk(x.contiguous(memory_format=CL))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got.is_contiguous(memory_format=CL)


def test_timestep_embedding():
    t = torch.tensor([0, 1, 250.5, 999])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    want = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, want, rtol=1e-5, atol=1e-4)
    odd = timestep_embedding(t, 9)
    assert odd.shape == (4, 9) and (odd[:, -1] == 0).all()
    torch.testing.assert_close(odd[:, :8], want, rtol=1e-5, atol=1e-4)


def test_scalar_and_float_timesteps(golden_unet):
    model = golden_model(golden_unet)
    x, y = golden_unet["x"], golden_unet["y"]
    with torch.no_grad():
        torch.testing.assert_close(model(x, golden_unet["t"].float(), y), golden_unet["out"], rtol=0, atol=1e-4)
        both = model(x, torch.tensor(7), y)
        torch.testing.assert_close(both[:1], golden_unet["out"][:1], rtol=0, atol=1e-4)
        frac = model(x, torch.tensor([7.5, 613.25]), y)
    assert not torch.allclose(frac, golden_unet["out"])


# ---- errors -----------------------------------------------------------------------------------

def test_errors_name_the_argument(golden_unet):
    cfg = golden_unet["config"]
    with pytest.raises(ValueError, match="dims"):
        UNet(**{**cfg, "dims": 3})
    with pytest.raises(ValueError, match="num_head_channels"):
        UNet(**{**cfg, "num_head_channels": 24})
    with pytest.raises(ValueError, match="num_heads"):
        UNet(**{**cfg, "num_heads": 3})
    with pytest.raises(ValueError, match="channel_mult"):
        UNet(**{**cfg, "channel_mult": (1, 1.5)})
    with pytest.raises(ValueError, match="backend"):
        UNet(**cfg, backend="fortran")
    model = golden_model(golden_unet)
    with pytest.raises(ValueError, match="backend"):
        model.backend = "gpu"
    x, t, y = golden_unet["x"], golden_unet["t"], golden_unet["y"]
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match="timesteps"):
        model(x, t[:1].repeat(3), y)
    with pytest.raises(ValueError, match="y must have shape"):
        model(x, t, y[:1])
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :2], t, y)
    with pytest.raises(ValueError, match="divisible"):
        model(x[..., :30], t, y)
    uncond = UNet(**{**cfg, "num_classes": None})
    with pytest.raises(ValueError, match="class-conditional"):
        uncond(x, t, y)


def test_exported_names():
    assert ddpm_fast.UNet is UNet
    assert callable(ddpm_fast.from_flags)
