"""The ADM U-Net (guided-diffusion's / improved-diffusion's `UNetModel`) on ddpm_fast's fused ops.

`UNet` takes UNetModel's keyword arguments and has the same state_dict keys and shapes, so a
guided-diffusion checkpoint loads with `strict=True`; `forward(x, timesteps, y=None)` gives the same
output. What differs is how it runs:

* every GroupNorm (+ AdaGN scale/shift, + SiLU) is one `ddpm_fast.ops.group_norm_scale_shift` call
  and every attention one `ddpm_fast.ops.attention` call, on the backend chosen by `model.backend`
  ("auto", "torch", "cpu", "cuda", "triton"), under autograd too (training, gradients with respect
  to x): each op has its fused backward on every backend;
* with any backend but "torch" the fast paths below are on (`model.fast`), while `backend="torch"`
  is the plain reference model (the baseline of the benchmarks):
    - the timestep projections of all ResBlocks are one matmul (their weights concatenated once and
      cached until a weight changes);
    - the convolutions run through `ddpm_fast.fast_layers.FastConv`: on the CPU, for channels_last
      float32/bfloat16 inputs, oneDNN with weights prepacked once per input shape and each
      ResBlock's residual add fused into its last convolution; float32 3x3 convolutions with
      enough 4x4 output tiles by Winograd F(4x4, 3x3) (csrc/cpu/winograd_conv.cpp, 4x fewer
      multiply-adds, also under autograd); nearest x2 upsampling followed by a 3x3 conv
      (Upsample, up-ResBlocks) computed as one 2x2 conv of the small image with merged taps (16
      instead of 36 multiply-adds per pixel and channel pair). With autograd recording, the other
      convolutions take the plain differentiable path;
* channels_last is kept end to end (`model.to(memory_format=torch.channels_last)` and channels_last
  inputs); attention then works on the (B, T, C) view without transposing copies. On the CPU the
  fast path runs channels_last internally for NCHW inputs too (the result is returned NCHW).

Precision: `convert_to_fp16()` / `convert_to_bf16()` put the convolutions of the torso
(input_blocks, middle_block, output_blocks) in half precision as guided-diffusion's
`convert_to_fp16` does (norms, embeddings and the `out` head stay float32; the ops compute GroupNorm
and softmax in float32); `model.to(torch.bfloat16)` makes the whole model bfloat16. The forward
follows the weights: the torso runs in the dtype of its convolutions and the head in the dtype of
`out`; the result has the input's dtype.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _python_dispatch

from . import ops
from ._registry import BACKENDS
from .fast_layers import FastConv, FastLinear, is_channels_last, version_key

NUM_GROUPS = 32  # ADM's normalization(): GroupNorm32(32, channels)

__all__ = ["UNet", "ResBlock", "AttentionBlock", "Downsample", "Upsample", "TimestepSequential",
           "timestep_embedding"]


# --------------------------------------------------------------------------------------------
# Functional helpers
# --------------------------------------------------------------------------------------------

def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0, *,
                       flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t * f), sin(t * f)] of (N,) timesteps (fractional allowed).

    The frequencies are f_i = max_period ** (-i / (dim // 2 - freq_shift)), i < dim // 2, in
    float32, computed as guided-diffusion and diffusers do (exp(-log(max_period) * i / ...)); an
    odd `dim` gets a zero column at the end. Returns (N, dim) float32.
    ADM's convention is the default; diffusers' `Timesteps(dim, flip_sin_to_cos, freq_shift)` is
    the same with its two options (flip_sin_to_cos=False: [sin, cos]; the original DDPM
    checkpoints use flip_sin_to_cos=False, freq_shift=1).
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      * -math.log(max_period) / (half - freq_shift))
    args = timesteps.reshape(-1, 1).float() * freqs[None]
    parts = [torch.cos(args), torch.sin(args)]
    emb = torch.cat(parts if flip_sin_to_cos else parts[::-1], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class _UsesOps:
    """Mixin of the blocks whose forward calls ddpm_fast's ops: carries the backend and the
    fast-path switch (set for the whole model through `UNet.backend` / `UNet.fast`)."""

    backend = "auto"
    fast = True

    @property
    def _cached_layers(self) -> bool:
        """The fast path's cached conv / linear runners (eager only: inside torch.compile the
        plain layers run and the compiler picks their kernels; the fused ops run either way)."""
        return self.fast and not torch.compiler.is_compiling()

    def _fast_conv(self, name: str) -> FastConv:
        convs = self.__dict__.setdefault("_fast_convs", {})
        runner = convs.get(name)
        if runner is None:
            runner = convs[name] = FastConv()
        return runner

    def _linear(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
                add: torch.Tensor | None = None) -> torch.Tensor:
        """x (M, K) @ weight.T + bias [+ add]: prepacked oneDNN on the fast path (see fast_layers)."""
        if self._cached_layers:
            linears = self.__dict__.setdefault("_fast_linears", {})
            runner = linears.get(name)
            if runner is None:
                runner = linears[name] = FastLinear()
            return runner.linear(x, weight, bias, add)
        out = F.linear(x, weight[:, :, 0] if weight.dim() == 3 else weight, bias)
        return out if add is None else out.add_(add)

    def _conv(self, name: str, conv: nn.Conv2d, x: torch.Tensor,
              add: torch.Tensor | None = None) -> torch.Tensor:
        """conv(x) [+ add]: prepacked, with the add fused, on the fast path (see fast_layers)."""
        if self._cached_layers:
            return self._fast_conv(name).conv(conv, x, add)
        out = conv(x)
        return out if add is None else add + out

    def _conv_up2(self, name: str, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """conv(nearest x2 upsampling of x): as 2x2 phase convs of x on the fast path."""
        if self._cached_layers:
            return self._fast_conv(name).up2(conv, x)
        return conv(F.interpolate(x, scale_factor=2, mode="nearest"))

    def _norm(self, norm: nn.GroupNorm, x: torch.Tensor, *, silu: bool,
              scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
        return ops.group_norm_scale_shift(x, norm.num_groups, norm.weight, norm.bias, scale=scale,
                                          shift=shift, eps=norm.eps, silu=silu, backend=self.backend)


class _OpsModule(_UsesOps, nn.Module):
    """An nn.Module using the ops."""


# --------------------------------------------------------------------------------------------
# Blocks (module and parameter names are guided-diffusion's)
# --------------------------------------------------------------------------------------------

class Upsample(_OpsModule):
    """Nearest-neighbour x2 upsampling, then a 3x3 conv (`conv`) when use_conv.

    (N, channels, H, W) -> (N, out_channels, 2H, 2W)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError(f"Upsample without a conv keeps the channel count; got channels={channels}, "
                             f"out_channels={self.out_channels}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_conv:
            return self._conv_up2("conv", self.conv, x)
        return F.interpolate(x, scale_factor=2, mode="nearest")


class Downsample(_OpsModule):
    """Stride-2 3x3 conv (`op`) when use_conv, else 2x2 average pooling.

    padding: of the conv, 1 (ADM) or 0: then the image is first padded by one zero row and
    column at the bottom and right (TensorFlow's "SAME" for stride 2: the original DDPM
    checkpoints, diffusers' downsample_padding=0).
    (N, channels, H, W) -> (N, out_channels, H/2, W/2)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if padding not in (0, 1):
            raise ValueError(f"Downsample padding must be 0 or 1; got {padding!r}")
        self.padding = padding
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=padding)
        else:
            if self.out_channels != channels:
                raise ValueError(f"Downsample without a conv keeps the channel count; got channels={channels}, "
                                 f"out_channels={self.out_channels}")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_conv:
            return self.op(x)
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self._conv("op", self.op, x)


class ResBlock(_OpsModule):
    """ADM residual block conditioned on the timestep embedding.

    h = conv(SiLU(GN(x)));  h = SiLU(GN(h) * (1 + scale) + shift) (use_scale_shift_norm) or
    SiLU(GN(h + e)); h = conv(dropout(h)); out = skip(x) + h, where (scale, shift) or e is
    emb_layers(emb). up / down resample x and h (nearest x2 / 2x2 average) between the first
    norm and conv. (N, channels, H, W), emb (N, emb_channels) -> (N, out_channels, H', W').
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0,
                 out_channels: int | None = None, use_conv: bool = False,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False,
                 norm_groups: int = NUM_GROUPS, norm_eps: float = 1e-5):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.up, self.down = up, down
        c_out = self.out_channels
        self.in_layers = nn.Sequential(nn.GroupNorm(norm_groups, channels, eps=norm_eps), nn.SiLU(),
                                       nn.Conv2d(channels, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(),
                                        nn.Linear(emb_channels, 2 * c_out if use_scale_shift_norm else c_out))
        self.out_layers = nn.Sequential(nn.GroupNorm(norm_groups, c_out, eps=norm_eps), nn.SiLU(),
                                        nn.Dropout(p=dropout),
                                        _zeroed(nn.Conv2d(c_out, c_out, 3, padding=1)))
        if c_out == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, c_out, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W), emb (N, emb_channels): the block on its own."""
        return self.forward_projected(x, self.emb_layers(emb))

    def forward_projected(self, x: torch.Tensor, emb_out: torch.Tensor) -> torch.Tensor:
        """The block given emb_out = emb_layers(emb), (N, 2 * out_channels) or (N, out_channels)."""
        h = self._norm(self.in_layers[0], x, silu=True)
        if self.up:
            h = self._conv_up2("in_layers.2", self.in_layers[2], h)
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        else:
            if self.down:
                h, x = F.avg_pool2d(h, 2, 2), F.avg_pool2d(x, 2, 2)
            h = self._conv("in_layers.2", self.in_layers[2], h)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self._norm(self.out_layers[0], h, silu=True, scale=scale, shift=shift)
        else:
            h = self._norm(self.out_layers[0], h + emb_out.to(h.dtype)[:, :, None, None], silu=True)
        h = self._dropout(h)
        skip = x if isinstance(self.skip_connection, nn.Identity) else self._conv(
            "skip_connection", self.skip_connection, x)
        return self._conv("out_layers.3", self.out_layers[3], h, add=skip)


    def _dropout(self, h: torch.Tensor) -> torch.Tensor:
        """out_layers' dropout (identity in eval mode). Its mask is drawn in NCHW order whatever
        h's layout, so a channels_last fast path trains with the reference model's masks."""
        drop = self.out_layers[2]
        if not (drop.training and drop.p > 0) or h.is_contiguous():
            return drop(h)
        out = drop(h.contiguous())
        return out.contiguous(memory_format=torch.channels_last) if is_channels_last(h) else out


class AttentionBlock(_OpsModule):
    """Self-attention over the H*W positions: x + proj_out(attention(qkv(GN(x)))).

    num_heads heads, or channels // num_head_channels when num_head_channels != -1. layout "legacy"
    (QKVAttentionLegacy, heads split before q/k/v) or "new" (QKVAttention). (N, C, H, W) -> same.
    norm_groups / norm_eps: the GroupNorm's; norm_groups=None: no norm (diffusers' mid-block
    attention of a scale_shift model).
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False, norm_groups: int | None = NUM_GROUPS,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            if num_heads < 1 or channels % num_heads:
                raise ValueError(f"num_heads={num_heads} must be a positive divisor of the attention "
                                 f"channel count {channels}")
            self.num_heads = num_heads
        else:
            if num_head_channels < 1 or channels % num_head_channels:
                raise ValueError(f"num_head_channels={num_head_channels} must divide the attention "
                                 f"channel count {channels}")
            self.num_heads = channels // num_head_channels
        self.layout = "new" if use_new_attention_order else "legacy"
        self.norm = None if norm_groups is None else nn.GroupNorm(norm_groups, channels, eps=norm_eps)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        h = x if self.norm is None else self._norm(self.norm, x, silu=False)
        if not (self.fast and is_channels_last(x)):
            qkv = F.conv1d(h.reshape(b, c, -1), self.qkv.weight, self.qkv.bias)
            a = ops.attention(qkv, self.num_heads, layout=self.layout, backend=self.backend)
            return x + F.conv1d(a, self.proj_out.weight, self.proj_out.bias).reshape(x.shape)
        # channels_last: the activations are (B, T, C) in memory; the 1x1 convs are matmuls over
        # the B*T tokens, with no transposing copies of x and the residual add done in place.
        tokens = x.shape[2] * x.shape[3]
        qkv = self._linear("qkv", self.qkv.weight, self.qkv.bias, h.permute(0, 2, 3, 1).reshape(b * tokens, c))
        qkv = qkv.view(b, tokens, 3 * c).transpose(1, 2)  # (B, 3C, T), channel stride 1
        a = ops.attention(qkv, self.num_heads, layout=self.layout, backend=self.backend)
        out = self._linear("proj_out", self.proj_out.weight, self.proj_out.bias,
                           a.transpose(1, 2).reshape(b * tokens, c), add=x.permute(0, 2, 3, 1).reshape(b * tokens, c))
        return out.view(b, x.shape[2], x.shape[3], c).permute(0, 3, 1, 2)


