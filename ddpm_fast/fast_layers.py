"""Inference-time convolutions and linear layers of the U-Net: prepacked oneDNN weights on the
CPU, and nearest x2 upsampling + 3x3 conv computed as 2x2 convs on the small image.

`FastConv` belongs to one nn.Conv2d. Its `conv(x, add)` gives conv(x) [+ add] and its `up2(x)`
gives conv(nearest_upsample_x2(x)), both equal to the plain computation up to float rounding:

- On the CPU, for channels_last float32/bfloat16 inputs, the convolution runs through oneDNN
  (`torch.ops.mkldnn._convolution_pointwise`) with the weight reordered into oneDNN's blocked
  layout once per input shape instead of on every call, and `add` (a ResBlock's residual) fused
  into the convolution's output.
- Float32 3x3 convolutions (stride 1, padding 1, >= 16 input and output channels) with at least
  WINOGRAD_MIN_TILES 4x4 output tiles (batch x tiles per image) run through Winograd's F(4x4, 3x3)
  (`ddpm_fast::winograd_conv3x3`, csrc/cpu/winograd_conv.cpp): 4x fewer multiply-adds, measured
  2-3x faster than oneDNN's direct convolution at a U-Net's 16x16 and 32x32 layers on one core of
  this project's AVX-512 CPU (its own GEMM needs AVX-512 and Cout % 16 == 0; elsewhere BLAS's
  batched GEMM, 1.5-2x). Costs: the transformed weight holds 36 instead of 9 values per kernel
  (4x the conv weight's memory, cached per conv, twice under autograd), and fp32 rounding errors
  about 20x a direct convolution's (relative ~1e-6 of the output's scale). `set_winograd(False)`
  or the environment variable DDPM_FAST_WINOGRAD=0 keeps every convolution on oneDNN. (Fewer
  tiles than 16 lose at the network level: the transformed weights then stream from memory for
  too little work.)
- `up2`: a 3x3 conv (padding 1) of a nearest-upsampled image gives each of the four output
  phases (row parity a, column parity b) as a 2x2 conv of the small image with merged taps; all
  four are one 2x2 conv with 4x the output channels (padding 1), interleaved afterwards. That is
  16 instead of 36 multiply-adds per input-output channel pair and small-image pixel, and no
  upsampled copy of the input.

`FastLinear` belongs to one linear map (an nn.Linear, or a 1x1 Conv1d as ADM's attention uses):
`linear(x2d, weight, bias, add)` gives x2d @ weight.T + bias [+ add] through oneDNN's
`_linear_pointwise` with the weight prepacked, for float32/bfloat16 CPU inputs. (On the AMD CPU
these were measured on, oneDNN runs fp32 GEMMs at about twice the speed of the MKL sgemm behind
F.linear.)

All keep derived weights (packed, merged or transformed) in a cache rebuilt whenever a source
tensor changes (the conv's weight or bias: data pointer, in-place version counter, dtype, device,
layout); the caches are not part of any state_dict and start empty in copies. When autograd is
recording for the weights or the input, the plain differentiable computation runs instead, except
for the Winograd convolutions: they run under autograd too (`WinogradConv`: the input's gradient is
the same Winograd convolution of the output's gradient with the flipped, transposed kernel; the
weight's and bias's, when asked for, come from ATen's convolution_backward).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _registry

MAX_SHAPES = 4  # packed weights kept per conv (one per input shape seen last)
WINOGRAD_MIN_TILES = 16  # fewer 4x4 output tiles than this (batch x tiles): oneDNN's direct conv is as fast
WINOGRAD_MIN_CHANNELS = 16  # input and output channels; below, the GEMMs are too thin to pay for the transforms
_winograd = os.environ.get("DDPM_FAST_WINOGRAD", "1") != "0"

# Winograd F(4x4, 3x3) weight transform G (points 0, +-1, +-2, inf): U = G g G^T.
_WINOGRAD_G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                            [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)

# Merging the 3 kernel rows of a 3x3 conv into the 2 rows each output phase sees, for phase a
# (the parity of the output row): rows of the small image i - 1 + a and i + a.
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                            [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def is_channels_last(x: torch.Tensor) -> bool:
    """A dense 4-D tensor stored NHWC (and not trivially so: C > 1)."""
    return x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)


def _records_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@functools.lru_cache(maxsize=None)
def _onednn_bf16() -> bool:
    """oneDNN's bf16 kernels need AVX-512 (bw, vl, dq) or AVX-NE-CONVERT; without them its weight
    reorder raises, so bf16 models take the plain ops on such CPUs."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _onednn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and weight.dtype == x.dtype
            and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _onednn_bf16()))
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _packable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return is_channels_last(x) and _onednn_ok(x, weight)


