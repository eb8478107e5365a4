"""ddpm_fast.restore: inpainting (RePaint resampling) and strength-based restoration."""
import pytest
import torch

import ddpm_fast
from ddpm_fast.diffusion import Diffusion
from ddpm_fast.restore import repaint_schedule


class Recorder(torch.nn.Module):
    """Records the timesteps it is called with; predicts a smooth eps."""

    def __init__(self):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = 1, 8, None
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append(int(t[0]))
        return 0.3 * torch.tanh(x) * self.w


def test_repaint_schedule_and_model_calls():
    assert repaint_schedule(5, 10, 1) == [4, 3, 2, 1, 0, -1]
    sched = repaint_schedule(10, 3, 2)
    assert sched == [9, 8, 7, 6, 7, 8, 9, 8, 7, 6, 5, 4, 3, 4, 5, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, -1]
    d = Diffusion("cosine", 10)
    model = Recorder()
    image = torch.zeros(2, 1, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4, :] = 1
    ddpm_fast.restore(model, image, mask, diffusion=d, steps=None, jump_length=3, jump_n_sample=2,
                      reconstruction_guidance=0.0, progress=False)
    # one model call per downward move of the schedule, at that step's (original) timestep
    expected = [a for a, b in zip(sched, sched[1:]) if b < a]
    assert model.seen == expected


def test_known_pixels_preserved_exactly_and_unknown_generated():
    d = Diffusion("cosine", 20)
    torch.manual_seed(0)
    image = torch.rand(3, 1, 8, 8) * 2 - 1
    mask = (torch.rand(3, 1, 8, 8) > 0.5).float()
    out = ddpm_fast.restore(Recorder(), image, mask, diffusion=d, steps=None, progress=False)
    assert torch.equal(out[mask.bool()], image[mask.bool()])
    assert (out[~mask.bool()] - image[~mask.bool()]).abs().max() > 0.05


def _spy_on_the_loop(monkeypatch):
    """Record what restore's reverse loop sees at each step: the step index s, x once the known
    region has been put back (before the model call) and the step id of the step's noise."""
    import sys

    module = sys.modules["ddpm_fast.restore"]
    real = module.reverse_loop
    visits = []

    def spy(fn, plan, x, seeds, *, before_step, **kw):
        def hooked(x, s):
            x = before_step(x, s)
            visits.append(dict(s=s, x=x.clone(), step_id=int(plan.step_ids[s])))
            return x
        return real(fn, plan, x, seeds, before_step=hooked, **kw)

    monkeypatch.setattr(module, "reverse_loop", spy)
    return visits


def _restore_in_the_loop(monkeypatch):
    """Inpaint the left half of two 32x32 images (10 steps, RePaint jumps of 3, 2 passes, no
    reconstruction guidance) with the loop spied on: (visits, image, known pixels, diffusion)."""
    visits = _spy_on_the_loop(monkeypatch)
    d = Diffusion("cosine", 10)
    model = Recorder()
    model.image_size = 32
    g = torch.Generator().manual_seed(4)
    image = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., :, :16] = 1
    ddpm_fast.restore(model, image, mask, diffusion=d, steps=None, jump_length=3, jump_n_sample=2,
                      reconstruction_guidance=0.0, seed=5, progress=False)
    return visits, image, mask.expand_as(image).bool(), d


def _known_noise(visit, image, known, diffusion):
    """z of the known pixels before a step s: x = sqrt(ab_s) image + sqrt(1 - ab_s) z, float64."""
    ab = diffusion.alphas_cumprod[visit["s"]]
    return (visit["x"][known].double() - ab.sqrt() * image[known].double()) / (1 - ab).sqrt()


def test_inside_the_loop_visit_order_and_known_region_level(monkeypatch):
    """Inside the loop (not only in the composited result): RePaint's visit order, and before each
    step s the known pixels are the image forward-noised to that step's level, x = sqrt(ab_s) image
    + sqrt(1 - ab_s) z with z standard normal and independent of the image."""
    visits, image, known, d = _restore_in_the_loop(monkeypatch)
    sched = repaint_schedule(10, 3, 2)
    assert [v["s"] for v in visits] == [a for a, b in zip(sched, sched[1:]) if b < a]
    for v in visits:
        z = _known_noise(v, image, known, d)
        assert abs(z.mean().item()) < 0.15 and abs(z.std().item() - 1) < 0.1, (v["s"], z.mean(), z.std())
        assert abs(torch.corrcoef(torch.stack([z, image[known].double()]))[0, 1].item()) < 0.15, v["s"]


