"""Bundled pretrained models (ddpm_fast/assets/<name>.safetensors + <name>.json).

    model = ddpm_fast.load_pretrained("digits")      # UNet in eval mode
    model.diffusion                                   # the Diffusion it was trained with
    model.num_classes, model.null_label               # 11 and 10 for digits (10 digits + the null class)

The JSON holds the UNet keyword arguments, the Diffusion options, the equivalent guided-diffusion
flags and how the model was trained (see ddpm_fast.train.Trainer.export).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets"


def available() -> list[str]:
    """Names of the bundled models."""
    return sorted(p.stem for p in ASSETS.glob("*.json") if p.with_suffix(".safetensors").exists())


def pretrained_config(name: str = "digits") -> dict:
    """The bundle's JSON (UNet kwargs under "unet", Diffusion options under "diffusion", ...)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str; got {type(name).__name__}")
    path = ASSETS / f"{name}.json"
    if not path.exists() or not path.with_suffix(".safetensors").exists():
        raise ValueError(f"name must be one of the bundled models {available()}; got {name!r}")
    return json.loads(path.read_text())


def load_pretrained(name: str = "digits", device="cpu", **unet_kwargs):
    """The bundled model `name` as a UNet in eval mode on `device`, with `model.diffusion` (the
    Diffusion it was trained with), `model.num_classes` (class count including the null class),
    `model.null_label` (the label of the unconditional model, or None) and `model.pretrained_config`
    (the bundle's JSON). Extra keyword arguments (e.g. backend="torch") go to the UNet."""
    from safetensors.torch import load_file

    from .diffusion import Diffusion
    from .unet import UNet

    config = pretrained_config(name)
    model = UNet(**config["unet"], **unet_kwargs)
    model.load_state_dict(load_file(str(ASSETS / f"{name}.safetensors")), strict=True)
    model.to(device).eval()
    model.diffusion = Diffusion(**config["diffusion"])
    model.num_classes = config["unet"].get("num_classes")
    model.null_label = config.get("null_label")
    model.pretrained_config = config
    return model
