"""diffusers' DDPM models and schedulers on ddpm_fast's fused U-Net and sampler.

    model, diffusion = ddpm_fast.from_diffusers("ddpm-cifar10-32")   # a pipeline or UNet folder
    images = ddpm_fast.sample(model, steps=50, method="ddim", **diffusion.sample_options())

The U-Net. diffusers' `UNet2DModel` with the block types DDPM checkpoints use is guided-diffusion's
ADM U-Net under other names, so it maps onto ddpm_fast's `UNet` (no second model): a ResnetBlock2D
is a ResBlock (norm1/conv1/time_emb_proj/norm2/conv2/conv_shortcut = in_layers.0/in_layers.2/
emb_layers.1/out_layers.0/out_layers.3/skip_connection; resnet_time_scale_shift "scale_shift" is
use_scale_shift_norm), an Attention block is an AttentionBlock with the "new" qkv layout (to_q,
to_k, to_v stacked into the 1x1 qkv conv, to_out.0 = proj_out: a linear layer over the tokens and a
1x1 conv are the same math; heads = channels // attention_head_dim, one head when it is None), a
Downsample2D / Upsample2D conv is Downsample / Upsample (downsample_padding=0 pads bottom/right
first), ResnetDownsampleBlock2D / ResnetUpsampleBlock2D and downsample_type / upsample_type
"resnet" are resblock_updown, UNetMidBlock2D is the middle block (with or without attention),
the class embedding table is label_emb. Where diffusers differs from ADM the UNet has options
(norm_groups, norm_eps, flip_sin_to_cos / freq_shift of the timestep embedding, downsample_padding,
middle_attention / middle_attention_norm). ADM ties the decoder's attention to the encoder's
(attention at a resolution on both paths): up_block_types must mirror down_block_types, and the
resampling kind must be the same on every level. Anything else raises `UnsupportedConfig` (a
ValueError) naming the config field.

The scheduler. A DDPMScheduler / DDIMScheduler config becomes a `DiffusersDiffusion`, a `Diffusion`
whose float64 tables are built from the config's betas (linear, scaled_linear, squaredcos_cap_v2,
sigmoid or trained_betas, computed in float64), prediction_type epsilon / sample / v_prediction ->
"epsilon" / "x0" / "v", variance_type fixed_small(_log) / fixed_large / learned_range, and which
respaces an int step count (`sample(steps=50)`) with the scheduler's timestep_spacing and
steps_offset (`respace_diffusers`). clip_sample and thresholding (dynamic thresholding) are step
options: `diffusion.sample_options()` gives them as ddpm_fast.sample keyword arguments.
Conventions that differ: diffusers' DDIMScheduler steps from t to t - T // n, which is the next
chosen timestep for "leading" spacing and for "trailing" when n divides T (ddpm_fast always steps
to the next chosen timestep; DDPMScheduler does too); ddpm_fast's DDIM recomputes eps from the
clipped x0 (diffusers' use_clipped_model_output=True).
"""
from __future__ import annotations

import json
import numbers
import warnings
from pathlib import Path

import numpy as np
import torch

from .diffusion import Diffusion
from .unet import UNet

__all__ = ["from_diffusers", "UnsupportedConfig", "PUBLISHED", "DiffusersDiffusion", "unet_kwargs",
           "convert_state_dict", "weights_file", "diffusion_from_scheduler", "UNET_DEFAULTS", "SCHEDULER_DEFAULTS"]


class UnsupportedConfig(ValueError):
    """A diffusers config ddpm_fast cannot run; the message names the field."""


# UNet2DModel's constructor defaults (diffusers 0.42): fill a partial config dict
UNET_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu",
    attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5,
    resnet_time_scale_shift="default", add_attention=True, class_embed_type=None, num_class_embeds=None,
    num_train_timesteps=None)

# DDPMScheduler's / DDIMScheduler's defaults (diffusers 0.42)
SCHEDULER_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    variance_type="fixed_small", clip_sample=True, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
    steps_offset=0, rescale_betas_zero_snr=False, set_alpha_to_one=True)

