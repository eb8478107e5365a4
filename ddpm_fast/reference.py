"""Pure-PyTorch definitions of every fused op: the oracle of the tests and the baseline of the
benchmarks. Each function computes in float32 whatever the input dtype and returns the input's
dtype, as guided-diffusion's GroupNorm32 and softmax-in-fp32 do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .step_layout import (DDIM_DIR, DDIM_SIGMA, LOG_VAR_MAX, LOG_VAR_MIN, NOISE_MODES, NONZERO,
                          POST_COEF1, POST_COEF2, SQRT_1M_AB, SQRT_AB, SQRT_AB_PREV,
                          SQRT_RECIP_AB, SQRT_RECIPM1_AB, VARIANCE, VARIANCES)


def _per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(N, C) -> (N, C, 1, ..., 1) broadcasting over `ndim - 2` spatial dims."""
    return t.float().reshape(*t.shape, *([1] * (ndim - 2)))


def group_norm_scale_shift(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                           bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                           shift: torch.Tensor | None = None, eps: float = 1e-5,
                           silu: bool = False) -> torch.Tensor:
    """ADM's AdaGN: GroupNorm(x) * (1 + scale) + shift, then SiLU.

    x (N, C, *spatial); weight, bias (C,) (the GroupNorm affine); scale, shift (N, C).
    Returns a tensor shaped and typed like x (empty x: an empty result, as the kernels give;
    F.group_norm refuses a spatial size of 0).
    """
    if x.numel() == 0:
        return torch.empty_like(x)
    h = F.group_norm(x.float(), num_groups,
                     None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if scale is not None:
        h = h * (1 + _per_channel(scale, x.dim()))
    if shift is not None:
        h = h + _per_channel(shift, x.dim())
    if silu:
        h = F.silu(h)
    return h.to(x.dtype)


def split_qkv(qkv: torch.Tensor, num_heads: int, layout: str):
    """Views q, k, v of shape (B * heads, ch, T) of ADM's qkv tensor (B, 3 * heads * ch, T).

    layout "legacy": per head a [q, k, v] block (QKVAttentionLegacy);
    layout "new": [q for all heads | k | v] (QKVAttention).
    """
    b, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if layout == "legacy":
        q, k, v = qkv.reshape(b * num_heads, 3 * ch, length).split(ch, dim=1)
    elif layout == "new":
        q, k, v = (t.reshape(b * num_heads, ch, length) for t in qkv.chunk(3, dim=1))
    else:
        raise ValueError(f"layout must be 'legacy' or 'new', got {layout!r}")
    return q, k, v


def attention(qkv: torch.Tensor, num_heads: int, layout: str = "legacy") -> torch.Tensor:
    """ADM self-attention: qkv (B, 3*C, T) -> (B, C, T), softmax(q^T k / sqrt(ch)) over keys, in fp32."""
    b, width, length = qkv.shape
    q, k, v = (t.float() for t in split_qkv(qkv, num_heads, layout))
    ch = q.shape[1]
    weight = torch.einsum("bct,bcs->bts", q, k) * (1.0 / math.sqrt(ch))
    weight = torch.softmax(weight, dim=-1)
    out = torch.einsum("bts,bcs->bct", weight, v)
    return out.reshape(b, width // 3, length).to(qkv.dtype)


def _col(coef: torch.Tensor, column: int, ndim: int) -> torch.Tensor:
    """Column `column` of coef (B, NUM_COEFS) as a float32 (B, 1, ..., 1) broadcasting over x."""
    return coef[:, column].float().reshape(-1, *([1] * (ndim - 1)))


def predicted_x0(x: torch.Tensor, pred: torch.Tensor, coef: torch.Tensor, prediction: str) -> torch.Tensor:
    """x0 from the model's prediction `pred` (eps, x0 or v: its first C channels) at x_t = x, both
    (B, C, ...) float32, with the coefficient rows coef (B, NUM_COEFS): before any clipping.
    Differentiable (restoration's reconstruction guidance takes its gradient)."""
    nd = x.dim()
    if prediction == "epsilon":
        return _col(coef, SQRT_RECIP_AB, nd) * x - _col(coef, SQRT_RECIPM1_AB, nd) * pred
    if prediction == "x0":
        return pred
    if prediction == "v":
        return _col(coef, SQRT_AB, nd) * x - _col(coef, SQRT_1M_AB, nd) * pred
    raise ValueError(f"prediction must be 'epsilon', 'x0' or 'v'; got {prediction!r}")


def _project(x_new: torch.Tensor, x_det: torch.Tensor, x0: torch.Tensor, mode: str) -> torch.Tensor:
    """The seed's noise projection: keep the direction of x_new - x0 but the radius ||x_det - x0||.

    mode "pixel": norms over channels at each pixel; "sample": over (C, *spatial) of each image.
    Where ||x_new - x0|| is 0 the direction is 0 (the result is x0)."""
    dims = (1,) if mode == "pixel" else tuple(range(1, x_new.dim()))
    radius = torch.linalg.vector_norm(x_det - x0, dim=dims, keepdim=True)
    offset = x_new - x0
    length = torch.linalg.vector_norm(offset, dim=dims, keepdim=True)
    direction = torch.where(length > 0, offset / torch.where(length > 0, length, 1.0), 0.0)
    return x0 + radius * direction


def diffusion_step(x: torch.Tensor, model_output: torch.Tensor, coef: torch.Tensor,
                   noise: torch.Tensor | None = None, *, method: str = "ddpm",
                   prediction: str = "epsilon", variance: str = "fixed_small",
                   clip_denoised: bool = True, noise_mode: str = "normal",
                   project_noise: str | None = None, clip: tuple[float, float] | None = None,
                   guidance_grad: torch.Tensor | None = None, eps_from_x0: bool = True,
                   dynamic_threshold: tuple[float, float] | None = None):
    """One reverse diffusion step for a batch, in float32: returns (x_prev, pred_x0) in x's dtype.

    Args:
        x: x_t, (B, C, *spatial).
        model_output: (B, C, ...) eps / x0 / v (per `prediction`), or (B, 2C, ...) with the
            variance channels v last when `variance` is learned_range (v in [-1, 1]) or learned
            (v = log variance). For DDIM the variance channels are ignored.
        coef: (B, NUM_COEFS) per-sample coefficients (ddpm_fast.step_layout).
        noise: (B, C, *spatial) standard normal draw; None means zeros.
        method: "ddpm" (posterior mean + model variance) or "ddim" (eta is inside coef's DDIM_SIGMA).
        prediction: "epsilon", "x0" or "v".
        variance: "fixed_small", "fixed_large", "learned_range" or "learned" (DDPM).
        clip_denoised: clamp the predicted x0 to [-1, 1].
        noise_mode: the seed's noise stddev: "normal" adds std * z, "squared" std^2 * z, "zero"
            nothing (std still enters DDIM's direction coefficient through coef).
        project_noise: None, "pixel" or "sample": the seed's noise projection onto the sphere of
            radius ||x_det - x0|| around x0.
        clip: (lo, hi) clamps the new sample x_prev; None = off.
        guidance_grad: classifier guidance gradient d log p(y|x_t) / d x_t (B, C, ...): DDPM adds
            variance * grad to the mean; DDIM subtracts sqrt(1 - ab) * grad from eps and
            recomputes x0 from it (unclipped), as guided-diffusion does.
        eps_from_x0: DDIM's eps is re-derived from the processed x0 (guided-diffusion, diffusers'
            use_clipped_model_output=True); False uses the model's own eps (diffusers' default).
        dynamic_threshold: (ratio, max): diffusers' dynamic thresholding of x0 by the per-sample
            `ratio` quantile of |x0|, clamped to [1, max]; replaces clip_denoised when given.
    """
    nd = x.dim()
    c = x.shape[1]
    xf = x.float()
    out = model_output.float()
    if variance in ("learned_range", "learned"):
        pred, var_out = out[:, :c], out[:, c:2 * c]
    else:
        pred, var_out = out[:, :c], None

    def col(i):
        return _col(coef, i, nd)

    x0_raw = predicted_x0(xf, pred, coef, prediction)

    if dynamic_threshold is not None:
        ratio, max_value = dynamic_threshold
        s = torch.quantile(x0_raw.abs().reshape(x0_raw.shape[0], -1), ratio, dim=1)
        s = s.clamp(min=1.0, max=max_value).reshape(-1, *([1] * (nd - 1)))
        x0 = x0_raw.clamp(-s, s) / s
    elif clip_denoised:
        x0 = x0_raw.clamp(-1.0, 1.0)
    else:
        x0 = x0_raw

    def eps_of(x0_value):
        return (col(SQRT_RECIP_AB) * xf - x0_value) / col(SQRT_RECIPM1_AB)

    if method == "ddpm":
        mean = col(POST_COEF1) * x0 + col(POST_COEF2) * xf
        if variance in ("fixed_small", "fixed_large"):
            log_var = col(LOG_VAR_MIN).expand_as(xf)
            var = col(VARIANCE).expand_as(xf)
        elif variance == "learned_range":
            frac = (var_out + 1) / 2
            log_var = frac * col(LOG_VAR_MAX) + (1 - frac) * col(LOG_VAR_MIN)
            var = torch.exp(log_var)
        elif variance == "learned":
            log_var = var_out
            var = torch.exp(log_var)
        else:
            raise ValueError(f"variance must be one of {VARIANCES}; got {variance!r}")
        if guidance_grad is not None:
            mean = mean + var * guidance_grad.float()
        x_det = mean
        std = torch.exp(0.5 * log_var)
    elif method == "ddim":
        if guidance_grad is not None:
            eps = eps_of(x0) - col(SQRT_1M_AB) * guidance_grad.float()
            x0 = col(SQRT_RECIP_AB) * xf - col(SQRT_RECIPM1_AB) * eps
        elif eps_from_x0:
            eps = eps_of(x0)
        elif prediction == "epsilon":
            eps = pred
        elif prediction == "v":
            eps = col(SQRT_AB) * pred + col(SQRT_1M_AB) * xf
        else:  # x0 prediction: eps of the unprocessed x0
            eps = eps_of(x0_raw)
        x_det = col(SQRT_AB_PREV) * x0 + col(DDIM_DIR) * eps
        std = col(DDIM_SIGMA)
    else:
        raise ValueError(f"method must be 'ddpm' or 'ddim'; got {method!r}")

    if noise_mode == "normal":
        scale = std
    elif noise_mode == "squared":
        scale = std * std
    elif noise_mode == "zero":
        scale = torch.zeros_like(std)
    else:
        raise ValueError(f"noise_mode must be one of {NOISE_MODES}; got {noise_mode!r}")
    scale = scale * col(NONZERO)
    x_new = x_det if noise is None else x_det + scale * noise.float()
    if project_noise is not None:
        x_new = _project(x_new, x_det, x0, project_noise)
    if clip is not None:
        x_new = x_new.clamp(clip[0], clip[1])
    return x_new.to(x.dtype), x0.to(x.dtype)
