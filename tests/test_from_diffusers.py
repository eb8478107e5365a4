"""ddpm_fast.from_diffusers against diffusers itself (a test dependency): UNet2DModel forwards, the
DDPMScheduler / DDIMScheduler loops, save_pretrained folders, and the errors of unsupported configs.

The published DDPM configs cannot be downloaded here (no Hugging Face hub access): CIFAR10_32
(ddpm_fast.from_diffusers.PUBLISHED) is google/ddpm-cifar10-32's config.json as published on its
model card, written out by hand (the same fields as the other google/ddpm-* checkpoints, e.g.
ddpm-cat-256: DownBlock2D/AttnDownBlock2D encoder, downsample_padding 0, flip_sin_to_cos False,
freq_shift 1, norm_eps 1e-6, one attention head), and its scheduler is DDPMScheduler's linear
1e-4 .. 0.02 / 1000 steps / clip_sample / fixed_small. The reduced-width configs keep those options
at small channel counts and cover every supported block and option combination. Every model gets
random weights first (diffusers zero-initialises nothing here, but every weight should matter).
"""
import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")   # a test dependency (pyproject [test])
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm  # noqa: E402

import ddpm_fast  # noqa: E402
from ddpm_fast import philox  # noqa: E402
from ddpm_fast.from_diffusers import (PUBLISHED, UnsupportedConfig, diffusion_from_scheduler,  # noqa: E402
                                      from_diffusers)
from ddpm_fast.sample import sample_seeds  # noqa: E402

CIFAR10_32, CIFAR10_32_SCHEDULER = PUBLISHED["google/ddpm-cifar10-32"]

# the DDPM layout at reduced width (16x16, 32/64 channels)
SMALL_DDPM = dict(sample_size=16, block_out_channels=(32, 64, 64),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                  attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6)

CONFIGS = {
    "ddpm-layout": SMALL_DDPM,
    "attn-everywhere heads scale_shift": dict(
        sample_size=8, block_out_channels=(32, 64), down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), layers_per_block=1, attention_head_dim=16,
        resnet_time_scale_shift="scale_shift", norm_num_groups=16, norm_eps=1e-5),
    "scale_shift mid attention with attn_norm_num_groups": dict(
        sample_size=8, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, attention_head_dim=8,
        resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32),
    "resnet resampling blocks, classes, no mid attention": dict(
        sample_size=16, block_out_channels=(32, 64), down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"), layers_per_block=2, attention_head_dim=32,
        downsample_type="resnet", upsample_type="resnet", num_class_embeds=5, add_attention=False,
        norm_num_groups=8, flip_sin_to_cos=True, freq_shift=0),
    "attention blocks resampling with ResBlocks, 4 levels": dict(
        sample_size=16, block_out_channels=(32, 32, 64, 64),
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D", "DownBlock2D"),
        up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=16, downsample_type="resnet", upsample_type="resnet",
        resnet_time_scale_shift="scale_shift", num_class_embeds=3),
    "conv resampling, classes, learned-variance output": dict(
        sample_size=8, block_out_channels=(32, 64), down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"), layers_per_block=1, attention_head_dim=None,
        out_channels=6, num_class_embeds=4, downsample_padding=1),
}


def random_unet(config: dict, seed: int = 0, std: float = 0.05) -> UNet2DModel:
    """A diffusers UNet2DModel of `config` with every parameter N(0, std^2) (norm weights 1 + that)."""
    torch.manual_seed(seed)
    model = UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            draw = torch.randn(p.shape, generator=gen) * std
            p.copy_(draw + 1 if "norm" in name and name.endswith("weight") else draw)
    return model


