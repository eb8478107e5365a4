"""The noisy-image classifier of classifier guidance: guided-diffusion's `EncoderUNetModel` on
ddpm_fast's fused ops, and the guidance gradient built from it.

`EncoderUNet` takes EncoderUNetModel's arguments and has its state_dict keys, so guided-diffusion's
classifier checkpoints (e.g. 64x64_classifier.pt, 256x256_classifier.pt) load with strict=True; it
is the encoder half of `ddpm_fast.UNet` (time embedding, input_blocks, middle_block) with a pooling
head, and its GroupNorms and attention run the fused ops under autograd too (their backward
passes are fused as well), which is what classifier guidance differentiates:

    classifier = EncoderUNet(image_size=64, in_channels=3, model_channels=128, out_channels=1000,
                             num_res_blocks=4, attention_resolutions=(2, 4, 8), channel_mult=(1, 2, 3, 4),
                             num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
                             pool="attention")
    classifier.load_state_dict(torch.load("64x64_classifier.pt"))
    images = ddpm_fast.sample(model, steps=250, class_labels=labels,
                              cond_fn=classifier_guidance(classifier, scale=1.0))
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .unet import NUM_GROUPS, AttentionBlock, ResBlock, _OpsModule, _TimestepModel, _zeroed

__all__ = ["AttentionPool2d", "EncoderUNet", "POOLS", "classifier_guidance"]

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class AttentionPool2d(_OpsModule):
    """CLIP's attention pooling as guided-diffusion has it: the mean token joins the H*W tokens,
    a learned positional embedding is added, one multi-head self-attention ("new" qkv order)
    runs over the H*W + 1 tokens and the mean token's output is projected by `c_proj`.

    (N, embed_dim, spacial_dim, spacial_dim) -> (N, output_dim or embed_dim)."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: int | None = None):
        super().__init__()
        if num_heads_channels < 1 or embed_dim % num_heads_channels:
            raise ValueError(f"num_head_channels={num_heads_channels} must divide the pooled channel count {embed_dim}")
        self.spacial_dim = spacial_dim
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        if tuple(spatial) != (self.spacial_dim, self.spacial_dim):
            raise ValueError(f"attention pooling was built for {self.spacial_dim}x{self.spacial_dim} features "
                             f"(image_size / 2 ** (len(channel_mult) - 1)); got {tuple(spatial)}: "
                             "the classifier takes images of its image_size only")
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding.to(x.dtype)
        qkv = F.conv1d(x, self.qkv_proj.weight.to(x.dtype), self.qkv_proj.bias.to(x.dtype))
        a = ops.attention(qkv, self.num_heads, layout="new", backend=self.backend)
        # only the mean token's output is read: project that column alone
        return F.conv1d(a[:, :, :1], self.c_proj.weight.to(a.dtype), self.c_proj.bias.to(a.dtype))[:, :, 0]


