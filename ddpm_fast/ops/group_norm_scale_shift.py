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
        backend: "auto", "torch", "cpu", "cuda" or "triton" (see ddpm_fast.backends()). The
            kernels are forward-only: when autograd records (grad mode on and any tensor argument
            requires grad) the differentiable reference runs instead, whatever the backend.
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
    if chosen == "torch" or records_grad(x, weight, bias, scale, shift):
        return reference.group_norm_scale_shift(x, num_groups, weight, bias, scale, shift, eps, silu)
    if chosen == "triton":
        return triton_module(OP).group_norm_scale_shift(x, num_groups, weight, bias, scale, shift,
                                                        float(eps), bool(silu))
    return torch.ops.ddpm_fast.group_norm_scale_shift(x, num_groups, weight, bias, scale, shift,
                                                      float(eps), bool(silu))


if extension()[0] is not None:
    @torch.library.register_fake("ddpm_fast::group_norm_scale_shift")
    def _fake(x, num_groups, weight, bias, scale, shift, eps, silu):
        return torch.empty_like(x)
