"""ddpm_fast.sample and the static loop: equal to the diffusion core's reference loop with the
same noise, reproducible across batch sizes, guidance, progress and errors."""
import pytest
import torch
from conftest import randomize_weights, tiny_unet

import ddpm_fast
from ddpm_fast import graphs, philox
from ddpm_fast.diffusion import Diffusion, reference_sample_loop
from ddpm_fast.sample import sample_seeds


class FakeEps(torch.nn.Module):
    """A deterministic per-sample 'model': eps from x, t and (optionally) the label; the variance
    channels (learned_range) are tanh of the channel mean."""

    def __init__(self, channels=3, size=8, num_classes=None, learn_sigma=False, null_label=None):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = channels, size, num_classes
        self.null_label = null_label
        self.learn_sigma = learn_sigma
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.0, channels).reshape(1, channels, 1, 1))
        self.calls = 0

    def forward(self, x, t, y=None):
        self.calls += 1
        tt = t.float().reshape(-1, 1, 1, 1) / 1000
        eps = 0.5 * torch.tanh(x) * (1 + tt) * self.w + 0.1 * torch.sin(3 * x + tt)
        if y is not None:
            eps = eps + 0.05 * (y.float().reshape(-1, 1, 1, 1) - 2)
        if self.learn_sigma:
            v = torch.tanh(x.mean(1, keepdim=True) + tt).expand_as(x)
            return torch.cat([eps, v], 1)
        return eps


def _philox_noise(seeds, shape):
    return lambda i, x: philox.philox_normal(seeds, i, shape)


def _pair(diffusion, model, steps, seed=5, n=3, backend="torch", **opts):
    """(fast sample, reference loop) from the same x_T and the same per-step noise."""
    shape = (model.in_channels, model.image_size, model.image_size)
    seeds = sample_seeds(seed, 0, n)
    x_T = philox.initial_noise(seeds, shape)
    process = diffusion.skip(opts.pop("skip")) if "skip" in opts else diffusion.respace(steps)
    ref_opts = {k: v for k, v in opts.items() if k not in ("noise",)}
    fast = ddpm_fast.sample(model, steps=None, diffusion=process, num_samples=n, batch_size=n,
                            seed=seed, progress=False, backend=backend, **opts)
    ref = reference_sample_loop(model, process, x_T, noise=_philox_noise(seeds, shape),
                                noise_mode=opts.get("noise", "normal"), **ref_opts)
    return fast, ref


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("opts", [
    dict(method="ddpm"),
    dict(method="ddpm", clip_denoised=False),
    dict(method="ddim", eta=0.0),
    dict(method="ddim", eta=1.0, noise="squared"),
    dict(method="ddim", eta=0.5, project_noise="pixel"),
    dict(method="ddim", eta=1.0, project_noise="sample", clip=(-1.0, 1.0)),
    dict(method="ddim", eta=1.0, noise="zero", skip=3),
])
def test_static_loop_equals_reference_loop(opts, backend):
    d = Diffusion("cosine", 60, variance="learned_range")
    model = FakeEps(learn_sigma=True)
    fast, ref = _pair(d, model, "12", backend=backend, **dict(opts))
    assert torch.allclose(fast, ref, atol=1e-5), (fast - ref).abs().max()


def test_fixed_variance_and_guidance_equal_reference():
    d = Diffusion("linear", 50, variance="fixed_small")
    model = FakeEps(num_classes=5)
    labels = torch.tensor([0, 3, 4])

    def cond_fn(x, t, y=None):
        return -0.3 * x + 0.05 * t.float().reshape(-1, 1, 1, 1) / 1000

    for method in ("ddpm", "ddim"):
        fast, ref = _pair(d, model, "10", method=method, eta=0.3, class_labels=labels, cond_fn=cond_fn)
        assert torch.allclose(fast, ref, atol=1e-5), (method, (fast - ref).abs().max())


def test_classifier_free_guidance_equals_reference():
    d = Diffusion("cosine", 40, variance="learned_range")
    model = FakeEps(num_classes=6, learn_sigma=True, null_label=5)
    fast, ref = _pair(d, model, "8", method="ddim", class_labels=torch.tensor([1, 2, 0]),
                      guidance_scale=3.0, null_label=5)
    assert torch.allclose(fast, ref, atol=1e-5)