def _inputs(model: UNet2DModel, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = None if c.num_class_embeds is None else torch.randint(0, c.num_class_embeds, (batch,), generator=g)
    return x, t, y


def _check_forward(ref: UNet2DModel, ours: ddpm_fast.UNet, batch: int, what: str) -> float:
    x, t, y = _inputs(ref, batch)
    with torch.no_grad():
        want = ref(x, t, class_labels=y).sample
        got = ours(x, t, y)
        got_cl = ours(x.contiguous(memory_format=torch.channels_last), t, y)
    err = max((got - want).abs().max().item(), (got_cl - want).abs().max().item())
    print(f"\n{what}: max |ours - diffusers| = {err:.2e} (outputs up to {want.abs().max().item():.3f})")
    assert want.abs().max() > 0.05 and want.std() > 0.01       # a real output, not zeros
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(got_cl, want, rtol=0, atol=1e-4)
    return err


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_forward_matches_diffusers(name):
    ref = random_unet(CONFIGS[name])
    learned = ref.config.out_channels == 2 * ref.config.in_channels
    model, _ = from_diffusers(ref, DDPMScheduler(variance_type="learned_range") if learned else None)
    assert model.fast and model.backend == "auto"
    _check_forward(ref, model, 3, name)
    ref_model = from_diffusers(ref, model.diffusion, backend="torch")[0]   # the pure-PyTorch reference ops, too
    _check_forward(ref, ref_model, 2, name + " (backend torch)")


def test_full_size_cifar10_32_forward():
    """google/ddpm-cifar10-32's config at full size (35.7 M parameters), batch 2."""
    ref = random_unet(CIFAR10_32, std=0.02)
    assert sum(p.numel() for p in ref.parameters()) == 35_746_307
    model, diffusion = from_diffusers(ref, CIFAR10_32_SCHEDULER)
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    _check_forward(ref, model, 2, "cifar10-32")
    assert diffusion.num_timesteps == 1000 and diffusion.prediction == "epsilon"


def test_timestep_embedding_conventions():
    from diffusers.models.embeddings import get_timestep_embedding

    from ddpm_fast.unet import timestep_embedding

    t = torch.tensor([0, 1, 17, 500, 999])
    for flip in (True, False):
        for shift in (0, 1):
            want = get_timestep_embedding(t, 32, flip_sin_to_cos=flip, downscale_freq_shift=shift)
            torch.testing.assert_close(timestep_embedding(t, 32, flip_sin_to_cos=flip, freq_shift=shift),
                                       want, rtol=0, atol=1e-6)


# ---- the scheduler ------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    dict(beta_schedule="linear"), dict(beta_schedule="linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="sigmoid"), dict(beta_schedule="linear", num_train_timesteps=500),
    dict(trained_betas=list(np.linspace(1e-4, 0.03, 1000)))])
def test_scheduler_tables_match_diffusers(config):
    ref = DDPMScheduler(**config)
    ours = diffusion_from_scheduler(ref)
    assert ours.betas.dtype == torch.float64 and ours.num_timesteps == ref.config.num_train_timesteps
    torch.testing.assert_close(ours.betas, ref.betas.double(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=5e-5, atol=1e-9)


def test_scheduler_options_map():
    d = diffusion_from_scheduler(DDPMScheduler(prediction_type="v_prediction", variance_type="learned_range",
                                               clip_sample=False, timestep_spacing="trailing"))
    assert (d.prediction, d.variance, d.clip_sample, d.timestep_spacing) == ("v", "learned_range", False, "trailing")
    assert d.sample_options() == {"clip_denoised": False}
    d = diffusion_from_scheduler(DDIMScheduler(prediction_type="sample", thresholding=True,
                                               dynamic_thresholding_ratio=0.9, sample_max_value=2.0))
    assert (d.prediction, d.dynamic_threshold, d.scheduler_class) == ("x0", (0.9, 2.0), "DDIMScheduler")
    assert diffusion_from_scheduler(DDPMScheduler(variance_type="fixed_large")).variance == "fixed_large"
    assert diffusion_from_scheduler(DDPMScheduler(variance_type="fixed_small_log")).variance == "fixed_small"


def test_thresholding_maps_to_sample_dynamic_threshold():
    """A thresholding scheduler's dynamic thresholding becomes sample()'s dynamic_threshold (and
    turns clip_denoised off); the loop itself is checked against diffusers in
    test_ddpm_thresholding_matches_diffusers_loop."""
    d = diffusion_from_scheduler(DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0))
    assert d.sample_options() == {"clip_denoised": False, "dynamic_threshold": (0.9, 2.0)}


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_int_steps_respace_like_set_timesteps(spacing, offset):
    ref = DDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(20)
    d = diffusion_from_scheduler(ref)
    for spec in (20, "20"):
        spaced = d.respace(spec)
        assert spaced.timestep_map.flip(0).tolist() == ref.timesteps.tolist()
        assert spaced.clip_sample and spaced.timestep_spacing == spacing   # the options survive respacing
    assert d.respace("ddim20").timestep_map.tolist() == list(range(0, 1000, 50))   # guided-diffusion's syntax


