"""ops.diffusion_step: the fused reverse diffusion step (DDPM / DDIM) on every backend, with the
noise given or drawn inside the kernel from the counter-based generator of ddpm_fast.philox."""
from __future__ import annotations

import math
import numbers

import torch

from .. import philox, reference
from .._registry import extension, resolve, triton_module
from ..step_layout import (DDIM_SIGMA, LEARNED_VARIANCES, METHODS, NOISE_MODES, NONZERO, NUM_COEFS,
                           PREDICTIONS, PROJECTIONS, SQRT_RECIPM1_AB, VARIANCES, code)
from ..validate import records_grad
from ._checks import check_same_device, check_shape, check_tensor

OP = "diffusion_step"


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")


def _check_pair(name: str, value, what: str) -> tuple[float, float]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{name} must be None or a pair {what} of numbers; got {value!r}")
    return float(value[0]), float(value[1])


def _step_tensor(step, device: torch.device) -> torch.Tensor:
    """step (int or 0-dim int64 tensor on x's device) -> 0-dim int64 tensor on `device`."""
    if isinstance(step, torch.Tensor):
        if step.dtype != torch.int64 or step.dim() != 0:
            raise ValueError(f"step must be an int or a 0-dim int64 tensor; got a {step.dtype} tensor "
                             f"of shape {tuple(step.shape)}")
        if step.device != device:
            raise ValueError(f"step is on {step.device} but x is on {device}; all tensors must be on "
                             "the same device")
        return step
    if isinstance(step, numbers.Integral) and not isinstance(step, bool):
        if not -(1 << 63) <= int(step) < (1 << 63):
            raise ValueError(f"step must fit in int64; got {step}")
        # a fill on the device, not a host-to-device copy of a host scalar: capturable by a CUDA graph
        return torch.full((), int(step), dtype=torch.int64, device=device)
    raise ValueError(f"step must be an int or a 0-dim int64 tensor; got {type(step).__name__}")


