"""Writes adm_classifier_a.pt: guided-diffusion's EncoderUNetModel (the classifier of classifier
guidance) run on the CPU in float32, the oracle of tests/test_classifier.py; and
classifier_64x64_keys.json: the state_dict keys and shapes create_classifier builds for the
64x64 ImageNet classifier's flags (guided-diffusion's README), the oracle of classifier_from_flags.

    python tests/golden/make_classifier_golden.py PATH_TO_GUIDED_DIFFUSION_CHECKOUT

Not run by the tests (they read the file it wrote); needs only torch and numpy besides the checkout.
"""
import json
import sys

import torch

sys.path.insert(0, sys.argv[1])
from guided_diffusion.script_util import classifier_defaults, create_classifier  # noqa: E402
from guided_diffusion.unet import EncoderUNetModel  # noqa: E402

# guided-diffusion README's CLASSIFIER_FLAGS of the 64x64 model
FLAGS_64 = dict(image_size=64, classifier_attention_resolutions="32,16,8", classifier_depth=4,
                classifier_width=128, classifier_pool="attention", classifier_resblock_updown=True,
                classifier_use_scale_shift_norm=True)

BASE = dict(image_size=16, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
            attention_resolutions=[2], channel_mult=[1, 1], dropout=0.0, num_head_channels=16)
CONFIGS = {
    "attention": dict(BASE, pool="attention", use_scale_shift_norm=True, resblock_updown=True,
                      use_new_attention_order=True),
    "adaptive": dict(BASE, pool="adaptive", use_scale_shift_norm=False, resblock_updown=False,
                     use_new_attention_order=False, num_head_channels=-1, num_heads=2),
    "spatial_v2": dict(BASE, pool="spatial_v2", use_scale_shift_norm=True, resblock_updown=False,
                       use_new_attention_order=False),
}


def randomised(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Every parameter random (a fresh model's zeroed convs would make the output trivial)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel() if "positional" not in name else 1
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def main() -> None:
    gen = torch.Generator().manual_seed(20261202)
    out = {}
    for key, config in CONFIGS.items():
        model = randomised(EncoderUNetModel(**config), gen).eval()
        x = torch.randn(2, 3, 16, 16, generator=gen)
        t = torch.tensor([17, 903])
        with torch.no_grad():
            logits = model(x, t)
        out[key] = dict(config=config, state_dict=model.state_dict(), x=x, t=t, out=logits)
    torch.save(out, "tests/golden/adm_classifier_a.pt")
    with torch.device("meta"):
        model = create_classifier(**{**classifier_defaults(), **FLAGS_64})
    keys = {k: list(v.shape) for k, v in model.state_dict().items()}
    with open("tests/golden/classifier_64x64_keys.json", "w") as f:
        json.dump(dict(flags=FLAGS_64, keys=keys), f, indent=0)


if __name__ == "__main__":
    main()
