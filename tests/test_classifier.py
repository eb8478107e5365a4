"""ddpm_fast.classifier: guided-diffusion's EncoderUNetModel (the classifier of classifier guidance)
against the real thing (tests/golden/adm_classifier_a.pt, written by
tests/golden/make_classifier_golden.py from guided-diffusion's code), its guidance gradient on the
fused ops against the reference ops, and its argument errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ddpm_fast
from ddpm_fast.classifier import EncoderUNet, classifier_guidance

GOLDEN = torch.load(Path(__file__).parent / "golden" / "adm_classifier_a.pt", weights_only=True)
HAS_CPU_KERNEL = bool(ddpm_fast.backends()["cpu"])
BACKENDS = ["torch"] + (["cpu"] if HAS_CPU_KERNEL else [])


def golden_model(pool: str, backend: str) -> EncoderUNet:
    entry = GOLDEN[pool]
    model = EncoderUNet(**entry["config"], backend=backend).eval()
    model.load_state_dict(entry["state_dict"], strict=True)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", sorted(GOLDEN))
def test_matches_guided_diffusion(pool, backend):
    entry = GOLDEN[pool]
    model = golden_model(pool, backend)
    with torch.no_grad():
        out = model(entry["x"], entry["t"])
    assert out.shape == entry["out"].shape and out.dtype == torch.float32
    torch.testing.assert_close(out, entry["out"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pool", sorted(GOLDEN))
def test_guidance_gradient_fused_equals_reference(pool):
    """classifier_guidance's d log p(y | x_t) / d x_t through the fused ops (their backward passes)
    equals the reference ops' autograd."""
    entry = GOLDEN[pool]
    x = entry["x"]
    y = torch.tensor([3, 7])
    grads = {}
    for backend in BACKENDS:
        cond_fn = classifier_guidance(golden_model(pool, backend), scale=2.5)
        grads[backend] = cond_fn(x, entry["t"], y=y)
    ref = grads["torch"]
    assert ref.shape == x.shape and ref.abs().max() > 0
    for backend, g in grads.items():
        torch.testing.assert_close(g, ref, atol=1e-4, rtol=1e-4, msg=f"backend={backend}")
    # the gradient of log p(y|x) is that of the logit minus the log-partition: check it once by hand
    model = golden_model(pool, "torch")
    x_in = x.clone().requires_grad_(True)
    logits = model(x_in, entry["t"])
    (logits.log_softmax(-1)[torch.arange(2), y].sum() * 2.5).backward()
    torch.testing.assert_close(ref, x_in.grad, atol=1e-5, rtol=1e-5)


def test_fp16_torso_runs_and_stays_close():
    entry = GOLDEN["attention"]
    model = golden_model("attention", BACKENDS[-1]).convert_to_fp16()
    assert model.dtype == torch.float16 and model.out[0].weight.dtype == torch.float32
    with torch.no_grad():
        out = model(entry["x"], entry["t"])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, entry["out"], atol=5e-2, rtol=5e-2)


def test_bad_arguments_name_the_argument():
    kw = dict(image_size=16, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
              attention_resolutions=(2,), channel_mult=(1, 1))
    with pytest.raises(ValueError, match="pool must be one of"):
        EncoderUNet(**kw, pool="max")
    with pytest.raises(ValueError, match="num_head_channels"):
        EncoderUNet(**kw, pool="attention")
    with pytest.raises(ValueError, match="model_channels"):
        EncoderUNet(**dict(kw, model_channels=0))
    model = EncoderUNet(**kw, pool="attention", num_head_channels=16)
    with pytest.raises(ValueError, match="attention pooling was built for 8x8"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"x must be a \(N, 3, H, W\)"):
        model(torch.randn(1, 1, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="timesteps must have shape"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))
    cond_fn = classifier_guidance(model)
    with pytest.raises(ValueError, match="class labels"):
        cond_fn(torch.randn(1, 3, 16, 16), torch.tensor([1]))
    with pytest.raises(TypeError, match="scale must be a number"):
        classifier_guidance(model, scale="1")