def test_same_image_whatever_the_batch():
    d = Diffusion("cosine", 40, variance="learned_range")
    model = FakeEps(learn_sigma=True)
    whole = ddpm_fast.sample(model, steps="10", diffusion=d, num_samples=5, batch_size=5, seed=11,
                             progress=False)
    split = ddpm_fast.sample(model, steps="10", diffusion=d, num_samples=5, batch_size=2, seed=11,
                             progress=False)
    tail = ddpm_fast.sample(model, steps="10", diffusion=d, num_samples=2, batch_size=2, seed=11,
                            start_index=3, progress=False)
    assert torch.equal(whole, split)  # an elementwise model: every step is exactly per sample
    assert torch.equal(whole[3:], tail)
    again = ddpm_fast.sample(model, steps="10", diffusion=d, num_samples=5, batch_size=5, seed=11,
                             progress=False)
    assert torch.equal(whole, again)
    other = ddpm_fast.sample(model, steps="10", diffusion=d, num_samples=5, batch_size=5, seed=12,
                             progress=False)
    assert (whole - other).abs().max() > 0.1


@pytest.mark.parametrize("opts", [dict(method="ddpm"), dict(method="ddim", eta=1.0, project_noise="sample")],
                         ids=["ddpm", "ddim-projection"])
def test_same_image_whatever_the_batch_on_a_real_unet(opts):
    """Batch-size invariance with a randomised U-Net (attention, AdaGN, learned variance): sample i
    is the same image in a batch of 5, in batches of 2, and alone from start_index (the fused
    kernels work per sample; the convolutions and matmuls may block a batch differently: float
    roundings, which DDIM's noise projection amplifies to ~1e-4 over the steps); the labels change it."""
    model = tiny_unet(seed=2)
    labels = torch.tensor([0, 1, 2, 3, 1])
    kw = dict(steps="4", seed=11, progress=False, **opts)
    whole = ddpm_fast.sample(model, num_samples=5, batch_size=5, class_labels=labels, **kw)
    split = ddpm_fast.sample(model, num_samples=5, batch_size=2, class_labels=labels, **kw)
    tail = ddpm_fast.sample(model, num_samples=2, batch_size=2, class_labels=labels[3:], start_index=3, **kw)
    torch.testing.assert_close(split, whole, rtol=0, atol=2e-4)
    torch.testing.assert_close(tail, whole[3:], rtol=0, atol=2e-4)
    relabelled = ddpm_fast.sample(model, num_samples=5, batch_size=5, class_labels=(labels + 1) % 4, **kw)
    assert (relabelled - whole).abs().amax((1, 2, 3)).min() > 0.01


def test_model_called_once_per_step_and_x0():
    d = Diffusion("linear", 100)
    model = FakeEps()
    x, x0 = ddpm_fast.sample(model, skip=3, diffusion=Diffusion("cosine", 10), num_samples=2,
                             batch_size=2, seed=0, progress=False, return_x0=True)
    assert model.calls == 6  # K = 3 on N = 10 visits 9, 8, 5, 2, 1, 0
    assert torch.allclose(x, x0, atol=1e-6)  # the last DDPM step returns its clipped x0
    model.calls = 0
    ddpm_fast.sample(model, steps="ddim25", diffusion=d, method="ddim", progress=False)
    assert model.calls == 25


def test_progress_bar_and_silence(capsys):
    d = Diffusion("linear", 20)
    ddpm_fast.sample(FakeEps(), steps=None, diffusion=d, progress=False)
    assert capsys.readouterr().err == ""
    ddpm_fast.sample(FakeEps(), steps=None, diffusion=d, progress=True)
    assert "sampling" in capsys.readouterr().err


def test_errors_name_the_argument():
    d = Diffusion("linear", 20)
    m = FakeEps()
    with pytest.raises(ValueError, match="channels"):
        ddpm_fast.sample(m, diffusion=d, shape=(1, 8, 8), steps=None)
    with pytest.raises(ValueError, match="image_size"):
        ddpm_fast.sample(m, diffusion=d, shape=(3, 16, 16), steps=None)
    with pytest.raises(ValueError, match="not class-conditional"):
        ddpm_fast.sample(m, diffusion=d, class_labels=[0], steps=None)
    with pytest.raises(ValueError, match="method"):
        ddpm_fast.sample(m, diffusion=d, method="euler", steps=None)
    with pytest.raises(ValueError, match="eta"):
        ddpm_fast.sample(m, diffusion=d, method="ddim", eta=1.5, steps=None)
    with pytest.raises(ValueError, match="cuda_graph=True"):
        ddpm_fast.sample(m, diffusion=d, cuda_graph=True, steps=None)
    with pytest.raises(ValueError, match="class_labels must lie"):
        ddpm_fast.sample(FakeEps(num_classes=3), diffusion=d, class_labels=[0, 3], steps=None)
    with pytest.raises(ValueError, match="no diffusion"):
        ddpm_fast.sample(m)
    with pytest.raises(ValueError, match="noise"):
        ddpm_fast.sample(m, diffusion=d, noise="loud", steps=None)