class EncoderUNet(_TimestepModel):
    """guided-diffusion's EncoderUNetModel (the classifier of classifier guidance) on ddpm_fast's ops.

    Args: as ddpm_fast.UNet (guided-diffusion's names; out_channels = the number of classes),
    without num_classes (the classifier is not label-conditioned), plus
        pool: the head: "adaptive" (GroupNorm, SiLU, global average, zero-initialised 1x1 conv),
            "attention" (GroupNorm, SiLU, AttentionPool2d; needs num_head_channels; guided-diffusion's
            classifiers), "spatial" / "spatial_v2" (an MLP on the spatial means of every input
            block's and the middle block's output).
        backend, fast: as ddpm_fast.UNet.

    forward(x (N, in_channels, H, W), timesteps (N,)) -> logits (N, out_channels) in x's dtype
    (float32 for a half-precision torso, as guided-diffusion casts back before the head).
    """

    _torso_names = ("input_blocks", "middle_block")

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Iterable[int], dropout: float = 0.0,
                 channel_mult: Sequence[float] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 use_checkpoint: bool = False, use_fp16: bool = False, num_heads: int = 1,
                 num_head_channels: int = -1, num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_new_attention_order: bool = False, pool: str = "adaptive",
                 *, backend: str = "auto", fast: bool | None = None):
        super().__init__()
        if dims != 2:
            raise ValueError(f"dims must be 2 (ddpm_fast's classifier is 2-D only); got {dims!r}")
        for name, value in (("image_size", image_size), ("in_channels", in_channels),
                            ("model_channels", model_channels), ("out_channels", out_channels),
                            ("num_res_blocks", num_res_blocks)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        channel_mult = tuple(channel_mult)
        if not channel_mult or any(not m > 0 for m in channel_mult):
            raise ValueError(f"channel_mult must be a non-empty sequence of positive numbers; got {channel_mult!r}")
        for m in channel_mult:
            if int(m * model_channels) % NUM_GROUPS:
                raise ValueError(f"channel_mult {m} x model_channels {model_channels} = {int(m * model_channels)} "
                                 f"channels is not divisible by the {NUM_GROUPS} GroupNorm groups")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(map(repr, POOLS))}; got {pool!r}")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("pool='attention' needs num_head_channels (the pooling attention's channels per head)")
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resblock_updown = resblock_updown
        self.use_new_attention_order = use_new_attention_order
        self.pool = pool
        self.flip_sin_to_cos, self.freq_shift = True, 0.0  # ADM's timestep embedding

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(c_in, c_out, **kw):
            return ResBlock(c_in, emb_dim, dropout, out_channels=c_out, use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(c, heads, norm=True):
            return AttentionBlock(c, num_heads=heads, num_head_channels=num_head_channels,
                                  use_new_attention_order=use_new_attention_order)

        skip_chans, ch, rate = self._build_encoder(
            in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions, res, attn,
            num_heads=num_heads, resblock_updown=resblock_updown, conv_resample=conv_resample)
        feature_size = sum(skip_chans) + ch  # the spatial pools' input: every block's channel means
        if pool == "adaptive":
            self.out = nn.Sequential(nn.GroupNorm(NUM_GROUPS, ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                     _zeroed(nn.Conv2d(ch, out_channels, 1)), nn.Flatten())
        elif pool == "attention":
            self.out = nn.Sequential(nn.GroupNorm(NUM_GROUPS, ch), nn.SiLU(),
                                     AttentionPool2d(image_size // rate, ch, num_head_channels, out_channels))
        elif pool == "spatial":
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        else:
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), nn.GroupNorm(NUM_GROUPS, 2048), nn.SiLU(),
                                     nn.Linear(2048, out_channels))
        self._finish_init(backend, fast, use_fp16)

    def forward(self, x: torch.Tensor, timesteps) -> torch.Tensor:
        """x (N, in_channels, H, W), timesteps (N,) (or a scalar) -> logits (N, out_channels)."""
        self._check_input(x)
        emb_outs = self._project_embeddings(self._time_embedding(x, timesteps))
        h, _ = self._torso_input(x)
        spatial = self.pool.startswith("spatial")
        means = []
        for block in self.input_blocks:
            h = block(h, emb_outs)
            if spatial:
                means.append(h.to(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb_outs)
        if spatial:
            means.append(h.to(x.dtype).mean(dim=(2, 3)))
            h = torch.cat(means, dim=-1)
            first = self.out[0]
            h = F.linear(h.to(first.weight.dtype), first.weight, first.bias)
            if self.pool == "spatial":
                h = F.relu(h)
            else:
                h = self._head._norm(self.out[1], h, silu=True)
            last = self.out[-1]
            return F.linear(h, last.weight, last.bias).to(x.dtype)
        norm = self.out[0]
        h = self._head._norm(norm, h.to(x.dtype), silu=True)  # guided-diffusion: h.type(x.dtype), then out
        if self.pool == "adaptive":
            conv = self.out[3]
            h = h.mean(dim=(2, 3), keepdim=True)
            return F.conv2d(h.to(conv.weight.dtype), conv.weight, conv.bias).flatten(1).to(x.dtype)
        pool = self.out[2]
        return pool(h.to(pool.positional_embedding.dtype)).to(x.dtype)


def classifier_guidance(classifier: nn.Module, scale: float = 1.0):
    """cond_fn for ddpm_fast.sample (classifier guidance, Dhariwal & Nichol 2021, as guided-diffusion's
    classifier_sample.py): cond_fn(x, t, y) = scale * d/dx log softmax(classifier(x, t))[y], the
    gradient of the log-probability of each sample's label at the noisy x_t, shaped like x.

    classifier(x (B, C, H, W), t (B,)) -> logits (B, K): e.g. an EncoderUNet. The gradient runs
    through the classifier's fused backward passes. sample() calls cond_fn with the labels it
    samples for (class_labels, or model_kwargs['y'])."""
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a number; got {type(scale).__name__}")

    def cond_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **_) -> torch.Tensor:
        if y is None:
            raise ValueError("classifier guidance needs class labels: pass class_labels to sample()")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
            selected = log_probs[torch.arange(x.shape[0], device=x.device), y.reshape(-1)]
            (grad,) = torch.autograd.grad(selected.sum(), x_in)
        return grad * float(scale)

    return cond_fn