# ---- whole sampling loops against diffusers' scheduler loops -----------------------------------

N_STEPS = 20


@pytest.fixture(scope="module")
def small_pipeline():
    """The reduced-width DDPM-layout U-Net (diffusers and ddpm_fast) with random weights."""
    ref = random_unet(SMALL_DDPM, seed=3)
    return ref, from_diffusers(ref)[0]


def _philox_noise(seeds, shape):
    """noises[s]: the in-kernel noise of step index s for these per-sample seeds (sample()'s draw)."""
    return torch.stack([philox.philox_normal(seeds, s, shape) for s in range(N_STEPS)])


def _diffusers_loop(ref, sched, x_T, noises=None, monkeypatch=None, **step_kw):
    """diffusers' scheduler loop (as DDPMPipeline / DDIMPipeline run it), its noise draws replaced
    by noises[step index] (step index n - 1 - k at the k-th timestep)."""
    sched.set_timesteps(N_STEPS)
    x = x_T.clone()
    for k, t in enumerate(sched.timesteps):
        if noises is not None:
            draw = noises[N_STEPS - 1 - k]
            for module in (scheduling_ddpm, scheduling_ddim):
                monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: draw.clone())
        with torch.no_grad():
            out = ref(x, t).sample
        x = sched.step(out, t, x, **step_kw).prev_sample
    return x


def _report(what, got, want):
    """The loops compound the forwards' ~1e-5 differences over 20 steps through a random-weight
    U-Net (measured: 5e-6 .. 1.5e-4, largest for deterministic DDIM); a wrong step, schedule or
    noise is off by 1e-2 and more."""
    err = (got - want).abs().max().item()
    print(f"\n{what}: max |ours - diffusers| = {err:.2e} (samples up to {want.abs().max().item():.2f})")
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=5e-4)


def _ddpm_runs(small_pipeline, monkeypatch, sched, x_seed, seed):
    """(ours, diffusers', converted process, x_T): ddpm_fast.sample with the scheduler's options
    (fused steps, in-kernel noise) and DDPMScheduler's loop fed that noise, from one x_T."""
    ref, model = small_pipeline
    _, diffusion = from_diffusers(ref, sched)
    shape = (3, 16, 16)
    x_T = torch.randn(2, *shape, generator=torch.Generator().manual_seed(x_seed))
    got = ddpm_fast.sample(model, steps=N_STEPS, diffusion=diffusion, x_T=x_T, seed=seed, progress=False,
                           **diffusion.sample_options())
    noises = _philox_noise(sample_seeds(seed, 0, 2), shape)
    want = _diffusers_loop(ref, DDPMScheduler.from_config(sched.config), x_T, noises, monkeypatch)
    return got, want, diffusion, x_T


@pytest.mark.parametrize("variance,prediction,spacing", [("fixed_small", "epsilon", "leading"),
                                                         ("fixed_large", "epsilon", "leading"),
                                                         ("fixed_small", "v_prediction", "trailing")])
def test_ddpm_sample_matches_diffusers_loop(small_pipeline, monkeypatch, variance, prediction, spacing):
    """ddpm_fast.sample (fused steps, in-kernel noise) == DDPMScheduler's loop fed that noise."""
    sched = DDPMScheduler(variance_type=variance, prediction_type=prediction, timestep_spacing=spacing)
    got, want, _, _ = _ddpm_runs(small_pipeline, monkeypatch, sched, x_seed=0, seed=11)
    _report(f"DDPM {variance} {prediction} {spacing}", got, want)