# block type -> (has attention, resampling: "conv" | "resnet" | None = the config's *_type)
DOWN_BLOCKS = {"DownBlock2D": (False, "conv"), "AttnDownBlock2D": (True, None),
               "ResnetDownsampleBlock2D": (False, "resnet")}
UP_BLOCKS = {"UpBlock2D": (False, "conv"), "AttnUpBlock2D": (True, None),
             "ResnetUpsampleBlock2D": (False, "resnet")}
PREDICTIONS = {"epsilon": "epsilon", "sample": "x0", "v_prediction": "v"}
VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
             "learned_range": "learned_range"}
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")


def _unsupported(field: str, value, why: str) -> UnsupportedConfig:
    return UnsupportedConfig(f"diffusers config field {field}={value!r} is not supported by ddpm_fast: {why}")


def _config_dict(obj) -> dict:
    """A config as a plain dict: a diffusers model/scheduler (its .config), a dict, or None."""
    if obj is None:
        return {}
    config = getattr(obj, "config", obj)
    if not isinstance(config, dict):
        raise TypeError(f"expected a diffusers model or scheduler, a config dict or a path; got {type(obj).__name__}")
    out = {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}
    if config is not obj:   # an instance: its class is the class name
        out["_class_name"] = type(obj).__name__
    return out


# Published configs of the original DDPM checkpoints converted to diffusers (the Hugging Face hub is
# not reachable from every machine: build a random-weight model of the same shape from these, e.g.
# for benchmarks). google/ddpm-cifar10-32: config.json and scheduler_config.json as on its model card.
PUBLISHED = {
    "google/ddpm-cifar10-32": (
        dict(_class_name="UNet2DModel", act_fn="silu", attention_head_dim=None, block_out_channels=[128, 256, 256, 256],
             center_input_sample=False,
             down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
             downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, in_channels=3, layers_per_block=2,
             mid_block_scale_factor=1, norm_eps=1e-06, norm_num_groups=32, out_channels=3, sample_size=32,
             time_embedding_type="positional", up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]),
        dict(_class_name="DDPMScheduler", beta_end=0.02, beta_schedule="linear", beta_start=0.0001, clip_sample=True,
             num_train_timesteps=1000, trained_betas=None, variance_type="fixed_small")),
}


# ---- the U-Net ----------------------------------------------------------------------------------

