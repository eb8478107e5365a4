"""from_flags: guided-diffusion's flags -> (UNet, Diffusion), defaults, checkpoints, errors."""
import pytest
import torch

import ddpm_fast
from ddpm_fast import Diffusion, from_flags
from ddpm_fast.flags import DEFAULTS, load_checkpoint, model_kwargs, parse_flags

GUIDED_64 = ("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
             "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
             "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True --use_new_attention_order True "
             "--use_fp16 True --use_scale_shift_norm True")
GUIDED_256_UNCOND = ("--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 "
                     "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
                     "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True")
# improved-diffusion's README: CIFAR-10 and ImageNet-64 (MODEL_FLAGS + DIFFUSION_FLAGS)
IMPROVED_CIFAR10 = ("--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
                    "--diffusion_steps 4000 --noise_schedule cosine")
IMPROVED_IMAGENET64 = ("--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
                       "--diffusion_steps 4000 --noise_schedule cosine")

SMALL = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --attention_resolutions 16 --channel_mult 1,2 "
         "--num_heads 2 --learn_sigma True --class_cond True --diffusion_steps 100 --noise_schedule cosine")


def params(model):
    return sum(p.numel() for p in model.parameters())


def test_defaults_are_guided_diffusions():
    model, diffusion = from_flags("", device="meta")
    # model_and_diffusion_defaults(): 64x64, 128 channels, 2 res blocks, 4 heads, attention at 16 and 8
    assert model.image_size == 64 and model.model_channels == 128 and model.num_res_blocks == 2
    assert model.channel_mult == (1, 2, 3, 4)
    assert model.attention_resolutions == (4, 8)
    assert model.num_heads == 4 and model.num_head_channels == -1 and model.num_heads_upsample == 4
    assert model.out_channels == 3 and model.num_classes is None and model.in_channels == 3
    assert model.use_scale_shift_norm and not model.resblock_updown and not model.use_new_attention_order
    assert model.dtype == torch.float32 and not model.training
    assert diffusion.num_timesteps == 1000 and diffusion.schedule == "linear"
    assert diffusion.variance == "fixed_large" and diffusion.prediction == "epsilon"
    assert diffusion.rescale_timesteps is False
    assert model.diffusion is diffusion
    assert model.flags == DEFAULTS


def test_guided_64x64_flags():
    model, diffusion = from_flags(GUIDED_64 + " --timestep_respacing 250", device="meta")
    assert round(params(model) / 1e5) == 2959
    assert model.attention_resolutions == (2, 4, 8)
    assert model.channel_mult == (1, 2, 3, 4) and model.model_channels == 192
    assert model.num_classes == 1000 and model.out_channels == 6
    assert model.middle_block[1].num_heads == 768 // 64 and model.middle_block[1].layout == "new"
    assert model.dtype == torch.float16  # --use_fp16 True, as guided-diffusion's scripts convert it
    assert diffusion.variance == "learned_range" and diffusion.schedule == "cosine"
    assert diffusion.num_timesteps == 250 and diffusion.original_num_steps == 1000
    want = Diffusion(schedule="cosine", timesteps=1000, variance="learned_range").respace("250")
    assert torch.equal(diffusion.timestep_map, want.timestep_map)
    assert torch.equal(diffusion.betas, want.betas)