def test_every_pass_draws_fresh_noise(monkeypatch):
    """RePaint re-samples: each pass over a step draws new noise, for the step (its own noise
    step id) and for the forward-noised known region (a new z, uncorrelated with the last)."""
    visits, image, known, d = _restore_in_the_loop(monkeypatch)
    assert len({v["step_id"] for v in visits}) == len(visits), "a step id (noise stream) used twice"
    noise_of = {}
    for v in visits:
        noise_of.setdefault(v["s"], []).append(_known_noise(v, image, known, d))
    revisited = [zs for zs in noise_of.values() if len(zs) > 1]
    assert revisited
    for zs in revisited:
        corr = torch.corrcoef(torch.stack(zs))
        assert (corr - torch.eye(len(zs), dtype=corr.dtype)).abs().max() < 0.15, "known-region noise reused"


def test_strength_starts_part_way():
    d = Diffusion("cosine", 20)
    model = Recorder()
    ddpm_fast.restore(model, torch.zeros(1, 1, 8, 8), diffusion=d, steps=None, strength=0.3,
                      progress=False)
    assert model.seen == [5, 4, 3, 2, 1, 0]  # round(0.3 * 20) - 1 = 5 down to 0


def test_bad_inputs():
    d = Diffusion("cosine", 20)
    m = Recorder()
    img = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="mask must have shape"):
        ddpm_fast.restore(m, img, torch.ones(2, 1, 4, 4), diffusion=d)
    with pytest.raises(ValueError, match=r"image must lie in \[-1, 1\]"):
        ddpm_fast.restore(m, img + 2, torch.ones(2, 1, 8, 8), diffusion=d)
    with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\]"):
        ddpm_fast.restore(m, img, strength=1.5, diffusion=d)
    with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\]"):
        ddpm_fast.restore(m, img, strength=0.0, diffusion=d)
    with pytest.raises(ValueError, match="image has shape"):
        ddpm_fast.restore(m, torch.zeros(2, 3, 8, 8), torch.ones(2, 1, 8, 8), diffusion=d)
    with pytest.raises(ValueError, match="mask .* or a strength"):
        ddpm_fast.restore(m, img, diffusion=d)
    with pytest.raises(ValueError, match="jump_length"):
        ddpm_fast.restore(m, img, torch.ones(2, 1, 8, 8), diffusion=d, jump_length=0)
    with pytest.raises(ValueError, match="reconstruction_guidance must be >= 0"):
        ddpm_fast.restore(m, img, torch.ones(2, 1, 8, 8), diffusion=d, reconstruction_guidance=-1.0)
    with pytest.raises(ValueError, match="reconstruction_guidance needs a mask"):
        ddpm_fast.restore(m, img, strength=0.5, diffusion=d, reconstruction_guidance=1.0)


def test_reconstruction_guidance_gradient():
    """The guidance gradient handed to the step is -w sqrt(ab) d/dx |mask (x0_hat - image)|^2,
    computed through the model (one extra call per step); it pulls the generated region's x0
    towards agreement with the known pixels."""
    import sys

    from ddpm_fast.step_layout import SQRT_1M_AB, SQRT_AB

    restore_module = sys.modules["ddpm_fast.restore"]
    d = Diffusion("cosine", 6)
    model = Recorder()
    torch.manual_seed(3)
    image = torch.rand(2, 1, 8, 8) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4, :] = 1
    seen = []
    real_loop = restore_module.reverse_loop

    def spy(fn, plan, x, seeds, **kw):
        cond_fn = kw["cond_fn"]

        def checked(x, t):
            grad = cond_fn(x, t)
            s = plan.num_steps - 1 - len(seen)  # one step per call, from S-1 down
            coef = plan.coef[s]
            xr = x.detach().requires_grad_(True)
            eps = 0.3 * torch.tanh(xr)
            x0 = (xr - coef[SQRT_1M_AB] * eps) / coef[SQRT_AB]
            (want,) = torch.autograd.grad((mask * (x0 - image)).square().sum(), xr)
            torch.testing.assert_close(grad, -2.5 * coef[SQRT_AB] * want)
            seen.append(s)
            return grad

        kw["cond_fn"] = checked
        return real_loop(fn, plan, x, seeds, **kw)

    restore_module.reverse_loop = spy
    try:
        out = ddpm_fast.restore(model, image, mask, diffusion=d, steps=None, reconstruction_guidance=2.5,
                                jump_n_sample=1, progress=False)
    finally:
        restore_module.reverse_loop = real_loop
    assert seen == [5, 4, 3, 2, 1, 0]
    assert len(model.seen) == 12  # the step's call and the guidance call at every step
    assert torch.equal(out[mask.bool()], image[mask.bool()])