def unet_kwargs(config) -> dict:
    """ddpm_fast.UNet keyword arguments of a UNet2DModel config (dict or model).
    Raises UnsupportedConfig naming the field for configs outside the supported set."""
    given = _config_dict(config)
    cls = given.pop("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise _unsupported("_class_name", cls, "only UNet2DModel (the DDPM U-Net) maps onto ddpm_fast's UNet")
    unknown = sorted(set(given) - set(UNET_DEFAULTS))
    if unknown:
        raise _unsupported(unknown[0], given[unknown[0]], "unknown UNet2DModel field")
    c = {**UNET_DEFAULTS, **given}
    checks = [("center_input_sample", False, "inputs are taken as they are"),
              ("time_embedding_type", "positional", "only the sinusoidal ('positional') embedding"),
              ("mid_block_type", "UNetMidBlock2D", "the U-Net needs its UNetMidBlock2D"),
              ("mid_block_scale_factor", 1, "residual outputs are not rescaled"),
              ("class_embed_type", None, "class labels go through an embedding table (num_class_embeds)")]
    for field, want, why in checks:
        if c[field] != want:
            raise _unsupported(field, c[field], why)
    if c["act_fn"] not in ("silu", "swish"):
        raise _unsupported("act_fn", c["act_fn"], "the fused GroupNorm applies SiLU")
    if c["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        raise _unsupported("resnet_time_scale_shift", c["resnet_time_scale_shift"],
                           "'default' (add) or 'scale_shift' (AdaGN) only")
    channels = [int(v) for v in c["block_out_channels"]]
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if len(down) != len(channels) or len(up) != len(channels):
        raise _unsupported("up_block_types", tuple(up), "needs one down and one up block per block_out_channels entry")
    base = channels[0]
    if c["time_embedding_dim"] not in (None, 4 * base):
        raise _unsupported("time_embedding_dim", c["time_embedding_dim"],
                           f"the embedding width is 4 x block_out_channels[0] = {4 * base}")
    for name, table, kind_field in (("down_block_types", DOWN_BLOCKS, "downsample_type"),
                                    ("up_block_types", UP_BLOCKS, "upsample_type")):
        for t in c[name]:
            if t not in table:
                raise _unsupported(name, tuple(c[name]), f"block type {t!r} (supported: {', '.join(table)})")
        if c[kind_field] not in ("conv", "resnet"):
            raise _unsupported(kind_field, c[kind_field], "'conv' or 'resnet' only")
    attn_down = [DOWN_BLOCKS[t][0] for t in down]
    attn_up = [UP_BLOCKS[t][0] for t in up]
    if attn_up != attn_down[::-1]:
        raise _unsupported("up_block_types", tuple(up), "the decoder's attention must mirror the encoder's "
                           f"(down_block_types {tuple(down)}): ADM attends at the same resolutions on both paths")
    # resampling kind of every level that resamples (the last down / first up block does not)
    down_kind = {DOWN_BLOCKS[t][1] or c["downsample_type"] for t in down[:-1]}
    up_kind = {UP_BLOCKS[t][1] or c["upsample_type"] for t in up[:-1]}
    if len(down_kind) > 1:
        raise _unsupported("down_block_types", tuple(down), "every level must resample the same way (conv or resnet)")
    if len(up_kind) > 1 or (down_kind and up_kind and down_kind != up_kind):
        raise _unsupported("up_block_types", tuple(up), "up- and downsampling must be both convs or both ResBlocks")
    resnet_updown = down_kind == {"resnet"}
    if c["downsample_padding"] not in (0, 1) and not resnet_updown:
        raise _unsupported("downsample_padding", c["downsample_padding"], "0 or 1 only")
    groups = c["norm_num_groups"]
    if groups is None:
        raise _unsupported("norm_num_groups", None, "give the GroupNorm group count")
    for ch in channels:
        if ch % groups:
            raise _unsupported("block_out_channels", tuple(channels), f"{ch} channels are not divisible by "
                               f"norm_num_groups={groups}")
    head_dim = c["attention_head_dim"]
    for ch, has in zip(channels, attn_down):
        if has and head_dim is not None and ch % head_dim:
            raise _unsupported("attention_head_dim", head_dim, f"does not divide the {ch} attention channels")
    mid_attention = bool(c["add_attention"])
    if mid_attention and head_dim is not None and channels[-1] % head_dim:
        raise _unsupported("attention_head_dim", head_dim, f"does not divide the {channels[-1]} mid-block channels")
    attn_groups = c["attn_norm_num_groups"]
    if attn_groups is not None and attn_groups != groups:
        raise _unsupported("attn_norm_num_groups", attn_groups, f"the mid-block attention's norm uses the "
                           f"model's norm_num_groups ({groups}) or none")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _unsupported("sample_size", size, "square images only")
        size = size[0]
    if not isinstance(size, numbers.Integral) or size < 1:
        raise _unsupported("sample_size", size, "give the image side")
    num_classes = c["num_class_embeds"]
    return dict(
        image_size=int(size), in_channels=int(c["in_channels"]), model_channels=base,
        out_channels=int(c["out_channels"]), num_res_blocks=int(c["layers_per_block"]),
        attention_resolutions=tuple(2 ** i for i, has in enumerate(attn_down) if has),
        dropout=float(c["dropout"]), channel_mult=tuple(ch / base for ch in channels),
        num_classes=None if num_classes is None else int(num_classes),
        num_heads=1, num_head_channels=-1 if head_dim is None else int(head_dim),
        use_scale_shift_norm=c["resnet_time_scale_shift"] == "scale_shift", resblock_updown=resnet_updown,
        use_new_attention_order=True, norm_groups=int(groups), norm_eps=float(c["norm_eps"]),
        flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=float(c["freq_shift"]),
        downsample_padding=1 if resnet_updown else int(c["downsample_padding"]),
        middle_attention=mid_attention,
        middle_attention_norm=attn_groups is not None or c["resnet_time_scale_shift"] == "default")


def _resblock_keys(ours: str, theirs: str) -> list[tuple[str, str]]:
    pairs = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
             ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")]
    return [(f"{ours}.{a}.{p}", f"{theirs}.{b}.{p}") for a, b in pairs for p in ("weight", "bias")]


def _module_pairs(model: UNet) -> list[tuple[str, str, str]]:
    """(our prefix, diffusers prefix, kind) of every block, kind "res" | "attn" | "down" | "up"
    | "plain" (same parameter names)."""
    from .unet import AttentionBlock, Downsample, ResBlock, Upsample

    pairs = [("input_blocks.0.0", "conv_in", "plain"), ("time_embed.0", "time_embedding.linear_1", "plain"),
             ("time_embed.2", "time_embedding.linear_2", "plain"), ("out.0", "conv_norm_out", "plain"),
             ("out.2", "conv_out", "plain")]
    if model.num_classes is not None:
        pairs.append(("label_emb", "class_embedding", "plain"))

    def kind(layer):
        if isinstance(layer, ResBlock):
            return "res"
        if isinstance(layer, AttentionBlock):
            return "attn"
        if isinstance(layer, Downsample):
            return "down"
        if isinstance(layer, Upsample):
            return "up"
        raise AssertionError(type(layer))

    levels, per = len(model.channel_mult), model.num_res_blocks
    k = 1
    for level in range(levels):
        for j in range(per):
            for i, layer in enumerate(model.input_blocks[k]):
                sub = "resnets" if kind(layer) == "res" else "attentions"
                pairs.append((f"input_blocks.{k}.{i}", f"down_blocks.{level}.{sub}.{j}", kind(layer)))
            k += 1
        if level != levels - 1:
            layer = model.input_blocks[k][0]
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0", kind(layer)))
            k += 1
    mids = ["resnets.0"] + (["attentions.0"] if model.middle_attention else []) + ["resnets.1"]
    for i, name in enumerate(mids):
        pairs.append((f"middle_block.{i}", f"mid_block.{name}", kind(model.middle_block[i])))
    k = 0
    for u in range(levels):
        for j in range(per + 1):
            for i, layer in enumerate(model.output_blocks[k]):
                t = kind(layer)
                if t == "res" and i == 0:
                    theirs = f"up_blocks.{u}.resnets.{j}"
                elif t == "attn":
                    theirs = f"up_blocks.{u}.attentions.{j}"
                else:  # the level's upsampler (an Upsample or an up ResBlock)
                    theirs = f"up_blocks.{u}.upsamplers.0"
                pairs.append((f"output_blocks.{k}.{i}", theirs, t))
            k += 1
    return pairs


def convert_state_dict(state_dict: dict, model: UNet) -> dict:
    """A UNet2DModel state_dict -> `model`'s (ddpm_fast.UNet built from `unet_kwargs`) keys and shapes.
    Raises ValueError naming a missing, unused or mis-shaped tensor."""
    src = {k: v for k, v in state_dict.items()}
    used: set[str] = set()
    out = {}

    def take(key):
        if key not in src:
            raise ValueError(f"diffusers state_dict has no {key!r} (does the config match the weights?)")
        used.add(key)
        return src[key]

    for ours, theirs, kind in _module_pairs(model):
        if kind == "plain":
            for p in ("weight", "bias"):
                if f"{theirs}.{p}" in src or p == "weight":
                    out[f"{ours}.{p}"] = take(f"{theirs}.{p}")
        elif kind == "res":
            for a, b in _resblock_keys(ours, theirs):
                if b in src or "conv_shortcut" not in b:
                    out[a] = take(b)
        elif kind == "attn":
            if f"{theirs}.group_norm.weight" in src:
                out[f"{ours}.norm.weight"] = take(f"{theirs}.group_norm.weight")
                out[f"{ours}.norm.bias"] = take(f"{theirs}.group_norm.bias")
            out[f"{ours}.qkv.weight"] = torch.cat([take(f"{theirs}.to_{n}.weight") for n in "qkv"])[:, :, None]
            out[f"{ours}.qkv.bias"] = torch.cat([take(f"{theirs}.to_{n}.bias") for n in "qkv"])
            out[f"{ours}.proj_out.weight"] = take(f"{theirs}.to_out.0.weight")[:, :, None]
            out[f"{ours}.proj_out.bias"] = take(f"{theirs}.to_out.0.bias")
        elif kind == "down":
            out[f"{ours}.op.weight"] = take(f"{theirs}.conv.weight")
            out[f"{ours}.op.bias"] = take(f"{theirs}.conv.bias")
        else:  # up
            out[f"{ours}.conv.weight"] = take(f"{theirs}.conv.weight")
            out[f"{ours}.conv.bias"] = take(f"{theirs}.conv.bias")
    unused = sorted(set(src) - used)
    if unused:
        raise ValueError(f"diffusers state_dict tensors without a place in the ddpm_fast UNet: {unused[:5]}"
                         f"{' ...' if len(unused) > 5 else ''} (does the config match the weights?)")
    want = model.state_dict()
    for key, value in out.items():
        if key not in want or tuple(want[key].shape) != tuple(value.shape):
            raise ValueError(f"diffusers tensor for {key!r} has shape {tuple(value.shape)}; the UNet expects "
                             f"{tuple(want[key].shape) if key in want else 'no such tensor'}")
    return out


# ---- the scheduler ------------------------------------------------------------------------------

def _betas(c: dict) -> np.ndarray:
    """The config's betas in float64 (diffusers computes them in float32)."""
    T = int(c["num_train_timesteps"])
    start, end = float(c["beta_start"]), float(c["beta_end"])
    if c["trained_betas"] is not None:
        return np.asarray(c["trained_betas"], dtype=np.float64)
    name = c["beta_schedule"]
    if name == "linear":
        return np.linspace(start, end, T, dtype=np.float64)
    if name == "scaled_linear":
        return np.linspace(start ** 0.5, end ** 0.5, T, dtype=np.float64) ** 2
    if name == "squaredcos_cap_v2":
        from .diffusion import named_beta_schedule
        return named_beta_schedule("cosine", T)
    if name == "sigmoid":
        z = np.linspace(-6.0, 6.0, T, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-z)) * (end - start) + start
    raise _unsupported("beta_schedule", name, "linear, scaled_linear, squaredcos_cap_v2, sigmoid or trained_betas")