def test_ddpm_thresholding_matches_diffusers_loop(small_pipeline, monkeypatch):
    """sample(dynamic_threshold=...) from a thresholding DDPMScheduler == its loop (Imagen's dynamic
    thresholding of x0 by the per-sample quantile of |x0|)."""
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=1.5)
    got, want, diffusion, x_T = _ddpm_runs(small_pipeline, monkeypatch, sched, x_seed=4, seed=12)
    plain = ddpm_fast.sample(small_pipeline[1], steps=N_STEPS, diffusion=diffusion, x_T=x_T, seed=12,
                             progress=False)
    assert (plain - want).abs().max() > 1e-2     # the thresholding changes this run
    _report("DDPM thresholding", got, want)


@pytest.mark.parametrize("eta,spacing", [(0.0, "trailing"), (0.0, "leading"), (1.0, "leading")])
def test_ddim_sample_matches_diffusers_loop(small_pipeline, monkeypatch, eta, spacing):
    """ddpm_fast.sample(method="ddim") == DDIMScheduler's loop (use_clipped_model_output=True: eps
    from the clipped x0, ddpm_fast's DDIM convention)."""
    ref, model = small_pipeline
    sched = DDIMScheduler(timestep_spacing=spacing)
    _, diffusion = from_diffusers(ref, sched)
    shape = (3, 16, 16)
    x_T = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    got = ddpm_fast.sample(model, steps=N_STEPS, diffusion=diffusion, x_T=x_T, method="ddim", eta=eta, seed=5,
                           progress=False, **diffusion.sample_options())
    noises = _philox_noise(sample_seeds(5, 0, 2), shape) if eta else None
    want = _diffusers_loop(ref, DDIMScheduler.from_config(sched.config), x_T, noises, monkeypatch, eta=eta,
                           use_clipped_model_output=True)
    _report(f"DDIM eta {eta} {spacing}", got, want)


def test_ddim_default_eps_convention_matches_diffusers(small_pipeline):
    """diffusers' DDIMPipeline default (use_clipped_model_output=False: the model's own eps) is the
    step's eps_from_x0=False, on the converted model and process, at every step of a 20-step run.
    Compared along diffusers' trajectory: fed back through a random-weight U-Net the model's raw
    eps makes this loop expansive (a 1e-6 difference grows ~2.5x per step), unlike the clipped-eps
    loop of the tests above."""
    ref, model = small_pipeline
    _, diffusion = from_diffusers(ref, DDIMScheduler())
    process = diffusion.respace(N_STEPS)
    sched = DDIMScheduler()
    sched.set_timesteps(N_STEPS)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    worst = 0.0
    for k, t in enumerate(sched.timesteps):
        idx = torch.full((2,), N_STEPS - 1 - k)
        with torch.no_grad():
            want = sched.step(ref(x, t).sample, t, x).prev_sample
            got, _ = process.p_sample_step(x, model(x, process.model_timesteps(idx)), idx, method="ddim",
                                           eps_from_x0=False)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        worst = max(worst, (got - want).abs().max().item())
        x = want
    print(f"\nDDIM default eps, per step: max |ours - diffusers| = {worst:.2e}")
    assert x.abs().max() > 0.5


# ---- folders ------------------------------------------------------------------------------------

def test_save_pretrained_round_trip(tmp_path):
    ref = random_unet(CONFIGS["resnet resampling blocks, classes, no mid attention"], seed=4)
    ref.save_pretrained(tmp_path / "unet_only")                                      # safetensors
    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False,
                          timestep_spacing="trailing")
    DDPMPipeline(unet=ref, scheduler=sched).save_pretrained(tmp_path / "pipe", safe_serialization=False)  # .bin
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.bin").is_file()
    direct, _ = from_diffusers(ref)
    x, t, y = _inputs(ref, 2)
    with torch.no_grad():
        want = ref(x, t, class_labels=y).sample
        for folder in (tmp_path / "unet_only", tmp_path / "pipe"):
            model, diffusion = from_diffusers(folder)
            torch.testing.assert_close(model(x, t, y), want, rtol=0, atol=1e-4)
            for (k, a), (k2, b) in zip(model.state_dict().items(), direct.state_dict().items()):
                assert k == k2 and torch.equal(a, b), k
    assert model.diffusion is diffusion
    assert (diffusion.scheduler_class, diffusion.prediction, diffusion.timestep_spacing, diffusion.clip_sample) == \
        ("DDIMScheduler", "v", "trailing", False)
    torch.testing.assert_close(diffusion.alphas_cumprod, sched.alphas_cumprod.double(), rtol=5e-5, atol=1e-9)
    # the unet-only folder has no scheduler: DDPMScheduler's defaults; one can be given as a path
    _, default = from_diffusers(tmp_path / "unet_only")
    assert (default.scheduler_class, default.prediction, default.clip_sample) == ("DDPMScheduler", "epsilon", True)
    _, given = from_diffusers(tmp_path / "unet_only", tmp_path / "pipe" / "scheduler")
    assert given.prediction == "v"