@pytest.fixture(scope="module")
def digits():
    from ddpm_fast.eval_digits import DigitClassifier
    from ddpm_fast.pretrained import load_pretrained

    return load_pretrained("digits"), DigitClassifier(16)


@pytest.mark.slow
def test_inpaint_lower_half_recovers_the_digit(digits):
    from ddpm_fast.eval_digits import to_8x8
    from ddpm_fast.train import digits_data

    model, clf = digits
    data = digits_data(16)
    x, y = data["x_test"][:100], data["y_test"][:100].numpy()
    mask = torch.ones_like(x)
    mask[..., 8:, :] = 0  # lower half unknown
    masked = x * mask + (1 - mask) * -1.0  # blank (black) lower half
    before = (clf.svc.predict(to_8x8(masked)) == y).mean()
    # restore()'s defaults: unconditional (null label), 50 steps, RePaint resampling (jumps of
    # 5 steps, 3 passes) with reconstruction guidance 10
    out = ddpm_fast.restore(model, x, mask, seed=0, progress=False)
    assert torch.equal(out[..., :8, :], x[..., :8, :])
    after = (clf.svc.predict(to_8x8(out)) == y).mean()
    # measured: 27% before, 86% after on these 100 digits (87% on 300; 70% without guidance)
    assert after >= 0.75 and after >= before + 0.4, (before, after)


@pytest.mark.slow
def test_strength_restoration_lowers_the_error(digits):
    from ddpm_fast.train import digits_data

    model, _ = digits
    clean = digits_data(16)["x_test"][:64]
    g = torch.Generator().manual_seed(1)
    noisy = (clean + 0.3 * torch.randn(clean.shape, generator=g)).clamp(-1, 1)
    out = ddpm_fast.restore(model, noisy, strength=0.3, steps="50", seed=0, progress=False)
    mse_noisy = ((noisy - clean) ** 2).mean()
    mse_out = ((out - clean) ** 2).mean()
    assert mse_out < 0.8 * mse_noisy, (float(mse_noisy), float(mse_out))


def test_cli_restore_writes_a_png_keeping_the_known_pixels(tmp_path):
    """`ddpm-fast restore` on the bundled model: PNG in, PNG out, known (white-mask) pixels kept."""
    import numpy as np
    from PIL import Image

    from ddpm_fast.cli import main

    rng = np.random.default_rng(0)
    digit = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    keep = np.zeros((16, 16), dtype=np.uint8)
    keep[:8] = 255
    Image.fromarray(digit).save(tmp_path / "in.png")
    Image.fromarray(keep).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["restore", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--steps", "4", "--reconstruction-guidance", "10", "--no-progress", "--out", str(out)]) == 0
    got = np.asarray(Image.open(out))
    assert got.shape == (16, 16)
    # uint8 -> [-1, 1] -> uint8 round trip is exact for the known half
    np.testing.assert_array_equal(got[:8], digit[:8])
    # the generated half is restore()'s, with the same model, seed and options
    from ddpm_fast.images import to_images
    from ddpm_fast.pretrained import load_pretrained

    image = torch.from_numpy(digit.astype(np.float32))[None, None] / 127.5 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1
    want = ddpm_fast.restore(load_pretrained("digits"), image, mask, steps="4", reconstruction_guidance=10.0,
                             seed=0, progress=False)
    np.testing.assert_array_equal(got, to_images(want)[0, ..., 0])
    assert np.abs(got[8:].astype(int) - digit[8:].astype(int)).mean() > 10


@pytest.mark.skipif(not ddpm_fast.backends()["cpu"], reason="ddpm_fast._C CPU kernels not built")
def test_reconstruction_guidance_on_the_fused_ops_equals_the_reference_ops():
    """restore(reconstruction_guidance=w) differentiates through the U-Net: on the fused ops
    (their backward passes) it gives the reference ops' result."""
    from conftest import tiny_unet

    g = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4, :] = 1
    out = {}
    for backend in ("auto", "torch"):
        model = tiny_unet(seed=1)
        model.backend = backend
        out[backend] = ddpm_fast.restore(model, image, mask, steps="6", jump_length=2, jump_n_sample=2,
                                         reconstruction_guidance=10.0, seed=0, progress=False, backend=backend)
    torch.testing.assert_close(out["auto"], out["torch"], atol=2e-4, rtol=2e-4)
