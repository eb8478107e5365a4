"""The bundled digits model: it loads through load_pretrained and its class-conditional samples
are recognised by a classifier trained on the real digits, with a data-like diversity."""
import json

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast import eval_digits as E
from ddpm_fast.diffusion import Diffusion
from ddpm_fast.pretrained import ASSETS, pretrained_config


@pytest.fixture(scope="module")
def model():
    return ddpm_fast.load_pretrained("digits")


@pytest.fixture(scope="module")
def classifier():
    return E.DigitClassifier(16, pretrained_config("digits")["data"]["upsample"])


def test_bundle_files_and_metadata():
    weights = ASSETS / "digits.safetensors"
    assert weights.stat().st_size <= 10 * 1024 * 1024
    meta = json.loads((ASSETS / "digits.json").read_text())
    assert meta["unet"]["image_size"] == 16 and meta["unet"]["in_channels"] == 1
    assert meta["unet"]["out_channels"] == 2 and meta["unet"]["num_classes"] == 11
    assert meta["null_label"] == 10
    assert meta["diffusion"]["schedule"] == "cosine" and meta["diffusion"]["variance"] == "learned_range"
    assert meta["diffusion"]["timesteps"] == 1000


def test_load_pretrained(model):
    assert not model.training
    assert isinstance(model.diffusion, Diffusion)
    assert model.diffusion.num_timesteps == 1000 and model.diffusion.variance == "learned_range"
    assert model.num_classes == 11 and model.null_label == 10
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([10, 900]), torch.tensor([3, 10]))
    assert out.shape == (2, 2, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="name"):
        ddpm_fast.load_pretrained("no-such-model")


def test_classifier_is_accurate_on_held_out_digits(classifier):
    assert classifier.classifier_accuracy > 0.97


def test_metric_helpers():
    x = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])
    assert E.mean_pairwise_distance(x) == pytest.approx((5 + 4 + 3) / 3)
    assert E.parse_setting("ddim:50") == dict(method="ddim", steps="ddim50")
    assert E.parse_setting("ddpm:250") == dict(method="ddpm", steps="250")
    assert E.parse_setting("ddim:K8:eta=1:noise=zero:project=sample") == dict(
        method="ddim", steps=None, skip=8, eta=1.0, noise="zero", project_noise="sample")
    assert E.parse_setting("ddpm:100:until=30") == dict(method="ddpm", steps="100", noise_until=30)
    assert E.parse_setting("ddim:quad50") == dict(method="ddim", steps="quad50")
    assert E.parse_setting("ddim:pow2.5:40:eta=1") == dict(method="ddim", steps="pow2.5:40", eta=1.0)
    assert E.parse_setting("ddim:50:truncate=0.8") == dict(method="ddim", steps="ddim50", truncate=0.8)
    for bad in ("euler:10", "ddim", "ddim:0", "ddim:K0", "ddim:Kx", "ddim:50:eta", "ddim:50:temp=1", 50,
                "ddim:quad", "ddim:quad0", "ddim:pow2", "ddim:pow0:50", "ddim:pow2:x", "ddpm:100:until=0.5",
                "ddim:50:truncate=x"):
        with pytest.raises(ValueError, match="setting looks like"):
            E.parse_setting(bad)
    with pytest.raises(ValueError, match="images"):
        E.to_8x8(torch.zeros(2, 3, 16, 16))
    # the round trip 8x8 -> 16x16 (nearest) -> 8x8 is exact
    x8 = torch.rand(3, 1, 8, 8) * 2 - 1
    x16 = torch.nn.functional.interpolate(x8, scale_factor=2, mode="nearest")
    np.testing.assert_allclose(E.to_8x8(x16), x8.reshape(3, 64).double().numpy(), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["ddpm:250", "ddim:50"])
def test_samples_are_recognised_and_diverse(model, classifier, setting):
    """The issue's bar (>= 90% classified as their label, diversity >= 0.5, over 1000 samples) on
    100 samples with looser bounds; the 1000-sample figures are in the README (99.9% / 0.95 and
    98.9% / 1.00)."""
    r = E.evaluate(model, setting, num_samples=100, seed=1, classifier=classifier)
    assert r["images"].shape == (100, 1, 16, 16)
    assert r["images"].min() >= -1 and r["images"].max() <= 1
    assert r["accuracy"] >= 0.85, r
    assert r["diversity"] >= 0.45, r


@pytest.mark.slow
def test_guided_and_unconditional_samples(model, classifier):
    """Classifier-free guidance (scale 3) keeps the labels; the null label samples digits of
    several classes."""
    r = E.evaluate(model, "ddim:25", num_samples=50, guidance_scale=3.0, seed=2, classifier=classifier)
    assert r["accuracy"] >= 0.8, r
    labels = torch.full((50,), model.null_label)
    images = E.sample_digits(model, labels, seed=3, method="ddim", steps="ddim25")
    proba = classifier.predict_proba(E.to_8x8(images))
    assert len(set(proba.argmax(1).tolist())) >= 6