def test_cli_samples_a_diffusers_folder(tmp_path):
    from ddpm_fast.cli import main

    ref = random_unet(CONFIGS["conv resampling, classes, learned-variance output"], seed=6)
    DDPMPipeline(unet=ref, scheduler=DDPMScheduler(variance_type="learned_range")).save_pretrained(tmp_path / "p")
    out = tmp_path / "s.npz"
    assert main(["sample", "--diffusers", str(tmp_path / "p"), "--num-samples", "3", "--batch-size", "3",
                 "--steps", "4", "--out", str(out), "--grid", "", "--no-progress", "--device", "cpu"]) == 0
    arrays = np.load(out)
    assert arrays["arr_0"].shape == (3, 8, 8, 3) and arrays["arr_0"].dtype == np.uint8
    assert arrays["arr_1"].tolist() == [0, 1, 2] and arrays["arr_0"].std() > 0
    with pytest.raises(SystemExit) as exit_info:   # a whole model: not with --flags
        main(["sample", "--diffusers", str(tmp_path / "p"), "--flags", "--image_size 8", "--out", str(out)])
    assert exit_info.value.code == 2


# ---- unsupported configs ----------------------------------------------------------------------

@pytest.mark.parametrize("change,field", [
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(time_embedding_type="fourier"), "time_embedding_type"),
    (dict(up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D")), "up_block_types"),
    (dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")), "down_block_types"),
    (dict(center_input_sample=True), "center_input_sample"),
    (dict(act_fn="mish"), "act_fn"),
    (dict(mid_block_scale_factor=2.0), "mid_block_scale_factor"),
    (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift"),
    (dict(cross_attention_dim=8), "cross_attention_dim")])
def test_unsupported_unet_config_names_the_field(change, field):
    from ddpm_fast.from_diffusers import unet_kwargs

    with pytest.raises(UnsupportedConfig, match=f"field {field}="):
        unet_kwargs({**SMALL_DDPM, **change})


@pytest.mark.parametrize("config,field", [
    (dict(_class_name="EulerDiscreteScheduler"), "_class_name"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (dict(variance_type="learned"), "variance_type"),
    (dict(beta_schedule="laplace"), "beta_schedule"),
    (dict(_class_name="DDIMScheduler", set_alpha_to_one=False), "set_alpha_to_one"),
    (dict(clip_sample_range=2.0), "clip_sample_range"),
    (dict(prediction_type="flow"), "prediction_type")])
def test_unsupported_scheduler_config_names_the_field(config, field):
    with pytest.raises(UnsupportedConfig, match=f"field {field}="):
        diffusion_from_scheduler(config)


def test_mismatched_weights_and_output_channels_are_refused(tmp_path):
    ref = random_unet(SMALL_DDPM)
    with pytest.raises(UnsupportedConfig, match="out_channels"):
        from_diffusers(ref, DDPMScheduler(variance_type="learned_range"))   # needs 6 output channels
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "layers_per_block": 1}))
    with pytest.raises(ValueError, match="does the config match the weights"):
        from_diffusers(tmp_path)
    with pytest.raises(FileNotFoundError, match="pipeline folder"):
        from_diffusers(tmp_path / "nothing")


@pytest.mark.cuda
def test_class_conditional_forward_does_not_sync_on_gpu():
    """UNet.forward reads no labels back to the host on a GPU (sample/restore/CLI check them once)."""
    ref = random_unet(CONFIGS["resnet resampling blocks, classes, no mid attention"])
    model = from_diffusers(ref)[0].cuda()
    x, t, y = (v.cuda() for v in _inputs(ref, 2))
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            model(x, t, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