class DiffusersDiffusion(Diffusion):
    """A `Diffusion` mapped from a diffusers DDPMScheduler / DDIMScheduler config.

    Besides the process it keeps the scheduler's sampling conventions: `respace(n)` for an int
    (or "n") uses its timestep_spacing and steps_offset (diffusers' set_timesteps(n)); other specs
    ("ddim25", "trailing50", lists) are Diffusion's. Attributes: scheduler_class, timestep_spacing,
    steps_offset, clip_sample, dynamic_threshold ((ratio, max) or None), set_alpha_to_one.
    """

    _EXTRA = ("scheduler_class", "timestep_spacing", "steps_offset", "clip_sample", "dynamic_threshold",
              "set_alpha_to_one")

    def respace(self, spec) -> Diffusion:
        count = None
        if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
            count = int(spec)
        elif isinstance(spec, str) and spec.strip().isdigit():
            count = int(spec)
        if count is not None and self.num_timesteps == self.original_num_steps:
            return self.respace_diffusers(count, self.timestep_spacing, self.steps_offset)
        return super().respace(spec)

    def _subset(self, kept):
        new = super()._subset(kept)
        for name in self._EXTRA:
            setattr(new, name, getattr(self, name))
        return new

    def sample_options(self) -> dict:
        """ddpm_fast.sample keyword arguments for the scheduler's step options: clip_denoised
        (clip_sample) and dynamic_threshold (thresholding: then clip_denoised is off)."""
        options = {"clip_denoised": bool(self.clip_sample) and self.dynamic_threshold is None}
        if self.dynamic_threshold is not None:
            options["dynamic_threshold"] = self.dynamic_threshold
        return options

    def __repr__(self) -> str:
        return (super().__repr__()[:-1] + f", scheduler={self.scheduler_class!r}, "
                f"timestep_spacing={self.timestep_spacing!r}, steps_offset={self.steps_offset}, "
                f"clip_sample={self.clip_sample}, dynamic_threshold={self.dynamic_threshold})")


