"""The shared layout of one reverse diffusion step, used by the reference step
(ddpm_fast.reference.diffusion_step), the diffusion core that fills the coefficients
(ddpm_fast.diffusion) and every fused kernel (mirrored in csrc/include/diffusion_step_math.h and
kernels/diffusion_step.py: change them together).

A step takes a per-sample coefficient tensor `coef` of shape (B, NUM_COEFS), float32, whose columns
are gathered from the float64 schedule tables at each sample's step index (so one batch may mix
timesteps, and nothing is a Python float frozen into a CUDA graph). ab = alphas_cumprod[t] and
ab_prev = alphas_cumprod_prev[t] of the (respaced) process.
"""
from __future__ import annotations

# ---- coefficient columns ------------------------------------------------------------------------
SQRT_RECIP_AB = 0      # 1 / sqrt(ab)
SQRT_RECIPM1_AB = 1    # sqrt(1 / ab - 1)
SQRT_AB = 2            # sqrt(ab)
SQRT_1M_AB = 3         # sqrt(1 - ab)
POST_COEF1 = 4         # posterior mean coefficient of x0:  beta * sqrt(ab_prev) / (1 - ab)
POST_COEF2 = 5         # posterior mean coefficient of x_t: (1 - ab_prev) * sqrt(alpha) / (1 - ab)
LOG_VAR_MIN = 6        # DDPM log variance: fixed_small -> posterior log variance (clipped),
                       # fixed_large -> log([post_var[1], betas[1:]])[t], learned_range -> its min
LOG_VAR_MAX = 7        # learned_range: log(beta) (the max end of the interpolation); else unused
VARIANCE = 8           # DDPM fixed variances as guided-diffusion uses them for classifier guidance
                       # (fixed_small: posterior variance, unclipped; fixed_large: as LOG_VAR_MIN)
SQRT_AB_PREV = 9       # DDIM: sqrt(ab_prev)
DDIM_DIR = 10          # DDIM: sqrt(1 - ab_prev - sigma^2), the coefficient of eps
DDIM_SIGMA = 11        # DDIM: eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev)
NONZERO = 12           # 1.0 when the step adds noise (step index > 0), else 0.0
NUM_COEFS = 13

# ---- option codes (ints in the kernels, strings in Python) ----------------------------------------
METHODS = ("ddpm", "ddim")
PREDICTIONS = ("epsilon", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range", "learned")
NOISE_MODES = ("normal", "squared", "zero")
PROJECTIONS = (None, "pixel", "sample")
LEARNED_VARIANCES = ("learned_range", "learned")


def code(name: str, value, choices) -> int:
    """The integer code of option `name`=value among `choices`; ValueError naming the option."""
    try:
        return choices.index(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}") from None