def _tiny_classifier(seed: int = 3) -> EncoderUNet:
    from conftest import randomize_weights

    clf = EncoderUNet(image_size=8, in_channels=3, model_channels=32, out_channels=4, num_res_blocks=1,
                      attention_resolutions=(2,), channel_mult=(1, 1), num_head_channels=16,
                      use_scale_shift_norm=True, resblock_updown=True, pool="attention")
    return randomize_weights(clf, seed=seed, std=0.3).eval()


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="ddpm_fast._C CPU kernels not built")
@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_guided_sampling_equals_the_reference_op_run(method):
    """sample(cond_fn=classifier_guidance(...)) with the U-Net and the classifier on the fused ops
    (forward and backward) equals the same run on the reference ops; and the guidance is felt."""
    from conftest import tiny_unet

    runs = {}
    for backend in ("auto", "torch"):
        model, clf = tiny_unet(seed=1), _tiny_classifier()
        model.backend = clf.backend = backend
        for scale in (0.0, 30.0):
            runs[backend, scale] = ddpm_fast.sample(
                model, steps=5, num_samples=3, batch_size=3, class_labels=[0, 1, 3], method=method, eta=1.0,
                seed=0, progress=False, backend=backend, cond_fn=classifier_guidance(clf, scale=scale))
    for scale in (0.0, 30.0):
        torch.testing.assert_close(runs["auto", scale], runs["torch", scale], atol=2e-4, rtol=2e-4)
    assert (runs["auto", 30.0] - runs["auto", 0.0]).abs().max() > 1e-2


def test_classifier_from_flags_builds_guided_diffusions_64x64_classifier():
    """classifier_from_flags with the 64x64 ImageNet classifier's flags has exactly the state_dict
    keys and shapes guided-diffusion's create_classifier gives (tests/golden/classifier_64x64_keys.json),
    so that checkpoint loads strictly; a state_dict of those shapes loads."""
    import json

    from ddpm_fast.flags import classifier_from_flags

    golden = json.loads((Path(__file__).parent / "golden" / "classifier_64x64_keys.json").read_text())
    flags = " ".join(f"--{k} {v}" for k, v in golden["flags"].items())
    model = classifier_from_flags(flags, device="meta")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == golden["keys"]
    assert list(model.state_dict()) == list(golden["keys"])  # the same order too
    assert model.pool == "attention" and model.out_channels == 1000 and not model.training
    small = classifier_from_flags("--image_size 64 --classifier_width 64 --classifier_depth 1")
    state = {k: torch.randn(v.shape) for k, v in small.state_dict().items()}
    classifier_from_flags("--image_size 64 --classifier_width 64 --classifier_depth 1", checkpoint=state)
    with pytest.raises(ValueError, match="does not match"):
        classifier_from_flags("--image_size 64 --classifier_width 64 --classifier_depth 2", checkpoint=state)
    with pytest.raises(ValueError, match="--image_size 32"):
        classifier_from_flags("--image_size 32")
    with pytest.raises(ValueError, match="--classifier_attention_resolutions"):
        classifier_from_flags("--image_size 64 --classifier_attention_resolutions 48")
    with pytest.raises(ValueError, match="--classifier_depth"):
        classifier_from_flags("--image_size 64 --classifier_depth x")


def test_cli_samples_with_classifier_guidance(tmp_path):
    """`ddpm-fast sample --flags "... --classifier_path P --classifier_scale S"` guides with the
    classifier as guided-diffusion's classifier_sample.py does: scale 0 gives the unguided samples,
    a large scale moves them."""
    import numpy as np

    from ddpm_fast import cli
    from ddpm_fast.flags import classifier_from_flags

    cflags = "--image_size 64 --classifier_width 64 --classifier_depth 1 --classifier_attention_resolutions 8"
    torch.manual_seed(0)
    clf = classifier_from_flags(cflags)
    with torch.no_grad():
        for p in clf.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    path = tmp_path / "classifier.pt"
    torch.save(clf.state_dict(), path)
    flags = ("--image_size 64 --num_channels 32 --num_res_blocks 1 --channel_mult 1,1,1,1 "
             "--attention_resolutions 8 --class_cond True --diffusion_steps 100 " + cflags)
    out = {}
    for name, extra in (("plain", ""), ("zero", f" --classifier_path {path} --classifier_scale 0"),
                        ("guided", f" --classifier_path {path} --classifier_scale 300")):
        npz = tmp_path / f"{name}.npz"
        cli.main(["sample", "--flags", flags + extra, "--steps", "2", "--num-samples", "2", "--batch-size", "2",
                  "--out", str(npz), "--grid", "", "--no-progress", "--device", "cpu"])
        out[name] = np.load(npz)["arr_0"].astype(int)
    assert (out["zero"] == out["plain"]).all()
    assert np.abs(out["guided"] - out["plain"]).max() > 0