def diffusion_from_scheduler(scheduler) -> DiffusersDiffusion:
    """A DDPMScheduler / DDIMScheduler (instance or config dict) -> DiffusersDiffusion.
    Raises UnsupportedConfig naming the field for anything else."""
    given = _config_dict(scheduler)
    cls = given.pop("_class_name", "DDPMScheduler")
    if cls not in SCHEDULERS:
        raise _unsupported("_class_name", cls,
                           f"only {' and '.join(SCHEDULERS)} configs map onto ddpm_fast's Diffusion")
    given.pop("_diffusers_version", None)
    unknown = sorted(set(given) - set(SCHEDULER_DEFAULTS))
    if unknown:
        raise _unsupported(unknown[0], given[unknown[0]], f"unknown {cls} field")
    c = {**SCHEDULER_DEFAULTS, **given}
    if c["rescale_betas_zero_snr"]:
        raise _unsupported("rescale_betas_zero_snr", True, "zero terminal SNR schedules are not supported")
    if c["prediction_type"] not in PREDICTIONS:
        raise _unsupported("prediction_type", c["prediction_type"], "epsilon, sample or v_prediction")
    variance = c["variance_type"] if cls == "DDPMScheduler" else "fixed_small"
    if variance not in VARIANCES:
        raise _unsupported("variance_type", variance, "fixed_small, fixed_small_log, fixed_large or learned_range")
    if cls == "DDIMScheduler" and not c["set_alpha_to_one"]:
        raise _unsupported("set_alpha_to_one", False, "the last step always goes to alpha_bar = 1")
    if c["clip_sample"] and not c["thresholding"] and float(c["clip_sample_range"]) != 1.0:
        raise _unsupported("clip_sample_range", c["clip_sample_range"], "x0 is clipped to [-1, 1]")
    if c["timestep_spacing"] not in ("leading", "trailing", "linspace"):
        raise _unsupported("timestep_spacing", c["timestep_spacing"], "leading, trailing or linspace")
    betas = _betas(c)
    if betas.size != int(c["num_train_timesteps"]):
        raise _unsupported("trained_betas", f"<{betas.size} values>",
                           f"needs num_train_timesteps={c['num_train_timesteps']} values")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a beta of 1 (an x0 / v model may have one) warns for eps only
        diffusion = DiffusersDiffusion(betas, variance=VARIANCES[variance],
                                       prediction=PREDICTIONS[c["prediction_type"]])
    diffusion.schedule = c["beta_schedule"] if c["trained_betas"] is None else "trained_betas"
    diffusion.scheduler_class = cls
    diffusion.timestep_spacing = c["timestep_spacing"]
    diffusion.steps_offset = int(c["steps_offset"])
    diffusion.clip_sample = bool(c["clip_sample"])
    diffusion.dynamic_threshold = ((float(c["dynamic_thresholding_ratio"]), float(c["sample_max_value"]))
                                   if c["thresholding"] else None)
    diffusion.set_alpha_to_one = bool(c["set_alpha_to_one"])
    return diffusion


