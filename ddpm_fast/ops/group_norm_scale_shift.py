"""ops.group_norm_scale_shift: ADM's AdaGN (GroupNorm + scale-shift + SiLU) on every backend."""
from __future__ import annotations

import torch

from .. import reference
from .._registry import extension, resolve, triton_module
from ..validate import records_grad
from ._checks import check_same_device, check_shape, check_tensor

OP = "group_norm_scale_shift"


def group_norm_scale_shift(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                           bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                           shift: torch.Tensor | None = None, eps: float = 1e-5, silu: bool = False,
                           backend: str = "auto") -> torch.Tensor:
    """GroupNorm(x) [* weight + bias] [* (1 + scale) + shift] [then SiLU], fused.

    Args:
        x: (N, C, *spatial) float32/float16/bfloat16, NCHW or channels_last.
        num_groups: groups of GroupNorm; must divide C.
        weight, bias: (C,) GroupNorm affine, optional.
        scale, shift: (N, C) per-sample AdaGN modulation, optional.
        eps: > 0, added to the group variance.
        silu: apply SiLU after the affine.
        backend: "auto", "torch", "cpu", "cuda" or "triton" (see ddpm_fast.backends()). When
            autograd records (grad mode on and any tensor argument requires grad) the chosen
            kernel runs its forward with statistics (ddpm_fast::group_norm_scale_shift_stats[_triton],
            which also returns the group mean and rstd (N, num_groups) fp32) and gradients for x,
            weight, bias, scale and shift flow through the fused backward
            (ddpm_fast::group_norm_scale_shift_backward[_triton]; registered in C++ for the C++ ops,
            csrc/autograd.cpp, and by `register_autograd` below for the Triton ones);
            "torch" is the reference, differentiated by PyTorch. First-order only: the backward
            itself is not differentiable (no double backward).
    Returns:
        Tensor like x (same shape, dtype and memory format). Statistics and arithmetic in fp32.
        Empty x (N or a spatial size 0) gives an empty result on every backend. Groups whose
        variance overflows float32 (|x| beyond ~1e19) give NaN in the reference (F.group_norm)
        but not in the kernels, which normalise such groups to finite values: scale inputs that
        large down first.
    """
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C, *spatial); got {tuple(x.shape)}")
    n, c = x.shape[:2]
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int; got {num_groups!r}")
    if c % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the channel count C={c} of x")
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps}")
    for name, t, shape in (("weight", weight, (c,)), ("bias", bias, (c,)),
                           ("scale", scale, (n, c)), ("shift", shift, (n, c))):
        if t is not None:
            check_tensor(name, t)
            check_shape(name, t, shape)
    check_same_device("x", x, weight=weight, bias=bias, scale=scale, shift=shift)

    chosen = resolve(OP, backend, x.device)
    if chosen == "torch":
        return reference.group_norm_scale_shift(x, num_groups, weight, bias, scale, shift, eps, silu)
    args = (x, num_groups, weight, bias, scale, shift, float(eps), bool(silu))
    grad = records_grad(x, weight, bias, scale, shift)
    if chosen == "triton":
        kernel = triton_module(OP)
        return kernel.group_norm_scale_shift_stats(*args)[0] if grad else kernel.group_norm_scale_shift(*args)
    if grad:
        return torch.ops.ddpm_fast.group_norm_scale_shift_stats(*args)[0]
    return torch.ops.ddpm_fast.group_norm_scale_shift(*args)


# ---- autograd ----------------------------------------------------------------------------------------
# Saved for the backward: x, weight, bias, scale, shift and the group statistics mean, rstd (N, G)
# fp32 of the forward with statistics. The backward op (one per backend family) returns
# (dx, dweight, dbias, dscale, dshift) with an empty tensor where output_mask (from
# ctx.needs_input_grad) is false or the parameter is None; those become None here.

def _output_mask(ctx) -> list[bool]:
    needs = ctx.needs_input_grad  # (x, num_groups, weight, bias, scale, shift, eps, silu)
    return [bool(needs[0]), bool(needs[2]), bool(needs[3]), bool(needs[4]), bool(needs[5])]