def diffusion_step(x: torch.Tensor, model_output: torch.Tensor, coef: torch.Tensor,
                   noise: torch.Tensor | None = None, *, seed: torch.Tensor | None = None, step=None,
                   method: str = "ddpm", prediction: str = "epsilon", variance: str = "fixed_small",
                   clip_denoised: bool = True, noise_mode: str = "normal",
                   project_noise: str | None = None, clip: tuple[float, float] | None = None,
                   guidance_grad: torch.Tensor | None = None, eps_from_x0: bool = True,
                   dynamic_threshold: tuple[float, float] | None = None, return_x0: bool = True,
                   backend: str = "auto"):
    """One fused reverse diffusion step: (x_prev, pred_x0 or None), both shaped and typed like x.

    The definition is ddpm_fast.reference.diffusion_step (read its docstring for the options);
    every backend computes in float32 and makes one pass over its inputs.

    Args:
        x: x_t, (B, C, *spatial) float32 / float16 / bfloat16.
        model_output: (B, C, *spatial) or (B, 2C, *spatial) (the variance channels last; 2C is
            required when `variance` is learned_range or learned). Any float dtype.
        coef: (B, NUM_COEFS) per-sample coefficient rows (ddpm_fast.step_layout), float.
        noise: (B, C, *spatial) standard normal draw to use, or None.
        seed: (B,) int64 on x's device: draw the noise in-kernel from ddpm_fast.philox with key
            seed[b] and step id `step` (element (b, i) is the same draw whatever the batch or
            backend). Give either noise or seed (with step), or neither (no noise).
        step: the step id of the draw: an int, or a 0-dim int64 tensor on x's device (a CUDA
            graph can replay with a changing step tensor). philox.INITIAL_NOISE_STEP is x_T's.
        method, prediction, variance, clip_denoised, noise_mode, project_noise, clip,
        guidance_grad, eps_from_x0, dynamic_threshold: as in reference.diffusion_step.
            dynamic_threshold (a per-sample quantile of |x0|) runs the two-pass reference path
            on every backend (torch.quantile, then the step in eager PyTorch), with the same
            noise.
        return_x0: also return pred_x0 (otherwise None, and the kernels do not write it).
        backend: "auto", "torch", "cpu", "cuda" or "triton" (see ddpm_fast.backends()).

    Autograd: every kernel backend has a fused backward (ddpm_fast::diffusion_step_backward, its
    Triton twin), registered with torch.library.register_autograd: gradients flow to x,
    model_output (all its channels: the learned variance channels too) and guidance_grad from
    either output (x_prev, pred_x0), with the reference's conventions (torch.clamp's subgradient
    at the clips, the projection's normalisation differentiated, the noise -- given or drawn from
    seed/step, redrawn by the backward -- a constant). coef and a given noise are not
    differentiated by the kernels: when autograd records and coef or noise requires grad, the
    differentiable reference step runs instead (with the same noise), so no gradient is dropped;
    so does dynamic_threshold, and backend="torch" is the reference's own autograd.
    """
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, C, *spatial); got {tuple(x.shape)}")
    b, c = x.shape[:2]
    check_tensor("model_output", model_output)
    if (model_output.dim() != x.dim() or model_output.shape[0] != b
            or model_output.shape[2:] != x.shape[2:]):
        raise ValueError(f"model_output must have shape (B, C or 2C, *spatial) = ({b}, {c} or {2 * c}, "
                         f"{', '.join(map(str, x.shape[2:]))}) to match x; got {tuple(model_output.shape)}")
    variance_code = code("variance", variance, VARIANCES)
    mo_c = model_output.shape[1]
    if variance in LEARNED_VARIANCES and mo_c != 2 * c:
        raise ValueError(f"model_output must have 2C = {2 * c} channels (eps and the variance "
                         f"channels) for variance={variance!r}; got {mo_c}")
    if mo_c not in (c, 2 * c):
        raise ValueError(f"model_output must have C = {c} or 2C = {2 * c} channels; got {mo_c}")
    check_tensor("coef", coef, dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16))
    check_shape("coef", coef, (b, NUM_COEFS), "per-sample coefficient rows of ddpm_fast.step_layout")
    if noise is not None:
        check_tensor("noise", noise)
        check_shape("noise", noise, tuple(x.shape), "like x")
    if guidance_grad is not None:
        check_tensor("guidance_grad", guidance_grad)
        check_shape("guidance_grad", guidance_grad, tuple(x.shape), "like x")
    check_same_device("x", x, model_output=model_output, coef=coef, noise=noise,
                      guidance_grad=guidance_grad)
    if noise is not None and seed is not None:
        raise ValueError("give either noise or seed (with step), not both")
    if seed is not None:
        if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or tuple(seed.shape) != (b,):
            got = (f"{seed.dtype} tensor of shape {tuple(seed.shape)}" if isinstance(seed, torch.Tensor)
                   else type(seed).__name__)
            raise ValueError(f"seed must be an int64 tensor of shape ({b},); got {got}")
        check_same_device("x", x, seed=seed)
        if step is None:
            raise ValueError("step is required with seed (the step id of the noise draw)")
        step = _step_tensor(step, x.device)
    elif step is not None:
        raise ValueError("step is only meaningful with seed; give seed too (or neither)")
    if math.prod(x.shape[1:]) > philox.MAX_SAMPLE_NUMEL:
        raise ValueError(f"x has {math.prod(x.shape[1:])} elements per sample; at most "
                         f"{philox.MAX_SAMPLE_NUMEL}")
    method_code = code("method", method, METHODS)
    prediction_code = code("prediction", prediction, PREDICTIONS)
    noise_code = code("noise_mode", noise_mode, NOISE_MODES)
    projection_code = code("project_noise", project_noise, PROJECTIONS)
    for name, value in (("clip_denoised", clip_denoised), ("eps_from_x0", eps_from_x0),
                        ("return_x0", return_x0)):
        _check_bool(name, value)
    clip_lo = clip_hi = None
    if clip is not None:
        clip_lo, clip_hi = _check_pair("clip", clip, "(lo, hi)")
        if not clip_lo <= clip_hi:
            raise ValueError(f"clip must be (lo, hi) with lo <= hi; got {clip!r}")
    if dynamic_threshold is not None:
        ratio, max_value = _check_pair("dynamic_threshold", dynamic_threshold, "(ratio, max)")
        if not (0.0 < ratio <= 1.0 and max_value >= 1.0):
            raise ValueError("dynamic_threshold must be (ratio, max) with 0 < ratio <= 1 and max >= 1; "
                             f"got {dynamic_threshold!r}")

    chosen = resolve(OP, backend, x.device)
    if chosen == "torch" or dynamic_threshold is not None or records_grad(coef, noise):
        if seed is not None:
            noise = philox.philox_normal(seed, step, x.shape[1:])
        x_prev, x0 = reference.diffusion_step(
            x, model_output, coef, noise, method=method, prediction=prediction, variance=variance,
            clip_denoised=clip_denoised, noise_mode=noise_mode, project_noise=project_noise,
            clip=clip, guidance_grad=guidance_grad, eps_from_x0=eps_from_x0,
            dynamic_threshold=dynamic_threshold)
        return x_prev, (x0 if return_x0 else None)
    args = (x, model_output, coef, noise, seed, step, guidance_grad, method_code, prediction_code,
            variance_code, clip_denoised, noise_code, projection_code, clip_lo, clip_hi, eps_from_x0,
            return_x0)
    if chosen == "triton":
        x_prev, x0 = triton_module(OP).diffusion_step(*args)
    else:
        x_prev, x0 = torch.ops.ddpm_fast.diffusion_step(*args)
    return x_prev, (x0 if return_x0 else None)