def set_winograd(enabled: bool) -> bool:
    """Turn the Winograd path of float32 3x3 convolutions on or off (process-wide; initially on
    unless DDPM_FAST_WINOGRAD=0). Returns the previous setting."""
    global _winograd
    previous, _winograd = _winograd, bool(enabled)
    return previous


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) conv weight -> the (36, I, O) float32 transformed weight U[a * 6 + b, i, o] =
    (G g_oi G^T)[a, b] that ddpm_fast::winograd_conv3x3 takes; computed in float64."""
    g = _WINOGRAD_G.to(weight.device)
    u = torch.einsum("ak,oikl,bl->abio", g, weight.detach().to(torch.float64), g)
    return u.reshape(36, weight.shape[1], weight.shape[0]).to(torch.float32).contiguous()


def winograd_panels(u: torch.Tensor) -> torch.Tensor:
    """(36, I, O) transformed weight -> its (36, O / 16, I, 16) column panels (O a multiple of 16),
    the layout the kernel's own AVX-512 GEMM streams in order (same results, bitwise)."""
    return u.reshape(u.shape[0], u.shape[1], u.shape[2] // 16, 16).permute(0, 2, 1, 3).contiguous()


@functools.lru_cache(maxsize=None)
def _kernel_isa() -> str:
    """The instruction set ddpm_fast._C's CPU kernels run ("avx512", "avx2", "baseline")."""
    return _registry.extension()[0].cpu_isa()


def _winograd_ok(x: torch.Tensor, weight: torch.Tensor, padding, stride, dilation, groups: int) -> bool:
    if not (_winograd and x.dtype == torch.float32 and weight.shape[2:] == (3, 3) and groups == 1
            and tuple(padding) == (1, 1) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and min(weight.shape[0], weight.shape[1]) >= WINOGRAD_MIN_CHANNELS):
        return False
    tiles = x.shape[0] * -(-x.shape[2] // 4) * -(-x.shape[3] // 4)
    return tiles >= WINOGRAD_MIN_TILES and _registry.has_kernel("winograd_conv3x3", "CPU")


def _winograd_autograd_ok(x: torch.Tensor, conv: nn.Conv2d, add: torch.Tensor | None) -> bool:
    """The conditions of the Winograd path (CPU, channels_last, float32 throughout) for a call
    under autograd, where FastConv._run's checks do not run."""
    return (x.device.type == "cpu" and is_channels_last(x) and conv.weight.dtype == x.dtype
            and (conv.bias is None or conv.bias.dtype == x.dtype) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
            and (add is None or (is_channels_last(add) and add.dtype == x.dtype and add.shape[1] == conv.out_channels))
            and _winograd_ok(x, conv.weight, conv.padding, conv.stride, conv.dilation, conv.groups))


def _backward_wants(ctx, index: int) -> bool:
    """Whether this backward must compute the gradient of input `index`: it requires grad and the
    running backward reaches it (torch.autograd.grad(logp, x) does not reach a classifier's weights,
    though they require grad; the engine's own query, as torch.autograd.graph uses it)."""
    if not ctx.needs_input_grad[index]:
        return False
    node = ctx.next_functions[index][0]
    try:
        return node is None or bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # no such query in this torch: compute it
        return True


class WinogradConv(torch.autograd.Function):
    """conv3x3(x, weight) + bias [+ add] (stride 1, padding 1) by ddpm_fast::winograd_conv3x3, with
    its backward: grad_x = the Winograd convolution of grad_y with the flipped, transposed kernel
    (the transposed convolution of a stride-1, padding-1 3x3 conv), grad_weight / grad_bias from
    ATen's convolution_backward (only those the running backward needs), grad_add = grad_y. `runner` (the
    FastConv) holds both transformed weights. Not twice differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, add, runner):
        ctx.save_for_backward(x, weight)
        ctx.runner, ctx.has_bias = runner, bias is not None
        return torch.ops.ddpm_fast.winograd_conv3x3(x, runner._winograd(weight, transposed=False), bias, add)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_weight = grad_bias = None
        if _backward_wants(ctx, 0):
            grad_x = torch.ops.ddpm_fast.winograd_conv3x3(grad, ctx.runner._winograd(weight, transposed=True),
                                                         None, None)
        want_weight, want_bias = _backward_wants(ctx, 1), ctx.has_bias and _backward_wants(ctx, 2)
        if want_weight or want_bias:
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [1, 1], [1, 1], False,
                [0, 0], 1, [False, want_weight, want_bias])
        return grad_x, grad_weight, grad_bias, grad if ctx.needs_input_grad[3] else None, None


def version_key(weight: torch.Tensor | None) -> tuple | None:
    """Identifies a tensor's current values: storage, in-place version (inference tensors have
    none: they cannot change outside inference mode), dtype, device, shape and strides (a
    channels_last copy differs). A derived copy made when this key was K is current while the
    key stays K (an in-place update that bypasses the version counter, e.g. through `.data`,
    is not seen). None for None."""
    if weight is None:
        return None
    version = 0 if weight.is_inference() else weight._version
    return (weight.data_ptr(), version, weight.dtype, weight.device, tuple(weight.shape), weight.stride())


def upsample_phase_weights(weight: torch.Tensor, bias: torch.Tensor | None):
    """(O, I, 3, 3) weights of a conv applied after nearest x2 upsampling -> the (4 * O, I, 2, 2)
    weights (phases (a, b) in row-major order, O channels each) of the equivalent 2x2 conv of the
    small image with padding 1, and the bias repeated per phase."""
    work = weight.dtype if weight.dtype == torch.float64 else torch.float32  # half weights: sum in fp32
    taps = _PHASE_TAPS.to(device=weight.device, dtype=work)
    merged = torch.einsum("ark,bcl,oikl->aboirc", taps, taps, weight.to(work))
    out_ch, in_ch = weight.shape[:2]
    merged = merged.reshape(4 * out_ch, in_ch, 2, 2).to(weight.dtype)
    return merged, None if bias is None else bias.repeat(4)


def interleave_phases(y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 4 * O, H + 1, W + 1) output of the phase conv -> (B, O, 2H, 2W), in y's memory format:
    out[:, :, 2i + a, 2j + b] = y[:, phase (a, b), i + a, j + b]."""
    batch, out_ch = y.shape[0], y.shape[1] // 4
    fmt = torch.channels_last if is_channels_last(y) else torch.contiguous_format
    out = torch.empty((batch, out_ch, 2 * height, 2 * width), dtype=y.dtype, device=y.device, memory_format=fmt)
    phases = y.unflatten(1, (2, 2, out_ch))
    grid = out.unflatten(2, (height, 2)).unflatten(4, (width, 2))  # (B, O, H, 2, W, 2) view
    for a in (0, 1):
        for b in (0, 1):
            grid[:, :, :, a, :, b].copy_(phases[:, a, b, :, a:a + height, b:b + width])
    return out


class FastConv:
    """Cached inference paths of one nn.Conv2d (see the module docstring)."""

    def __init__(self):
        self._source = None   # version_key of the weight and bias the caches derive from
        self._packed: dict[tuple, torch.Tensor] = {}
        self._phase = None

    # The caches hold opaque mkldnn tensors: copies and pickles start empty.
    def __deepcopy__(self, memo) -> "FastConv":
        return FastConv()

    def __getstate__(self) -> dict:
        return {"_source": None, "_packed": {}, "_phase": None}

    def derived(self) -> tuple[torch.Tensor, ...]:
        """The derived tensors held now (merged phase weights and bias, packed weights): what a
        captured graph that ran this conv reads besides the conv's own parameters."""
        phase = () if self._phase is None else tuple(t for t in self._phase if t is not None)
        return phase + tuple(self._packed.values())

    def _sync(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        key = (version_key(weight), version_key(bias))
        if key != self._source:
            self._source, self._packed, self._phase = key, {}, None

    def _winograd(self, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
        """The cached Winograd weight of `weight` (the conv's, already _sync'ed), or, transposed,
        that of its flipped, transposed kernel (for the input's gradient); in column panels where
        the kernel's AVX-512 GEMM takes them."""
        key = "winograd_t" if transposed else "winograd"
        transformed = self._packed.get(key)
        if transformed is None:
            if len(self._packed) >= MAX_SHAPES:
                self._packed.clear()
            source = weight.detach()
            transformed = winograd_weight(source.flip(2, 3).transpose(0, 1) if transposed else source)
            if transformed.shape[2] % 16 == 0 and _kernel_isa() == "avx512":
                transformed = winograd_panels(transformed)
            self._packed[key] = transformed
        return transformed

    def _run(self, kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             padding, stride, dilation, groups: int, add: torch.Tensor | None) -> torch.Tensor:
        if not _packable(x, weight) or (add is not None and not (is_channels_last(add) and add.dtype == x.dtype)):
            out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
            return out if add is None else out.add_(add)
        if kind == "conv" and _winograd_ok(x, weight, padding, stride, dilation, groups):
            return torch.ops.ddpm_fast.winograd_conv3x3(x, self._winograd(weight, transposed=False), bias, add)
        key = (kind, tuple(x.shape))
        packed = self._packed.get(key)
        if packed is None:
            if len(self._packed) >= MAX_SHAPES:
                self._packed.clear()
            packed = self._packed[key] = torch.ops.mkldnn._reorder_convolution_weight(
                weight, list(padding), list(stride), list(dilation), groups, list(x.shape))
        geometry = (list(padding), list(stride), list(dilation), groups)
        if add is None:
            return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *geometry, "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(x, add, packed, bias, *geometry, "add", None,
                                                              None, [], None)

    def conv(self, conv: nn.Conv2d, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """conv(x) [+ add] (add shaped like the output)."""
        records = _records_grad(conv.weight, conv.bias, x, add)
        if records and _winograd_autograd_ok(x, conv, add):
            self._sync(conv.weight, conv.bias)
            return WinogradConv.apply(x, conv.weight, conv.bias, add, self)
        if records or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            out = conv(x)
            return out if add is None else add + out
        self._sync(conv.weight, conv.bias)
        return self._run("conv", x, conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                         conv.padding, conv.stride, conv.dilation, conv.groups, add)

    def up2(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """conv(nearest_upsample_x2(x)) for a 3x3, stride 1, padding 1 conv."""
        simple = (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
                  and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")
        if not simple or _records_grad(conv.weight, conv.bias, x):
            return conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        self._sync(conv.weight, conv.bias)
        if self._phase is None:
            with torch.no_grad():
                self._phase = upsample_phase_weights(conv.weight.detach(),
                                                     None if conv.bias is None else conv.bias.detach())
        weight, bias = self._phase
        y = self._run("up2", x, weight, bias, (1, 1), (1, 1), (1, 1), 1, None)
        return interleave_phases(y, x.shape[2], x.shape[3])


class FastLinear:
    """x2d @ weight.T + bias [+ add] with the weight prepacked for oneDNN (see the module docstring)."""

    def __init__(self):
        self._source = None
        self._packed = None

    def __deepcopy__(self, memo) -> "FastLinear":
        return FastLinear()

    def derived(self) -> tuple[torch.Tensor, ...]:
        """The packed weight held now (see FastConv.derived)."""
        return () if self._packed is None else (self._packed,)

    def __getstate__(self) -> dict:
        return {"_source": None, "_packed": None}

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               add: torch.Tensor | None = None) -> torch.Tensor:
        """x (M, K), weight (N, K) (a Conv1d's (N, K, 1) is taken as (N, K)), bias (N,), add (M, N)."""
        if weight.dim() == 3:
            weight = weight[:, :, 0]
        usable = (x.dim() == 2 and _onednn_ok(x, weight) and not _records_grad(weight, bias, x, add)
                  and (bias is None or bias.dtype == x.dtype)
                  and (add is None or (add.dtype == x.dtype and add.is_contiguous())))
        if not usable:
            out = F.linear(x, weight, bias)
            return out if add is None else out.add_(add)
        key = version_key(weight)
        if key != self._source:
            self._source = key
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        bias = None if bias is None else bias.detach()
        if add is None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, add, self._packed, bias, "add")


if _registry.extension()[0] is not None:
    @torch.library.register_fake("ddpm_fast::winograd_conv3x3")
    def _fake_winograd_conv3x3(x, weight, bias, add):
        out_channels = weight.shape[1] * 16 if weight.dim() == 4 else weight.shape[2]
        return x.new_empty((x.shape[0], out_channels, x.shape[2], x.shape[3])).contiguous(
            memory_format=torch.channels_last)