def _grads(ctx, backward_op, grad_y, mean, rstd):
    """The op's input gradients (x, num_groups, weight, bias, scale, shift, eps, silu)."""
    x, weight, bias, scale, shift = ctx.saved_tensors[:5]
    mask = _output_mask(ctx)
    grads = backward_op(grad_y, x, ctx.num_groups, weight, bias, scale, shift, mean, rstd,
                        ctx.silu, mask)
    dx, dw, db, ds, dt = (g if want and param is not None else None
                          for g, want, param in zip(grads, mask, (x, weight, bias, scale, shift)))
    return dx, None, dw, db, ds, dt, None, None


def _setup_context_stats(ctx, inputs, output):
    x, num_groups, weight, bias, scale, shift, _eps, silu = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups, ctx.silu = num_groups, silu


def _setup_context_plain(ctx, inputs, output):
    x, num_groups, weight, bias, scale, shift, eps, silu = inputs
    ctx.save_for_backward(x, weight, bias, scale, shift)
    ctx.num_groups, ctx.silu, ctx.eps = num_groups, silu, eps


def register_autograd(forward_op: str, stats_op, backward_op) -> None:
    """Registers the fused backward for the Triton ops (the C++ ops' is csrc/autograd.cpp).

    forward_op: qualified name of the plain forward ("ddpm_fast::group_norm_scale_shift_triton");
    its stats variant (`stats_op`, the same name with _stats) saves mean/rstd and is what the public
    wrapper calls under autograd; a direct call of the plain op under autograd recomputes the
    statistics in its backward with `stats_op` (one more forward pass). backward_op: the callable
    (grad_y, x, num_groups, weight, bias, scale, shift, mean, rstd, silu, output_mask) -> 5 grads.
    """
    def backward_stats(ctx, grad_y, _grad_mean, _grad_rstd):
        mean, rstd = ctx.saved_tensors[5:]
        return _grads(ctx, backward_op, grad_y, mean, rstd)

    def backward_plain(ctx, grad_y):
        x, weight, bias, scale, shift = ctx.saved_tensors
        with torch.no_grad():
            _, mean, rstd = stats_op(x, ctx.num_groups, weight, bias, scale, shift, ctx.eps, ctx.silu)
        return _grads(ctx, backward_op, grad_y, mean, rstd)

    name = forward_op.removesuffix("_triton")
    suffix = forward_op[len(name):]
    torch.library.register_autograd(f"{name}_stats{suffix}", backward_stats, setup_context=_setup_context_stats)
    torch.library.register_autograd(forward_op, backward_plain, setup_context=_setup_context_plain)


def grad_like(x: torch.Tensor, weight, bias, scale, shift, output_mask):
    """Empty tensors shaped as the backward op returns its 5 gradients (its fake implementation):
    dx like x, dweight/dbias (C,) and dscale/dshift (N, C) in their parameter's dtype; an empty
    (0,) tensor of x's dtype where the mask is false or the parameter is None."""
    n, c = x.shape[:2]
    out = [torch.empty_like(x) if output_mask[0] else x.new_empty(0)]
    for want, param, shape in zip(output_mask[1:], (weight, bias, scale, shift), ((c,), (c,), (n, c), (n, c))):
        out.append(x.new_empty(shape, dtype=param.dtype) if want and param is not None else x.new_empty(0))
    return tuple(out)


def stats_like(x: torch.Tensor, num_groups: int):
    """Empty (y, mean, rstd) as the forward with statistics returns them (its fake implementation)."""
    stat = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), stat, torch.empty_like(stat)


if extension()[0] is not None:
    @torch.library.register_fake("ddpm_fast::group_norm_scale_shift")
    def _fake(x, num_groups, weight, bias, scale, shift, eps, silu):
        return torch.empty_like(x)

    @torch.library.register_fake("ddpm_fast::group_norm_scale_shift_stats")
    def _fake_stats(x, num_groups, weight, bias, scale, shift, eps, silu):
        return stats_like(x, num_groups)

    @torch.library.register_fake("ddpm_fast::group_norm_scale_shift_backward")
    def _fake_backward(grad_y, x, num_groups, weight, bias, scale, shift, mean, rstd, silu, output_mask):
        return grad_like(x, weight, bias, scale, shift, output_mask)

    # The C++ ops' autograd is registered in C++ (csrc/autograd.cpp): no Python on their path.