def _zeroed(module: nn.Module) -> nn.Module:
    """guided-diffusion's zero_module: the last conv of each residual branch starts at zero."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class TimestepSequential(_UsesOps, nn.Sequential):
    """A sequence of blocks where ResBlocks get their projected timestep embedding.

    forward(h, emb_outs): emb_outs maps each ResBlock to its emb_layers output."""

    def forward(self, h: torch.Tensor, emb_outs: dict) -> torch.Tensor:  # type: ignore[override]
        for i, layer in enumerate(self):
            if isinstance(layer, ResBlock):
                h = layer.forward_projected(h, emb_outs[layer])
            elif isinstance(layer, nn.Conv2d):  # the stem conv, input_blocks.0.0
                h = self._conv(str(i), layer, h)
            else:
                h = layer(h)
        return h


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class _TimestepModel(nn.Module):
    """What the U-Net and the classifier (ddpm_fast.classifier.EncoderUNet) share: the backend and
    fast-path switches of their op-using blocks, the precision of the torso, the timestep embedding
    and its projections, and the encoder half (input_blocks, middle_block) built from
    guided-diffusion's arguments. Subclasses set `_torso_names` (the parts convert_to_fp16 converts)."""

    _torso_names: tuple[str, ...] = ()

    def _build_encoder(self, in_channels: int, model_channels: int, channel_mult: tuple, num_res_blocks: int,
                       attention_resolutions: tuple, res, attn, *, num_heads: int, resblock_updown: bool,
                       conv_resample: bool, downsample_padding: int = 1, middle_attention: bool = True,
                       middle_attention_norm: bool = True) -> tuple[list[int], int, int]:
        """Sets self.input_blocks and self.middle_block; `res(c_in, c_out, **kw)` and
        `attn(c, heads, norm=True)` make the ResBlocks and AttentionBlocks. Returns the channels of
        every input block's output (the U-Net's skips), the channels and the downsampling rate at
        the bottom."""
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        rate = 1
        last = len(channel_mult) - 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if rate in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_chans.append(ch)
            if level != last:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(
                    ch, conv_resample, padding=downsample_padding)
                self.input_blocks.append(TimestepSequential(down))
                skip_chans.append(ch)
                rate *= 2

        self.middle_block = TimestepSequential(
            res(ch, ch), *([attn(ch, num_heads, middle_attention_norm)] if middle_attention else []), res(ch, ch))
        return skip_chans, ch, rate

    def _finish_init(self, backend: str, fast: bool | None, use_fp16: bool) -> None:
        self._resblocks = [m for m in self.modules() if isinstance(m, ResBlock)]
        self._fused_emb_key = None
        self._fused_emb = None
        self._head = _OpsModule()  # runs the head's norm and conv
        self.backend = backend
        self.fast = (backend != "torch") if fast is None else bool(fast)
        if use_fp16:
            self.convert_to_fp16()

    # ---- backend and fast-path switches --------------------------------------------------

    @property
    def backend(self) -> str:
        """Op backend of every block: "auto", "torch", "cpu", "cuda" or "triton"."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {value!r}")
        self._backend = value
        for m in self._ops_modules():
            m.backend = value

    @property
    def fast(self) -> bool:
        """Fast paths on: fused timestep projections, prepacked CPU convs, fused residual adds."""
        return self._fast

    @fast.setter
    def fast(self, value: bool) -> None:
        self._fast = bool(value)
        for m in self._ops_modules():
            m.fast = self._fast

    def _ops_modules(self):
        return [m for m in self.modules() if isinstance(m, _UsesOps)]  # includes _head

    # ---- precision ------------------------------------------------------------------------

    def _convert_torso(self, dtype: torch.dtype):
        for name in self._torso_names:
            for m in getattr(self, name).modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.weight.data = m.weight.data.to(dtype)
                    if m.bias is not None:
                        m.bias.data = m.bias.data.to(dtype)
        return self

    def convert_to_fp16(self) :
        """Torso convolutions to float16 (guided-diffusion's convert_to_fp16); the rest stays fp32.
        Returns the model."""
        return self._convert_torso(torch.float16)

    def convert_to_bf16(self) :
        """Torso convolutions to bfloat16; norms, embeddings and the head stay float32."""
        return self._convert_torso(torch.bfloat16)

    def convert_to_fp32(self) :
        """Undo convert_to_fp16 / convert_to_bf16."""
        return self._convert_torso(torch.float32)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the torso runs in (that of its convolutions)."""
        return self.input_blocks[0][0].weight.dtype

    def derived_tensors(self) -> tuple[torch.Tensor, ...]:
        """The derived weight copies the fast path holds now (fused timestep projection, merged
        upsampling weights, packed CPU weights), each rebuilt when its source parameters change.
        A captured graph reads these besides the parameters and buffers: ddpm_fast.graphs keeps
        them alive with the graph and recaptures when they are replaced."""
        out = [] if self._fused_emb is None else list(self._fused_emb)
        for m in self._ops_modules():
            for runner in (*m.__dict__.get("_fast_convs", {}).values(),
                           *m.__dict__.get("_fast_linears", {}).values()):
                out.extend(runner.derived())
        return tuple(out)

    # ---- forward --------------------------------------------------------------------------

    def _project_embeddings(self, emb: torch.Tensor) -> dict:
        """emb_layers(emb) of every ResBlock: one matmul over the concatenated weights when fast."""
        linears = [blk.emb_layers[1] for blk in self._resblocks]
        act = F.silu(emb)
        if not (self.fast and linears and len({(l.weight.dtype, l.weight.device) for l in linears}) == 1):
            return {blk: blk.emb_layers[1](act) for blk in self._resblocks}
        params = [p for l in linears for p in (l.weight, l.bias)]
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if grad or torch.compiler.is_compiling():  # no cache across autograd or inside a compiled graph
            weight = torch.cat([l.weight for l in linears])
            bias = torch.cat([l.bias for l in linears])
        else:
            key = tuple(version_key(p) for p in params)
            if key != self._fused_emb_key:
                # a normal tensor even under inference_mode, so that later autograd use is allowed
                with torch.inference_mode(False), torch.no_grad():
                    self._fused_emb = (torch.cat([l.weight for l in linears]),
                                       torch.cat([l.bias for l in linears]))
                self._fused_emb_key = key
            weight, bias = self._fused_emb
        out = self._head._linear("emb_layers", weight, bias, act.to(weight.dtype))
        return dict(zip(self._resblocks, out.split([l.out_features for l in linears], dim=1)))

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be a (N, {self.in_channels}, H, W) tensor; got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating tensor (images in [-1, 1]); got dtype {x.dtype}")
        levels = len(self.channel_mult) - 1
        if x.shape[2] % (1 << levels) or x.shape[3] % (1 << levels):
            raise ValueError(f"x's height and width {tuple(x.shape[2:])} must be divisible by "
                             f"{1 << levels} (2 ** (len(channel_mult) - 1))")

    def _time_embedding(self, x: torch.Tensor, timesteps) -> torch.Tensor:
        """time_embed(timestep_embedding(timesteps)): (N, 4 * model_channels); timesteps (N,) or a scalar."""
        n = x.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(n)
        if timesteps.shape != (n,):
            raise ValueError(f"timesteps must have shape ({n},) (one per sample); got {tuple(timesteps.shape)}")
        temb = timestep_embedding(timesteps, self.model_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                  freq_shift=self.freq_shift)
        return self.time_embed(temb.to(self.time_embed[0].weight.dtype))

    def _torso_input(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """x in the torso's dtype; on the CPU the fast path runs channels_last (prepacked oneDNN
        convs) whatever x's layout: returns (h, whether x was relaid out)."""
        relayout = self.fast and x.device.type == "cpu" and not is_channels_last(x)
        h = x.to(dtype=self.dtype, memory_format=torch.channels_last if relayout else torch.preserve_format)
        return h, relayout


class UNet(_TimestepModel):
    """guided-diffusion's UNetModel on ddpm_fast's ops (same arguments, weights and output).

    Args (guided-diffusion's names and meaning):
        image_size: side of the images (recorded; any size divisible by 2**(levels-1) runs).
        in_channels, model_channels, out_channels: input, base and output channels.
        num_res_blocks: ResBlocks per level.
        attention_resolutions: downsample rates (1, 2, 4, ...) with attention, e.g. (2, 4, 8).
        dropout: dropout in the ResBlocks (training only).
        channel_mult: channel multiplier per level (fractions allowed, e.g. 0.5).
        conv_resample: learned convs for up/downsampling (else nearest / average pooling).
        dims: 2 only.
        num_classes: classes of the label embedding (class-conditional model), or None.
        use_checkpoint: accepted and ignored (gradient checkpointing is a training concern).
        use_fp16: run the torso in float16 (as guided-diffusion: its convolutions are converted
            to float16 here at construction, which guided-diffusion's scripts do afterwards).
        num_heads, num_head_channels, num_heads_upsample: attention heads (num_head_channels
            != -1 fixes the channels per head; num_heads_upsample, -1 = num_heads, for the decoder).
        use_scale_shift_norm: AdaGN (scale and shift from the timestep embedding).
        resblock_updown: ResBlocks for up/downsampling.
        use_new_attention_order: "new" qkv layout (QKVAttention) instead of the legacy one.
        backend: op backend ("auto", "torch", "cpu", "cuda", "triton"); "torch" is the plain
            pure-PyTorch reference model. Settable later: `model.backend = "torch"`.
        fast: the fast paths (fused timestep projections, prepacked CPU convolutions, fused residual
            adds); default: on unless backend == "torch".

    Options beyond guided-diffusion's (keyword-only; the defaults are ADM's), for the U-Nets of
    diffusers' UNet2DModel (ddpm_fast.from_diffusers maps those onto this class):
        norm_groups, norm_eps: groups and epsilon of every GroupNorm (ADM: 32, 1e-5).
        flip_sin_to_cos, freq_shift: the timestep embedding's convention (see timestep_embedding).
        downsample_padding: 1, or 0 for the original DDPM's bottom/right padded strided convs.
        middle_attention: the middle block's attention (ResBlock, attention, ResBlock); False:
            ResBlock, ResBlock. middle_attention_norm: its GroupNorm (diffusers leaves it out when
            resnet_time_scale_shift="scale_shift").

    forward(x (N, in_channels, H, W), timesteps (N,) int or float, y (N,) int64 labels if
    class-conditional) -> (N, out_channels, H, W) in x's dtype.
    """

    _torso_names = ("input_blocks", "middle_block", "output_blocks")

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Iterable[int], dropout: float = 0.0,
                 channel_mult: Sequence[float] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: int | None = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = 1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, *, backend: str = "auto", fast: bool | None = None,
                 norm_groups: int = NUM_GROUPS, norm_eps: float = 1e-5, flip_sin_to_cos: bool = True,
                 freq_shift: float = 0.0, downsample_padding: int = 1, middle_attention: bool = True,
                 middle_attention_norm: bool = True):
        super().__init__()
        if dims != 2:
            raise ValueError(f"dims must be 2 (ddpm_fast's U-Net is 2-D only); got {dims!r}")
        for name, value in (("in_channels", in_channels), ("model_channels", model_channels),
                            ("out_channels", out_channels), ("num_res_blocks", num_res_blocks)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        channel_mult = tuple(channel_mult)
        if not channel_mult or any(not m > 0 for m in channel_mult):
            raise ValueError(f"channel_mult must be a non-empty sequence of positive numbers; got {channel_mult!r}")
        if not isinstance(norm_groups, int) or isinstance(norm_groups, bool) or norm_groups < 1:
            raise ValueError(f"norm_groups must be a positive int; got {norm_groups!r}")
        for m in channel_mult:
            if int(m * model_channels) % norm_groups:
                raise ValueError(f"channel_mult {m} x model_channels {model_channels} = {int(m * model_channels)} "
                                 f"channels is not divisible by the {norm_groups} GroupNorm groups")
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be None or a positive int; got {num_classes!r}")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resblock_updown = resblock_updown
        self.use_new_attention_order = use_new_attention_order
        self.norm_groups, self.norm_eps = norm_groups, float(norm_eps)
        self.flip_sin_to_cos, self.freq_shift = bool(flip_sin_to_cos), float(freq_shift)
        self.downsample_padding = downsample_padding
        self.middle_attention, self.middle_attention_norm = bool(middle_attention), bool(middle_attention_norm)
        self.diffusion = None  # set by from_flags

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(c_in, c_out, **kw):
            return ResBlock(c_in, emb_dim, dropout, out_channels=c_out,
                            use_scale_shift_norm=use_scale_shift_norm, norm_groups=norm_groups,
                            norm_eps=norm_eps, **kw)

        def attn(c, heads, norm=True):
            return AttentionBlock(c, num_heads=heads, num_head_channels=num_head_channels,
                                  use_new_attention_order=use_new_attention_order,
                                  norm_groups=norm_groups if norm else None, norm_eps=norm_eps)

        first_ch = int(channel_mult[0] * model_channels)
        skip_chans, ch, rate = self._build_encoder(
            in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions, res, attn,
            num_heads=num_heads, resblock_updown=resblock_updown, conv_resample=conv_resample,
            downsample_padding=downsample_padding, middle_attention=middle_attention,
            middle_attention_norm=middle_attention_norm)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if rate in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    rate //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(norm_groups, ch, eps=norm_eps), nn.SiLU(),
                                 _zeroed(nn.Conv2d(first_ch, out_channels, 3, padding=1)))

        self._finish_init(backend, fast, use_fp16)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, in_channels, H, W); timesteps (N,) (or a scalar, broadcast); y (N,) class labels
        iff the model is class-conditional. Returns (N, out_channels, H, W) in x's dtype."""
        self._check_input(x)
        n = x.shape[0]
        if (y is None) != (self.num_classes is None):
            raise ValueError("y (class labels) must be given if and only if the model is class-conditional "
                             f"(num_classes={self.num_classes})")
        emb = self._time_embedding(x, timesteps)
        if self.num_classes is not None:
            if not isinstance(y, torch.Tensor) or y.shape != (n,):
                raise ValueError(f"y must have shape ({n},) (one label per sample); got "
                                 f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
            if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
                raise ValueError(f"y must hold integer class labels; got dtype {y.dtype}")
            # the range check reads y on the host: only for CPU labels (no device sync) with real
            # values outside any trace (not while torch.compile traces or a dispatch mode, e.g.
            # fake tensors or a capture check, intercepts the ops). Labels on an accelerator are
            # not read back on every call (two host syncs per eager GPU step): the entry points
            # (sample, restore, the CLI, reference_sample_loop) check them once per run, and an
            # out-of-range label there fails in the embedding's own device-side index check.
            tracing = torch.compiler.is_compiling() or _python_dispatch._get_current_dispatch_mode() is not None
            if n and y.device.type == "cpu" and not tracing:
                lo, hi = int(y.min()), int(y.max())
                if lo < 0 or hi >= self.num_classes:
                    raise ValueError(f"y must lie in [0, {self.num_classes - 1}] (num_classes={self.num_classes}); "
                                     f"got values in [{lo}, {hi}]")
            emb = emb + self.label_emb(y)
        emb_outs = self._project_embeddings(emb)

        h, relayout = self._torso_input(x)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb_outs)
            skips.append(h)
        h = self.middle_block(h, emb_outs)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb_outs)
        norm, conv = self.out[0], self.out[2]
        h = self._head._norm(norm, h.to(conv.weight.dtype), silu=True)
        out = self._head._conv("out.2", conv, h)
        return out.to(dtype=x.dtype, memory_format=torch.contiguous_format if relayout else torch.preserve_format)