@pytest.mark.parametrize("flags,size,mult,count", [
    (GUIDED_256_UNCOND, 256, (1, 1, 2, 2, 4, 4), 552.8e6),   # 553.8M minus the 1000 x 1024 label_emb
    ("--image_size 128 --num_channels 256 --num_heads 4 --attention_resolutions 32,16,8 --class_cond True "
     "--learn_sigma True --resblock_updown True", 128, (1, 1, 2, 3, 4), 421.5e6),
    ("--image_size 512 --num_channels 256 --num_head_channels 64 --attention_resolutions 32,16,8 "
     "--class_cond True --learn_sigma True --resblock_updown True", 512, (0.5, 1, 1, 2, 2, 4, 4), 559.0e6),
])
def test_channel_mult_defaults_by_image_size(flags, size, mult, count):
    model, _ = from_flags(flags, device="meta")
    assert model.image_size == size and model.channel_mult == mult
    assert model.attention_resolutions == (size // 32, size // 16, size // 8)
    assert round(params(model) / 1e5) == round(count / 1e5)


@pytest.mark.parametrize("flags,mult", [(IMPROVED_CIFAR10, (1, 2, 2, 2)), (IMPROVED_IMAGENET64, (1, 2, 3, 4))])
def test_improved_diffusion_flags_build(flags, mult):
    model, diffusion = from_flags(flags, device="meta")
    assert model.channel_mult == mult and model.num_res_blocks == 3 and model.out_channels == 6
    assert model.attention_resolutions == (model.image_size // 16, model.image_size // 8)
    assert diffusion.num_timesteps == 4000 and diffusion.variance == "learned_range"
    # every ResBlock and attention block is there: 3 per level down, 4 per level up
    assert len(model.input_blocks) == 1 + 3 * len(mult) + len(mult) - 1
    assert len(model.output_blocks) == 4 * len(mult)


def test_diffusion_flags():
    _, d = from_flags("--sigma_small True --predict_xstart True --rescale_timesteps True "
                      "--diffusion_steps 500 --noise_schedule cosine --timestep_respacing ddim25", device="meta")
    assert d.variance == "fixed_small" and d.prediction == "x0" and d.rescale_timesteps is True
    assert d.num_timesteps == 25 and d.original_num_steps == 500
    assert torch.equal(d.timestep_map, torch.arange(0, 500, 20))
    _, d = from_flags("--learn_sigma True --sigma_small True", device="meta")
    assert d.variance == "learned_range"  # learn_sigma wins, as in create_gaussian_diffusion
    _, d = from_flags("--timestep_respacing 10,15,20 --diffusion_steps 300", device="meta")
    assert d.num_timesteps == 45


def test_flag_syntax_variants():
    a = parse_flags("--image_size=32 --class_cond yes --learn_sigma 1 --dropout 0.25")
    b = parse_flags(["--image_size", "32", "--class_cond", "True", "--learn_sigma", "t", "--dropout", "0.25"])
    c = parse_flags({"image_size": 32, "class_cond": True, "learn_sigma": True, "dropout": 0.25})
    assert a == b == c
    assert a["image_size"] == 32 and a["class_cond"] is True and a["dropout"] == 0.25
    assert parse_flags("--image_size 32 --image_size 64")["image_size"] == 64  # argparse: last wins
    # the sampling scripts' flags are accepted and kept, but build nothing
    model, _ = from_flags("--batch_size 4 --num_samples 100 --use_ddim True --clip_denoised False "
                          "--classifier_scale 1.0 --image_size 32", device="meta")
    assert model.flags["use_ddim"] is True and model.flags["batch_size"] == 4
    assert model.flags["clip_denoised"] is False and model.flags["classifier_scale"] == 1.0
    assert model_kwargs("--image_size 32 --attention_resolutions 32,16,8")["attention_resolutions"] == (1, 2, 4)


@pytest.mark.parametrize("flags,flag", [
    ("--not_a_flag 3", "--not_a_flag"),
    ("--class_cond maybe", "--class_cond"),
    ("--num_channels 12.5", "--num_channels"),
    ("--dropout lots", "--dropout"),
    ("--dropout 1.5", "--dropout"),
    ("--noise_schedule quadratic", "--noise_schedule"),
    ("--timestep_respacing fast", "--timestep_respacing"),
    ("--timestep_respacing 2000", "--timestep_respacing"),
    ("--image_size 48", "--image_size"),
    ("--attention_resolutions 16,x", "--attention_resolutions"),
    ("--attention_resolutions 24", "--attention_resolutions"),
    ("--channel_mult 1,two", "--channel_mult"),
    ("--num_res_blocks 0", "--num_res_blocks"),
    ("--diffusion_steps 0", "--diffusion_steps"),
    ("--num_head_channels 48", "num_head_channels"),
    ("--image_size", "--image_size"),
    ("image_size 64", "image_size"),
    ("--batch_size four", "--batch_size"),
])
def test_bad_flags_raise_naming_the_flag(flags, flag):
    with pytest.raises(ValueError, match=flag):
        from_flags(flags, device="meta")


def test_flags_type_error():
    with pytest.raises(TypeError, match="flags"):
        from_flags(64)


# ---- checkpoints ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_state():
    model, _ = from_flags(SMALL)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.state_dict()


def small_inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([3, 80]), torch.tensor([7, 999])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_round_trip(tmp_path, small_state, suffix):
    path = tmp_path / f"small{suffix}"
    if suffix == ".pt":
        torch.save(small_state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in small_state.items()}, str(path))
    model, diffusion = from_flags(SMALL, checkpoint=path)
    assert model.diffusion is diffusion and diffusion.num_timesteps == 100
    loaded = model.state_dict()
    assert loaded.keys() == small_state.keys()
    assert all(torch.equal(loaded[k], small_state[k]) for k in loaded)
    direct = ddpm_fast.UNet(**model_kwargs(SMALL), backend="torch").eval()
    direct.load_state_dict(small_state)
    x, t, y = small_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), direct(x, t, y), rtol=0, atol=1e-5)


def test_checkpoint_as_state_dict_and_ddp_prefix(tmp_path, small_state):
    model, _ = from_flags(SMALL, checkpoint=dict(small_state))
    assert torch.equal(model.out[2].weight, small_state["out.2.weight"])
    path = tmp_path / "ddp.pt"
    torch.save({"module." + k: v for k, v in small_state.items()}, path)
    assert load_checkpoint(path).keys() == small_state.keys()


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        from_flags(SMALL, checkpoint=tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        from_flags(SMALL, checkpoint=bad)
    with pytest.raises(ValueError, match="meta"):
        from_flags(SMALL, checkpoint={}, device="meta")


@pytest.mark.parametrize("change,keys,flag", [
    ("--class_cond False", "label_emb.weight", "--class_cond"),
    ("--learn_sigma False", "out.2.weight", "--learn_sigma"),
    ("--attention_resolutions 32,16", "qkv", "--attention_resolutions"),
    ("--num_channels 64", "time_embed.0.weight", "--num_channels"),
    ("--use_scale_shift_norm False", "emb_layers.1.weight", "--use_scale_shift_norm"),
    ("--num_res_blocks 2", "input_blocks", "--num_res_blocks"),
    ("--resblock_updown True", "in_layers", "--resblock_updown"),
    ("--channel_mult 1,3", "in_layers.2.weight", "--channel_mult"),
])
def test_mismatched_checkpoint_names_keys_and_flag(tmp_path, small_state, change, keys, flag):
    path = tmp_path / "small.pt"
    torch.save(small_state, path)
    with pytest.raises(ValueError) as info:
        from_flags(SMALL + " " + change, checkpoint=path)
    text = str(info.value)
    assert keys in text and flag in text and "small.pt" in text
