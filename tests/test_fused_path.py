"""The fused kernels really run: where a fused backend exists for every op (the C++ CPU kernels;
Triton / CUDA on a GPU), the U-Net forward and backward, sample() (DDPM, DDIM with projection,
classifier guidance through cond_fn and through an EncoderUNet classifier, classifier-free
guidance), restore() (RePaint, strength, reconstruction guidance through the U-Net's backward) and
a training step call none of ddpm_fast.reference's op functions: each is replaced by a trap that
raises. The golden and equality tests elsewhere would pass on the reference fallback too; these
would not.
"""
import math

import pytest
import torch
from conftest import HAS_CUDA, randomize_weights, tiny_unet

import ddpm_fast
from ddpm_fast import reference
from ddpm_fast._registry import has_kernel

OPS = ("group_norm_scale_shift", "attention", "diffusion_step")


def fused_devices():
    devices = []
    if all(has_kernel(op, "CPU") for op in OPS):
        devices.append("cpu")
    if HAS_CUDA:
        devices.append(pytest.param("cuda", marks=pytest.mark.cuda))
    return devices


pytestmark = pytest.mark.skipif(not fused_devices(), reason="no fused backend for every op here")


@pytest.fixture
def no_reference(monkeypatch):
    """Every op of ddpm_fast.reference replaced by a trap raising AssertionError that names it."""
    for name in OPS:
        def trap(*args, _name=name, **kwargs):
            raise AssertionError(f"ddpm_fast.reference.{_name} ran although a fused backend is available")
        monkeypatch.setattr(reference, name, trap)


def _model(device):
    return tiny_unet(seed=1).to(device)


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=g).to(device)
    return x, torch.tensor([5, 12, 19], device=device), torch.tensor([0, 3, 4], device=device)


def _classifier_grad(x, t, y=None):
    """A classifier-guidance gradient computed with autograd: d/dx log softmax(W mean(x))[y]."""
    weight = torch.linspace(-1.0, 1.0, 5 * 3, device=x.device).reshape(5, 3)
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        logp = torch.log_softmax(xr.mean((2, 3)) @ weight.T, dim=1)
        (grad,) = torch.autograd.grad(logp[torch.arange(x.shape[0]), y].sum(), xr)
    return grad


@pytest.mark.parametrize("device", fused_devices())
def test_unet_forward(device, no_reference):
    model = _model(device)
    x, t, y = _inputs(device)
    with torch.no_grad():
        out = model(x, t, y)
    with torch.inference_mode():
        again = model(x, t, y)
    model.requires_grad_(False)  # no autograd recording: the kernels run without no_grad too
    frozen = model(x, t, y)
    assert out.shape == (3, 6, 8, 8) and out.abs().max() > 0.01
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    torch.testing.assert_close(frozen, out, rtol=0, atol=0)


@pytest.mark.parametrize("device", fused_devices())
@pytest.mark.parametrize("opts", [
    dict(method="ddpm"),
    dict(method="ddim", eta=1.0, project_noise="pixel"),
    dict(method="ddim", eta=0.5, guidance_scale=2.0),
    dict(method="ddpm", cond_fn=_classifier_grad),
    dict(method="ddim", eta=1.0, cond_fn=_classifier_grad, guidance_scale=1.5),
], ids=["ddpm", "ddim-projection", "cfg", "cond_fn", "cond_fn-cfg"])
def test_sample(device, opts, no_reference):
    model = _model(device)
    out = ddpm_fast.sample(model, steps=4, num_samples=3, batch_size=3, class_labels=[0, 1, 3], seed=0,
                           progress=False, **opts)
    assert out.shape == (3, 3, 8, 8) and torch.isfinite(out).all() and out.abs().max() > 0.01


@pytest.mark.parametrize("device", fused_devices())
def test_restore(device, no_reference):
    model = _model(device)
    g = torch.Generator().manual_seed(2)
    image = (torch.rand(2, 3, 8, 8, generator=g) * 2 - 1).to(device)
    mask = torch.zeros(2, 1, 8, 8, device=device)
    mask[..., :4, :] = 1
    for guidance in (0.0, 10.0):  # 10: the gradient through the U-Net's fused backward
        out = ddpm_fast.restore(model, image, mask, steps="6", jump_length=2, jump_n_sample=2,
                                reconstruction_guidance=guidance, progress=False)
        assert torch.equal(out[:, :, :4], image[:, :, :4]) and torch.isfinite(out).all()
    out = ddpm_fast.restore(model, image, strength=0.5, steps="6", method="ddim", eta=1.0, progress=False)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", fused_devices())
def test_unet_backward(device, no_reference):
    """Gradients with respect to the input and the weights through the fused backward passes."""
    model = _model(device)
    x, t, y = _inputs(device)
    x.requires_grad_(True)
    model(x, t, y).square().sum().backward()
    assert x.grad.abs().max() > 0
    assert model.input_blocks[1][0].in_layers[0].weight.grad.abs().max() > 0


@pytest.mark.parametrize("device", fused_devices())
def test_classifier_guided_sample(device, no_reference):
    from ddpm_fast.classifier import EncoderUNet, classifier_guidance

    model = _model(device)
    clf = EncoderUNet(image_size=8, in_channels=3, model_channels=32, out_channels=4, num_res_blocks=1,
                      attention_resolutions=(2,), channel_mult=(1, 1), num_head_channels=16,
                      use_scale_shift_norm=True, pool="attention")
    clf = randomize_weights(clf, seed=3).to(device).eval()
    out = ddpm_fast.sample(model, steps=3, num_samples=2, batch_size=2, class_labels=[0, 3], seed=0,
                           progress=False, cond_fn=classifier_guidance(clf, scale=3.0))
    assert torch.isfinite(out).all()


def test_training_step(no_reference):
    from ddpm_fast import train as T

    cfg = T.TrainConfig(unet=dict(image_size=8, in_channels=1, model_channels=32, out_channels=2, num_res_blocks=1,
                                  attention_resolutions=(2,), dropout=0.1, channel_mult=(1, 2), num_classes=11,
                                  use_scale_shift_norm=True, resblock_updown=True),
                        batch_size=4, image_size=8, lr_warmup=0)
    trainer = T.Trainer(cfg, data=(torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8) % 10), fused=True)
    losses = trainer.train_step()
    assert math.isfinite(losses["loss"]) and losses["grad_norm"] > 0


def test_the_trap_catches_the_reference(no_reference):
    """The planted bug the traps are for: a model or a sampler on the reference ops."""
    model = tiny_unet(seed=1)
    x, t, y = _inputs("cpu")
    model.backend = "torch"
    with pytest.raises(AssertionError, match="reference.group_norm_scale_shift"), torch.no_grad():
        model(x, t, y)
    model.backend = "auto"
    with pytest.raises(AssertionError, match="reference.diffusion_step"):
        ddpm_fast.sample(model, steps=2, num_samples=1, seed=0, progress=False, backend="torch")