# ---- folders ------------------------------------------------------------------------------------

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _unet_dir(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    if (path / "unet" / "config.json").is_file():
        return path / "unet"
    raise FileNotFoundError(f"{str(path)!r} is neither a UNet2DModel folder (config.json + weights) nor a "
                            "pipeline folder with unet/")


def weights_file(path) -> Path:
    """The weights file of a UNet2DModel / pipeline folder (safetensors preferred, then bin)."""
    folder = _unet_dir(Path(path))
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{str(folder)!r} has none of {', '.join(WEIGHT_FILES)} (sharded or variant "
                            "weights are not supported)")


def _read_state_dict(file: Path) -> dict:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)


def _scheduler_config_of(path: Path) -> dict | None:
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


# ---- the entry point ----------------------------------------------------------------------------

def from_diffusers(unet_or_path, scheduler=None, *, backend: str = "auto") -> tuple[UNet, DiffusersDiffusion]:
    """A diffusers DDPM U-Net (and scheduler) as a ddpm_fast UNet on the fused ops plus its Diffusion.

    Args:
        unet_or_path: a diffusers.UNet2DModel, or a folder written by its save_pretrained
            (config.json + diffusion_pytorch_model.safetensors or .bin) or by a pipeline's
            (model_index.json, unet/, scheduler/).
        scheduler: a DDPMScheduler / DDIMScheduler, its config dict, a ddpm_fast Diffusion (used as
            it is), or a path to a
            scheduler_config.json or a folder holding one; default: the pipeline folder's
            scheduler/, else DDPMScheduler's defaults (linear betas 1e-4 .. 0.02, T = 1000,
            epsilon, fixed_small, clip_sample) as DDPMPipeline uses for the DDPM checkpoints.
        backend: the UNet's op backend.
    Returns (model, diffusion): model is an eval-mode ddpm_fast.UNet with the same weights (on the
    CPU, float32) whose `model.diffusion` is `diffusion`, so `ddpm_fast.sample(model, ...)` works as
    it is; diffusion is a DiffusersDiffusion (see its sample_options()).
    Raises UnsupportedConfig (a ValueError) naming the unsupported config field.
    """
    if isinstance(unet_or_path, (str, Path)):
        path = Path(unet_or_path)
        folder = _unet_dir(path)
        config = json.loads((folder / "config.json").read_text())
        state_dict = _read_state_dict(weights_file(path))
        if scheduler is None:
            scheduler = _scheduler_config_of(path)
    elif isinstance(unet_or_path, torch.nn.Module) and hasattr(unet_or_path, "config"):
        config = _config_dict(unet_or_path)
        state_dict = {k: v.detach().to("cpu", torch.float32) for k, v in unet_or_path.state_dict().items()}
    else:
        raise TypeError("unet_or_path must be a diffusers UNet2DModel or a folder path; got "
                        f"{type(unet_or_path).__name__}")
    if isinstance(scheduler, (str, Path)):
        p = Path(scheduler)
        sched_config = json.loads(p.read_text()) if p.is_file() else _scheduler_config_of(p)
        if sched_config is None:
            raise FileNotFoundError(f"no scheduler_config.json at {str(p)!r}")
        scheduler = sched_config
    diffusion = scheduler if isinstance(scheduler, Diffusion) else diffusion_from_scheduler(scheduler)
    model = UNet(**unet_kwargs(config), backend=backend)
    model.load_state_dict(convert_state_dict({k: v.float() for k, v in state_dict.items()}, model), strict=True)
    want = diffusion.model_output_channels(model.in_channels)
    if model.out_channels != want:
        raise _unsupported("out_channels", model.out_channels, f"the scheduler (variance {diffusion.variance!r}) "
                           f"needs {want} output channels for {model.in_channels} input channels")
    model.diffusion = diffusion
    return model.eval(), diffusion
