"""Every public entry point in every usual context (issue 22): the ops, the UNet, sample and restore
under torch.inference_mode(), torch.no_grad() and with grad enabled, with torch at 1 and 2 threads,
at attention lengths 64, 512, 1024 and 4096. Outputs are equal across the contexts (bitwise where
the same kernels run) and match the pure-PyTorch reference."""
from __future__ import annotations

import pytest
import torch

import ddpm_fast as df
from conftest import tiny_unet
from ddpm_fast import ops, philox, reference
from ddpm_fast.diffusion import Diffusion

CONTEXTS = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}thread")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def in_every_context(fn, *, grad_exact: bool = True) -> torch.Tensor:
    """fn() under each of CONTEXTS; asserts the outputs agree (bitwise; with grad enabled only
    closely when grad_exact is False: a model whose parameters require grad takes the
    differentiable reference path there). Returns the no_grad output."""
    outs = {}
    for name, context in CONTEXTS.items():
        with context():
            out = fn()
        outs[name] = out[0] if isinstance(out, tuple) else out
    base = outs["no_grad"]
    assert torch.equal(outs["inference_mode"], base)
    if grad_exact:
        assert torch.equal(outs["grad"], base)
    else:
        torch.testing.assert_close(outs["grad"].detach(), base, atol=2e-5, rtol=1e-4)
    return base


@pytest.mark.parametrize("length,layout", [(64, "legacy"), (512, "new"), (1024, "legacy"), (4096, "new")])
def test_attention(threads, length, layout):
    qkv = torch.randn(1, 3 * 64, length, generator=torch.Generator().manual_seed(length))
    out = in_every_context(lambda: ops.attention(qkv, 2, layout))
    torch.testing.assert_close(out, reference.attention(qkv, 2, layout), atol=2e-5, rtol=1e-4)


def test_group_norm_scale_shift(threads):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 64, 16, 16, generator=g), torch.randn(64, generator=g), torch.randn(64, generator=g)
    scale, shift = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)
    out = in_every_context(lambda: ops.group_norm_scale_shift(x, 32, w, b, scale, shift, silu=True))
    torch.testing.assert_close(out, reference.group_norm_scale_shift(x, 32, w, b, scale, shift, silu=True),
                               atol=2e-5, rtol=1e-4)


def test_diffusion_step(threads):
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(3, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g)
    coef = Diffusion("cosine", 20).coefficient_table(eta=1.0)[[7, 7, 7]]
    seed = torch.tensor([1, 2, 3])
    out = in_every_context(lambda: ops.diffusion_step(x, eps, coef, seed=seed, step=7, method="ddim")[0])
    want, _ = reference.diffusion_step(x, eps, coef, philox.philox_normal(seed, 7, (3, 16, 16)), method="ddim")
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [8, 32], ids=["T64", "T1024"])
def test_unet(threads, size):
    """Attention at full resolution: T = size^2 tokens."""
    model = tiny_unet(seed=2, image_size=size, attention_resolutions=(1,))
    g = torch.Generator().manual_seed(size)
    x, t, y = torch.randn(2, 3, size, size, generator=g), torch.tensor([3, 700]), torch.tensor([0, 3])
    out = in_every_context(lambda: model(x, t, y), grad_exact=False)
    slow = tiny_unet(seed=2, image_size=size, attention_resolutions=(1,), backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(out, slow(x, t, y), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def model64():
    """8x8 images with attention at 8x8: T = 64."""
    return tiny_unet(seed=4, attention_resolutions=(1,))


def test_sample(threads, model64):
    in_every_context(lambda: df.sample(model64, steps=3, num_samples=2, seed=5, progress=False))


def test_sample_with_classifier_guidance(threads, model64):
    """cond_fn differentiates: it must work under inference_mode too."""
    def cond_fn(x, t, y=None):  # guided-diffusion's form: d log p(y | x) / dx by autograd
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad((x.square() * (1 + y.float().reshape(-1, 1, 1, 1))).sum(), x)[0] * -0.01

    in_every_context(lambda: df.sample(model64, steps=2, num_samples=2, seed=5, cond_fn=cond_fn,
                                       progress=False))


def test_restore(threads, model64):
    """The default inpainting recipe differentiates through the model (reconstruction guidance)."""
    image = torch.linspace(-1, 1, 2 * 3 * 64).reshape(2, 3, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :3] = 1
    out = in_every_context(lambda: df.restore(model64, image, mask, steps=2, jump_length=1, jump_n_sample=2,
                                              seed=1, progress=False))
    keep = mask.expand_as(image) == 1
    assert torch.equal(out[keep], image[keep])