def draw_noise(seed: torch.Tensor, step, sample_shape, *, backend: str = "auto") -> torch.Tensor:
    """philox.philox_normal(seed, step, sample_shape) drawn by a fused step kernel: (B, *sample_shape)
    float32 on seed's device. The step runs with coefficients that make x_prev = 0 + 1 * noise."""
    sample_shape = tuple(int(d) for d in sample_shape)
    if not sample_shape or resolve(OP, backend, seed.device) == "torch":
        return philox.philox_normal(seed, step, sample_shape)
    b = seed.shape[0]
    zeros = torch.zeros((b, *sample_shape), dtype=torch.float32, device=seed.device)
    coef = torch.zeros((b, NUM_COEFS), dtype=torch.float32, device=seed.device)
    # in-place fills of column views, not `coef[:, i] = 1.0` (that makes a tensor from a host
    # scalar: a host-to-device copy a CUDA graph capture of the loop's x_T draw rejects)
    coef[:, SQRT_RECIPM1_AB].fill_(1.0)   # eps = (0 * x - x0) / 1 = 0
    coef[:, DDIM_SIGMA].fill_(1.0)
    coef[:, NONZERO].fill_(1.0)
    x_prev, _ = diffusion_step(zeros, zeros, coef, seed=seed, step=step, method="ddim",
                               prediction="x0", clip_denoised=False, return_x0=False,
                               backend=backend)
    return x_prev


# ---- autograd of the fused ops: ddpm_fast::diffusion_step (C++) and diffusion_step_triton ---------
def _setup_context(ctx, inputs, output):
    """Saves the forward's inputs (the backward recomputes the step; nothing else is kept)."""
    x, model_output, coef, noise, seed, step, guidance_grad, *options = inputs
    ctx.save_for_backward(x, model_output, coef, noise, seed, step, guidance_grad)
    ctx.options = tuple(options[:-1])  # method .. eps_from_x0 (return_x0 concerns the forward only)
    ctx.set_materialize_grads(False)   # an output without a gradient is None, not a tensor of zeros


def _make_backward(backward_op):
    """The autograd backward of a forward op whose kernel backward is `backward_op`
    (diffusion_step_backward's contract, csrc/ops.cpp)."""
    def backward(ctx, grad_x_prev, grad_x0):
        needs = ctx.needs_input_grad
        if needs[2] or needs[3]:
            raise RuntimeError("ddpm_fast::diffusion_step's fused backward treats coef and noise as constants "
                               "but one of them requires grad; call ddpm_fast.ops.diffusion_step (which runs "
                               "the differentiable reference then) or backend='torch'")
        x = ctx.saved_tensors[0]
        if grad_x0 is not None and grad_x0.shape != x.shape:  # return_x0=False: the empty placeholder
            grad_x0 = None
        grads = [None] * (7 + len(ctx.options) + 1)
        if grad_x_prev is None and grad_x0 is None:
            return tuple(grads)
        grad_x, grad_mo, grad_guide = backward_op(grad_x_prev, grad_x0, *ctx.saved_tensors, *ctx.options)
        grads[0] = grad_x if needs[0] else None
        grads[1] = grad_mo if needs[1] else None
        grads[6] = grad_guide if needs[6] else None
        return tuple(grads)
    return backward


def register_autograd(forward_op: str, backward_op) -> None:
    """Registers the fused backward `backward_op` as the autograd of `forward_op` (a name)."""
    torch.library.register_autograd(forward_op, _make_backward(backward_op), setup_context=_setup_context)


def fake_backward(grad_x_prev, grad_x0, x, model_output, coef, noise, seed, step, guidance_grad, method,
                  prediction, variance, clip_denoised, noise_mode, project_noise, clip_lo, clip_hi, eps_from_x0):
    """The fake (meta) implementation of diffusion_step_backward on every backend."""
    guide = (torch.empty_like(guidance_grad, memory_format=torch.contiguous_format)
             if guidance_grad is not None else x.new_empty((0,)))
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(model_output, memory_format=torch.contiguous_format), guide)


if extension()[0] is not None:
    register_autograd("ddpm_fast::diffusion_step", torch.ops.ddpm_fast.diffusion_step_backward)
    torch.library.register_fake("ddpm_fast::diffusion_step_backward")(fake_backward)

    @torch.library.register_fake("ddpm_fast::diffusion_step")
    def _fake(x, model_output, coef, noise, seed, step, guidance_grad, method, prediction, variance,
              clip_denoised, noise_mode, project_noise, clip_lo, clip_hi, eps_from_x0, return_x0):
        x0 = torch.empty_like(x, memory_format=torch.contiguous_format) if return_x0 else x.new_empty((0,))
        return torch.empty_like(x, memory_format=torch.contiguous_format), x0