@pytest.mark.cuda
def test_cuda_graph_equals_eager_and_is_reused():
    d = Diffusion("cosine", 50, variance="learned_range")
    model = FakeEps(learn_sigma=True).cuda()
    graphs.clear_cache()
    eager = ddpm_fast.sample(model, steps="10", diffusion=d, num_samples=4, batch_size=4, seed=1,
                             cuda_graph=False, progress=False)
    first = ddpm_fast.sample(model, steps="10", diffusion=d, num_samples=4, batch_size=4, seed=1,
                             cuda_graph=True, progress=False)
    assert graphs.cache_size() == 1
    replay = ddpm_fast.sample(model, steps="10", diffusion=d, num_samples=4, batch_size=4, seed=1,
                              cuda_graph=True, progress=False)
    other = ddpm_fast.sample(model, steps="10", diffusion=d, num_samples=4, batch_size=4, seed=2,
                             cuda_graph=True, progress=False)
    assert graphs.cache_size() == 1  # replayed, not recaptured
    torch.testing.assert_close(first, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(replay, eager, atol=1e-5, rtol=1e-5)
    assert (other - eager).abs().max() > 0.1


def test_ddim_on_golden_unet_equals_reference_loop(golden_unet):
    """Deterministic DDIM (eta 0) through sample() with guided-diffusion's golden weights equals
    the diffusion core's reference loop with the same model (reference ops)."""
    import copy

    cfg = dict(golden_unet["config"])
    model = ddpm_fast.UNet(**cfg).eval()
    model.load_state_dict(golden_unet["state_dict"], strict=True)
    ref_model = copy.deepcopy(model)
    ref_model.backend = "torch"
    ref_model.fast = False
    d = Diffusion("cosine", 1000, variance="learned_range")
    seeds = sample_seeds(7, 0, 2)
    x_T = philox.initial_noise(seeds, (3, 32, 32))
    labels = torch.tensor([3, 1])
    fast = ddpm_fast.sample(model, steps="ddim8", diffusion=d, method="ddim", eta=0.0, x_T=x_T,
                            class_labels=labels, batch_size=2, progress=False)
    with torch.no_grad():
        ref = reference_sample_loop(ref_model, d.respace("ddim8"), x_T, method="ddim", eta=0.0,
                                    class_labels=labels)
    assert torch.allclose(fast, ref, atol=1e-4), (fast - ref).abs().max()
    assert fast.abs().max() <= 1.0 + 1e-6


def test_cli_sample_end_to_end(tmp_path):
    import numpy as np
    from PIL import Image

    from ddpm_fast.cli import main

    flags = ("--image_size 8 --num_channels 32 --num_res_blocks 1 --attention_resolutions 4 "
             "--channel_mult 1,2 --num_head_channels 16 --class_cond True --learn_sigma True "
             "--diffusion_steps 20 --noise_schedule cosine")
    model, _ = ddpm_fast.from_flags(flags)
    randomize_weights(model, seed=3)  # a fresh model outputs 0 whatever its checkpoint and labels
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    out, grid = tmp_path / "s.npz", tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(ckpt), "--flags", flags, "--num-samples", "5",
                 "--batch-size", "2", "--steps", "4", "--out", str(out), "--grid", str(grid),
                 "--no-progress"]) == 0
    with np.load(out) as data:
        images = data["arr_0"]
        assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
        assert data["arr_1"].tolist() == [0, 1, 2, 3, 4]
    # the images are sample()'s with the checkpoint's weights and those labels (the CLI's seed 0)
    kw = dict(steps="4", num_samples=5, batch_size=2, seed=0, progress=False)
    want = ddpm_fast.sample(model.eval(), class_labels=torch.arange(5), **kw)
    np.testing.assert_array_equal(images, ddpm_fast.to_images(want))
    other_labels = ddpm_fast.to_images(ddpm_fast.sample(model, class_labels=torch.arange(5) + 5, **kw))
    assert np.abs(other_labels.astype(int) - images).max() > 8  # labels and weights reach the images
    with Image.open(grid) as im:
        assert im.size[0] > 8 and im.size[1] > 8
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", str(ckpt), "--num-samples", "2"])  # flags missing
