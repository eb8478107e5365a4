"""The Gaussian diffusion process of guided-diffusion / improved-diffusion, in float64.

`Diffusion` holds the noise schedule and every table derived from it in float64 (the seed's
advice: float32 tables carry errors of order 1e-5), the respacing of guided-diffusion
(`respace("250")`, `"ddim25"`, `"10,15,20"`, an explicit list) and of diffusers
(`respace_diffusers(50, "trailing")`), spacings denser near x0 (`"quad50"`, `"pow2:50"`), the
truncated process (`truncate(0.8)`), the seed's step skipping (`skip(K)`, `skip("quadratic")`),
and the per-step coefficient columns of ddpm_fast.step_layout that every step implementation
(ddpm_fast.reference.diffusion_step, the fused kernels) consumes.

A respaced process is just another `Diffusion`: its step index s in [0, S) stands for the original
timestep `timestep_map[s]`; its betas are re-derived from the kept alphas_cumprod,
beta_s = 1 - alpha_bar[s] / alpha_bar[s - 1] (alpha_bar[-1] = 1), so step s goes from
`timestep_map[s]` to `timestep_map[s - 1]`, and step 0 to the clean image.

Besides the class this module holds the pieces a sampler reuses:
  - `validate_step_options`: the option checks shared by every sampler (ValueError naming the option);
  - `cfg_model_inputs`, `combine_cfg`, `guided_model_output`: classifier-free guidance with one
    batched model call;
  - `reference_sample_loop`: the plain Python loop, the baseline of the tests and benchmarks.
"""
from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from . import reference
from .step_layout import (DDIM_DIR, DDIM_SIGMA, LEARNED_VARIANCES, LOG_VAR_MAX, LOG_VAR_MIN, METHODS,
                          NOISE_MODES, NONZERO, NUM_COEFS, POST_COEF1, POST_COEF2, PREDICTIONS,
                          PROJECTIONS, SQRT_1M_AB, SQRT_AB, SQRT_AB_PREV, SQRT_RECIP_AB,
                          SQRT_RECIPM1_AB, VARIANCE, VARIANCES)

SCHEDULES = ("linear", "cosine", "sigmoid")
DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")
NOISE_MODE_ALIASES = {"correct": "normal"}   # the seed calls the standard noise 'normal' or 'correct'


# ---- schedules ------------------------------------------------------------------------------------

def named_beta_schedule(name: str, timesteps: int) -> np.ndarray:
    """Betas (timesteps,) float64 of a named schedule.

    - "linear": guided-diffusion's, scaled to the number of steps: scale = 1000 / T,
      linspace(scale * 1e-4, scale * 0.02, T).
    - "cosine": Nichol & Dhariwal's, alpha_bar(t) = cos((t + s) / (1 + s) * pi / 2)^2 with s = 0.008,
      beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) (diffusers' squaredcos_cap_v2).
    - "sigmoid": diffusers' (GeoDiff) sigmoid schedule with its default range, NOT rescaled with T:
      beta = sigmoid(linspace(-6, 6, T)) * (0.02 - 1e-4) + 1e-4, here in float64.
    """
    if not isinstance(timesteps, numbers.Integral) or isinstance(timesteps, bool) or timesteps < 1:
        raise ValueError(f"timesteps must be a positive int; got {timesteps!r}")
    timesteps = int(timesteps)
    if name == "linear":
        scale = 1000 / timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, timesteps, dtype=np.float64)
    if name == "cosine":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999)
                         for i in range(timesteps)], dtype=np.float64)
    if name == "sigmoid":
        z = np.linspace(-6.0, 6.0, timesteps, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-z)) * (0.02 - 0.0001) + 0.0001
    raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))} or an array of betas; "
                     f"got {name!r}")


# ---- respacing and step skipping (sets of kept step indices) --------------------------------------

def space_timesteps(num_timesteps: int, spec) -> list[int]:
    """The step indices kept by guided-diffusion's respacing `spec`, ascending.

    spec: an int or "N" (N evenly strided steps), "a,b,c" (the process cut into len(...) equal
    sections, each evenly strided with its count; the first T % len sections are one step longer),
    "ddimN" (the smallest integer stride giving exactly N steps: range(0, T, stride)).
    Fractional strides round like guided-diffusion (Python's round, half to even).
    Raises ValueError naming `spec` when it cannot be met.
    """
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        counts = [int(spec)]
    elif isinstance(spec, str):
        text = spec.strip()
        if text.startswith("ddim"):
            try:
                want = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"spec {spec!r}: expected 'ddimN' with an integer N") from None
            for stride in range(1, max(num_timesteps, 2)):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"spec {spec!r}: no integer stride gives exactly {want} of "
                             f"{num_timesteps} steps")
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"spec {spec!r}: expected an int, 'N', 'a,b,c', 'ddimN', "
                             "'leadingN'/'trailingN'/'linspaceN', 'quadN', 'powP:N' or a list of timesteps") from None
    else:
        raise TypeError(f"spec must be an int, a str or a sequence of ints; got {type(spec).__name__}")
    if any(c < 0 for c in counts) or sum(counts) < 1:
        raise ValueError(f"spec {spec!r}: section counts must be >= 0 and keep at least one step")
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"spec {spec!r}: cannot take {count} steps from a section of {size} "
                             f"(of {num_timesteps} steps)")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.add(start + round(position))
            position += stride
        start += size
    return sorted(kept)


def diffusers_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading",
                        steps_offset: int = 0) -> list[int]:
    """diffusers' DDPMScheduler/DDIMScheduler.set_timesteps timesteps, DESCENDING (as diffusers lists them).

    spacing "linspace": round(linspace(0, T - 1, n)); "leading": arange(n) * (T // n) + steps_offset;
    "trailing": round(arange(T, 0, -T / n)) - 1 (numpy float arithmetic, as diffusers).
    """
    if spacing not in DIFFUSERS_SPACINGS:
        raise ValueError(f"spacing must be one of {', '.join(map(repr, DIFFUSERS_SPACINGS))}; got {spacing!r}")
    n, total = num_inference_steps, num_train_timesteps
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or not 1 <= n <= total:
        raise ValueError(f"num_inference_steps must be an int in [1, {total}]; got {n!r}")
    if not isinstance(steps_offset, numbers.Integral) or steps_offset < 0:
        raise ValueError(f"steps_offset must be a non-negative int; got {steps_offset!r}")
    if spacing == "linspace":
        ts = np.linspace(0, total - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, n) * (total // n)).round()[::-1].astype(np.int64) + int(steps_offset)
    else:
        ts = np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1
    out = [int(t) for t in ts]
    if len(out) != n or len(set(out)) != n or min(out) < 0 or max(out) >= total:
        raise ValueError(f"spacing {spacing!r} with num_inference_steps={n}, steps_offset={steps_offset} "
                         f"gives invalid timesteps for {total} training steps: {out}")
    return out


def skip_sequence(num_steps: int, K) -> list[int]:
    """The seed's visited step indices for a process of `num_steps` steps, DESCENDING.

    K an int >= 1: [N-1], then N-2, N-2-K, ... while > 0, then 1 (if not there yet) and 0
    (N = 10, K = 3: 9, 8, 5, 2, 1, 0; K = 1 visits every step).
    K = "quadratic": [N-1] followed by 2^i - 1 for i = ceil(log2 N) - 1 down to 0, duplicates
    removed (N = 10: 9, 7, 3, 1, 0).
    """
    n = num_steps
    if isinstance(K, str):
        if K != "quadratic":
            raise ValueError(f"K must be an int >= 1 or 'quadratic'; got {K!r}")
        if n == 1:
            return [0]
        steps = [n - 1] + [2 ** i - 1 for i in range(math.ceil(math.log2(n)) - 1, -1, -1)]
    else:
        if not isinstance(K, numbers.Integral) or isinstance(K, bool) or K < 1:
            raise ValueError(f"K must be an int >= 1 or 'quadratic'; got {K!r}")
        steps = [n - 1] + list(range(n - 2, 0, -int(K))) + [1, 0]
    seen: set[int] = set()
    out = []
    for s in steps:
        if 0 <= s < n and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _check_spaced_count(spec, num_timesteps: int, count: int) -> int:
    if not 2 <= count <= num_timesteps:
        raise ValueError(f"spec {spec!r}: the step count must lie in [2, {num_timesteps}]; got {count}")
    return count


def quadratic_timesteps(num_timesteps: int, count: int) -> list[int]:
    """The DDIM paper code's "quadratic" timestep selection, ascending and without repeats:
    int(t) for t in linspace(0, sqrt(0.8 T), count) ** 2 (T = num_timesteps), so the largest
    timestep is 0.8 T and the steps are densest near x0 (respace spec "quadN"). Computed in float64
    exactly as that code does: where its rounding puts a square just below an integer, the
    timestep is one less than floor(0.8 T i^2 / (count - 1)^2) (T = 1000: count = 16, 26, 31, 51,
    ...; T = 60, count = 12: the top timestep is 47, not 48).

    Repeats: where (sqrt(0.8 T) / (count - 1))^2 < 1 the first squares truncate to the same
    integer (T = 1000: from count = 30 on; "quad50" keeps 49 distinct steps, "quad100" 96). Each
    timestep is kept once: the DDIM code's step between two equal timesteps leaves x unchanged
    (it re-noises its own x0 to the same level), so dropping it saves a model call and changes
    nothing when x0 is not clipped. The step count is then below `count`; read it from the
    process (`num_timesteps`). Raises ValueError unless 2 <= count <= T."""
    count = _check_spaced_count(f"quad{count}", num_timesteps, count)
    ts = np.linspace(0, np.sqrt(num_timesteps * 0.8), count) ** 2
    return sorted({int(t) for t in ts})


def power_timesteps(num_timesteps: int, count: int, power: float) -> list[int]:
    """The power family of spacings (respace spec "powP:N", e.g. "pow2:50"), ascending and without
    repeats: round((T - 1) * (i / (N - 1)) ** P) for i = 0 .. N-1 (numpy's round, half to even).
    P = 1 is even spacing (diffusers' "linspace" timesteps), P > 1 puts the steps closer together
    near x0 and further apart near T, P < 1 the reverse. Every run starts at T - 1 and ends at 0.
    Repeats near 0 (when (T - 1) / (N - 1)^P < 1) are kept once, as in `quadratic_timesteps`.
    Raises ValueError unless P > 0 and 2 <= N <= T."""
    count = _check_spaced_count(f"pow{power}:{count}", num_timesteps, count)
    if not (isinstance(power, numbers.Real) and math.isfinite(power) and power > 0):
        raise ValueError(f"spec 'pow{power}:{count}': the power must be a finite number > 0; got {power!r}")
    frac = np.arange(count, dtype=np.float64) / (count - 1)
    return sorted({int(t) for t in np.round((num_timesteps - 1) * frac ** float(power))})


# ---- options ----------------------------------------------------------------------------------------

def _check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def resolve_eta(eta=0.0, stochasticity=None) -> float:
    """The DDIM eta; `stochasticity` is the seed's name for it. Must lie in [0, 1]."""
    if stochasticity is not None:
        if eta not in (None, 0.0) and float(eta) != float(stochasticity):
            raise ValueError(f"eta={eta!r} and stochasticity={stochasticity!r} disagree: give one of them")
        eta, name = stochasticity, "stochasticity"
    else:
        name = "eta"
    if eta is None:
        eta = 0.0
    if not isinstance(eta, numbers.Real) or isinstance(eta, bool) or not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"{name} (the DDIM eta) must be a number in [0, 1]; got {eta!r}")
    return float(eta)


def validate_step_options(*, method="ddpm", eta=0.0, noise_mode="normal", project_noise=None,
                          clip=None, dynamic_threshold=None, stochasticity=None) -> dict:
    """Check the options of a reverse step; returns them normalised (eta resolved from
    stochasticity, noise_mode alias 'correct' -> 'normal', clip as a float pair).
    ValueError naming the option on a bad value."""
    _check_choice("method", method, METHODS)
    eta = resolve_eta(eta, stochasticity)
    noise_mode = NOISE_MODE_ALIASES.get(noise_mode, noise_mode)
    _check_choice("noise_mode", noise_mode, NOISE_MODES)
    _check_choice("project_noise", project_noise, PROJECTIONS)
    if clip is not None:
        if isinstance(clip, dict):   # the seed's {min: ..., max: ...}
            clip = (clip.get("min"), clip.get("max"))
        try:
            lo, hi = (float(v) for v in clip)
        except (TypeError, ValueError):
            raise ValueError(f"clip must be None or a pair (lo, hi); got {clip!r}") from None
        if not lo < hi:
            raise ValueError(f"clip must satisfy lo < hi; got {clip!r}")
        clip = (lo, hi)
    if dynamic_threshold is not None:
        try:
            ratio, max_value = (float(v) for v in dynamic_threshold)
        except (TypeError, ValueError):
            raise ValueError(f"dynamic_threshold must be None or (ratio, max_value); "
                             f"got {dynamic_threshold!r}") from None
        if not 0.0 < ratio <= 1.0 or not max_value >= 1.0:
            raise ValueError(f"dynamic_threshold needs 0 < ratio <= 1 and max_value >= 1; "
                             f"got {dynamic_threshold!r}")
        dynamic_threshold = (ratio, max_value)
    return dict(method=method, eta=eta, noise_mode=noise_mode, project_noise=project_noise, clip=clip,
                dynamic_threshold=dynamic_threshold)


def _as_index_tensor(name: str, value, num_steps: int, device=None) -> torch.Tensor:
    """A 1-D int64 tensor of step indices in [0, num_steps), ValueError naming `name` otherwise."""
    t = torch.as_tensor(value, device=device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer step indices; got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor (B,) of step indices; got shape {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_steps):
        raise ValueError(f"{name} must lie in [0, {num_steps}) (indices into the respaced process); "
                         f"got values in [{int(t.min())}, {int(t.max())}]")
    return t.long()


# ---- the process -----------------------------------------------------------------------------------

class Diffusion:
    """A (possibly respaced) Gaussian diffusion process with float64 tables.

    Args:
        schedule: "linear", "cosine", "sigmoid" (see `named_beta_schedule`) or a 1-D array of betas
            in (0, 1]. A beta of 1 (the linear schedule with T <= 20: its last beta is
            0.02 * 1000 / T) makes alpha_bar 0 at the last step, where an epsilon-predicting
            model gives no x0 (x0 = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) = 0 / 0) and
            sampling returns NaN, as in guided-diffusion: a UserWarning says so at construction.
            Cap the betas below 1 (the cosine schedule uses 0.999) or predict v or x0.
        timesteps: number of diffusion steps T of a named schedule (default 1000); for an array of
            betas it defaults to (and must equal) its length.
        variance: the DDPM reverse variance: "fixed_small" (posterior variance), "fixed_large"
            ([posterior_variance[1], betas[1:]]), "learned_range" (model's v in [-1, 1] interpolates the
            log variance between them) or "learned" (model outputs the log variance).
        prediction: what the model predicts: "epsilon", "x0" or "v".
        rescale_timesteps: give the model timesteps scaled to [0, 1000) as floats (guided-diffusion's
            rescale_timesteps).

    Attributes (torch float64 CPU tensors of shape (S,), S = num_timesteps): betas, alphas,
    alphas_cumprod, alphas_cumprod_prev, alphas_cumprod_next, sqrt_alphas_cumprod,
    sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod,
    sqrt_recipm1_alphas_cumprod, posterior_variance, posterior_log_variance_clipped,
    posterior_mean_coef1, posterior_mean_coef2, fixed_large_variance, fixed_large_log_variance;
    timestep_map (S,) int64: the original timestep of each step (ascending; identity when not
    respaced); num_timesteps S; original_num_steps T.
    """

    def __init__(self, schedule="linear", timesteps: int | None = None, variance: str = "fixed_small",
                 prediction: str = "epsilon", rescale_timesteps: bool = False):
        _check_choice("variance", variance, VARIANCES)
        _check_choice("prediction", prediction, PREDICTIONS)
        if not isinstance(rescale_timesteps, bool):
            raise TypeError(f"rescale_timesteps must be a bool; got {type(rescale_timesteps).__name__}")
        if isinstance(schedule, str):
            _check_choice("schedule", schedule, SCHEDULES)
            betas = named_beta_schedule(schedule, 1000 if timesteps is None else timesteps)
            self.schedule = schedule
        else:
            try:
                betas = np.asarray(schedule.detach().cpu().numpy() if torch.is_tensor(schedule) else schedule,
                                   dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError("schedule must be one of 'linear', 'cosine', 'sigmoid' or a 1-D array of "
                                 f"betas; got {type(schedule).__name__}") from None
            if betas.ndim != 1 or betas.size < 1:
                raise ValueError(f"schedule (betas) must be a non-empty 1-D array; got shape {betas.shape}")
            if timesteps is not None and timesteps != betas.size:
                raise ValueError(f"timesteps={timesteps} but the betas array has {betas.size} entries")
            self.schedule = "custom"
        if not (np.all(betas > 0) and np.all(betas <= 1)):
            what = (f"schedule {schedule!r} with timesteps={betas.size} gives betas" if isinstance(schedule, str)
                    else "schedule (betas) must lie in (0, 1]; got betas")
            raise ValueError(f"{what} in [{betas.min():.4g}, {betas.max():.4g}], outside (0, 1]")
        if prediction == "epsilon" and np.any(betas >= 1):
            warnings.warn(f"schedule {schedule if isinstance(schedule, str) else 'custom'!r}: a beta of 1 "
                          "makes alpha_bar 0, where an epsilon-predicting model gives no x0: sampling "
                          "through that step returns NaN. Cap the betas below 1 (e.g. the linear "
                          "schedule with timesteps > 20) or predict 'v' or 'x0'.", stacklevel=2)
        self.variance = variance
        self.prediction = prediction
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = int(betas.size)
        self._build(betas, np.arange(betas.size, dtype=np.int64))

    # -- tables --
    def _build(self, betas: np.ndarray, timestep_map: np.ndarray) -> None:
        """All float64 tables from betas (S,), as guided-diffusion's GaussianDiffusion.__init__."""
        n = betas.size
        alphas = 1.0 - betas
        ac = np.cumprod(alphas, axis=0)
        acp = np.append(1.0, ac[:-1])
        acn = np.append(ac[1:], 0.0)
        post_var = betas * (1.0 - acp) / (1.0 - ac)
        # index 0 of the posterior variance is 0 (no noise is added there): its log is replaced by
        # index 1's (guided-diffusion); a 1-step process has no index 1 and uses beta_0 instead.
        first = post_var[1] if n > 1 else betas[0]
        fixed_large = np.append(first, betas[1:])
        tables = dict(
            betas=betas, alphas=alphas, alphas_cumprod=ac, alphas_cumprod_prev=acp, alphas_cumprod_next=acn,
            sqrt_alphas_cumprod=np.sqrt(ac), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            log_one_minus_alphas_cumprod=np.log(1.0 - ac), sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
            posterior_variance=post_var,
            posterior_log_variance_clipped=np.log(np.append(first, post_var[1:])),
            posterior_mean_coef1=betas * np.sqrt(acp) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - acp) * np.sqrt(alphas) / (1.0 - ac),
            fixed_large_variance=fixed_large, fixed_large_log_variance=np.log(fixed_large),
        )
        for name, value in tables.items():
            setattr(self, name, torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64)))
        self.timestep_map = torch.from_numpy(np.ascontiguousarray(timestep_map, dtype=np.int64))
        self.num_timesteps = n
        self._coef_cache: dict[float, torch.Tensor] = {}

    def __repr__(self) -> str:
        if not hasattr(self, "num_timesteps"):
            return "Diffusion(<not built>)"
        respaced = "" if self.num_timesteps == self.original_num_steps else f", steps={self.num_timesteps}"
        return (f"Diffusion(schedule={self.schedule!r}, timesteps={self.original_num_steps}{respaced}, "
                f"variance={self.variance!r}, prediction={self.prediction!r}, "
                f"rescale_timesteps={self.rescale_timesteps})")

    @property
    def learned_variance(self) -> bool:
        """True when the model outputs variance channels (2C output channels)."""
        return self.variance in LEARNED_VARIANCES

    def model_output_channels(self, channels: int) -> int:
        """The model output channel count this process expects for images of `channels` channels."""
        return 2 * channels if self.learned_variance else channels

    # -- respacing --
    def respace(self, spec) -> "Diffusion":
        """A new Diffusion keeping a subset of this process's steps (sharing its options).

        spec: guided-diffusion's syntax — an int or "N", "a,b,c", "ddimN" (see `space_timesteps`), ""
        keeps every step —,
        diffusers' spacings as "leadingN", "trailingN" or "linspaceN" (steps_offset 0; see
        `respace_diffusers`), denser near x0: "quadN" (the DDIM code's quadratic spacing up to 0.8 T,
        `quadratic_timesteps`) and "powP:N" (round((T - 1) (i / (N - 1))^P), `power_timesteps`;
        both keep a repeated timestep once, so they may give fewer than N steps), or an explicit sequence/tensor of step indices to keep (any order,
        duplicates ignored). Indices refer to THIS process (the original one unless already respaced);
        the new timestep_map maps to the original timesteps. The kept alpha_bar values are unchanged;
        betas are re-derived: 1 - alpha_bar[i] / alpha_bar[previous kept] (1 for the first).
        """
        if isinstance(spec, str) and not spec.strip():
            return self._subset(list(range(self.num_timesteps)))   # guided-diffusion: "" = no respacing
        if isinstance(spec, str):
            m = re.fullmatch(r"\s*(leading|trailing|linspace):?(\d+)\s*", spec)
            if m:
                return self.respace_diffusers(int(m.group(2)), m.group(1))
            m = re.fullmatch(r"\s*quad(\d+)\s*", spec)
            if m:
                return self._subset(quadratic_timesteps(self.num_timesteps, int(m.group(1))))
            m = re.fullmatch(r"\s*pow(\d+(?:\.\d*)?|\.\d+):(\d+)\s*", spec)
            if m:
                return self._subset(power_timesteps(self.num_timesteps, int(m.group(2)), float(m.group(1))))
            kept = space_timesteps(self.num_timesteps, spec)
        elif isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
            kept = space_timesteps(self.num_timesteps, spec)
        elif isinstance(spec, (Sequence, torch.Tensor, np.ndarray)):
            values = torch.as_tensor(spec).reshape(-1)
            if values.numel() == 0:
                raise ValueError("spec: an explicit list of timesteps must not be empty")
            kept = sorted(set(_as_index_tensor("spec", values, self.num_timesteps).tolist()))
        else:
            raise TypeError(f"spec must be an int, a str or a sequence of ints; got {type(spec).__name__}")
        return self._subset(kept)

    def respace_diffusers(self, num_inference_steps: int, spacing: str = "leading",
                          steps_offset: int = 0) -> "Diffusion":
        """Respace to the timesteps diffusers' DDPMScheduler/DDIMScheduler.set_timesteps chooses.

        Each step goes to the next chosen timestep and the last to the clean image, which is
        diffusers' DDPMScheduler exactly, and its DDIMScheduler (set_alpha_to_one=True) whenever its
        `t - T // n` previous timestep is the next chosen one (leading spacing; trailing when n
        divides T). Only defined on an unrespaced process.
        """
        if self.num_timesteps != self.original_num_steps:
            raise ValueError("respace_diffusers needs an unrespaced process (diffusers' timesteps are original)")
        ts = diffusers_timesteps(self.num_timesteps, num_inference_steps, spacing, steps_offset)
        return self._subset(sorted(ts))

    def skip(self, K) -> "Diffusion":
        """The seed's step skipping: respace to `skip_sequence(num_timesteps, K)` (K an int >= 1 or
        "quadratic"). For N = 10, K = 3 the visited steps are 9, 8, 5, 2, 1, 0; step 0 goes to x_0."""
        return self._subset(sorted(skip_sequence(self.num_timesteps, K)))

    def truncate(self, fraction: float) -> "Diffusion":
        """The first round(fraction * S) steps of this process (S = num_timesteps): a reverse process
        that starts at timestep_map[n - 1] instead of the last one (fraction 0.8 of T = 1000: at
        timestep 799, leaving out the noisiest 20% of the timesteps, which seed 004 finds carry
        almost no signal under a linear schedule). Respace the result to choose its steps
        (ddpm_fast.sample(steps=50, truncate=0.8): 50 steps over timesteps 0 .. 799). fraction 1
        returns an equal process. Raises ValueError unless 0 < fraction <= 1 and at least one step
        is kept; TypeError for a non-number."""
        if not isinstance(fraction, numbers.Real) or isinstance(fraction, bool):
            raise TypeError(f"truncate must be a number in (0, 1]; got {type(fraction).__name__}")
        n = round(float(fraction) * self.num_timesteps)
        if not 0.0 < float(fraction) <= 1.0 or n < 1:
            raise ValueError(f"truncate must lie in (0, 1] and keep at least one of the {self.num_timesteps} "
                             f"steps; got {fraction!r}")
        return self._subset(list(range(n)))

    def _subset(self, kept: list[int]) -> "Diffusion":
        ac = self.alphas_cumprod.numpy()
        betas, last = [], 1.0
        for i in kept:
            betas.append(1.0 - ac[i] / last)
            last = ac[i]
        new = object.__new__(type(self))
        new.schedule = self.schedule
        new.variance = self.variance
        new.prediction = self.prediction
        new.rescale_timesteps = self.rescale_timesteps
        new.original_num_steps = self.original_num_steps
        new._build(np.asarray(betas, dtype=np.float64), self.timestep_map.numpy()[kept])
        return new

    # -- per-step coefficients --
    def coefficients(self, eta: float = 0.0) -> torch.Tensor:
        """The coefficient columns of every step, (S, NUM_COEFS) float64 (ddpm_fast.step_layout).

        eta: the DDIM eta (stochasticity) in [0, 1] setting DDIM_SIGMA and DDIM_DIR.
        LOG_VAR_MIN / VARIANCE follow `self.variance`; LOG_VAR_MAX is log(beta) (used by learned_range);
        NONZERO is 0 at step index 0.
        """
        eta = resolve_eta(eta)
        cached = self._coef_cache.get(eta)
        if cached is not None:
            return cached.clone()
        ab, abp = self.alphas_cumprod.numpy(), self.alphas_cumprod_prev.numpy()
        table = np.zeros((self.num_timesteps, NUM_COEFS), dtype=np.float64)
        table[:, SQRT_RECIP_AB] = self.sqrt_recip_alphas_cumprod.numpy()
        table[:, SQRT_RECIPM1_AB] = self.sqrt_recipm1_alphas_cumprod.numpy()
        table[:, SQRT_AB] = self.sqrt_alphas_cumprod.numpy()
        table[:, SQRT_1M_AB] = self.sqrt_one_minus_alphas_cumprod.numpy()
        table[:, POST_COEF1] = self.posterior_mean_coef1.numpy()
        table[:, POST_COEF2] = self.posterior_mean_coef2.numpy()
        if self.variance == "fixed_large":
            table[:, LOG_VAR_MIN] = self.fixed_large_log_variance.numpy()
            table[:, VARIANCE] = self.fixed_large_variance.numpy()
        else:
            table[:, LOG_VAR_MIN] = self.posterior_log_variance_clipped.numpy()
            table[:, VARIANCE] = self.posterior_variance.numpy()
        table[:, LOG_VAR_MAX] = np.log(self.betas.numpy())
        sigma = eta * np.sqrt((1.0 - abp) / (1.0 - ab)) * np.sqrt(1.0 - ab / abp)
        table[:, SQRT_AB_PREV] = np.sqrt(abp)
        table[:, DDIM_DIR] = np.sqrt(np.maximum(1.0 - abp - sigma ** 2, 0.0))
        table[:, DDIM_SIGMA] = sigma
        table[:, NONZERO] = (np.arange(self.num_timesteps) > 0).astype(np.float64)
        result = torch.from_numpy(table)
        self._coef_cache[eta] = result
        return result.clone()

    def coefficient_table(self, eta: float = 0.0, device=None, dtype=torch.float32) -> torch.Tensor:
        """`coefficients(eta)` cast once to `dtype` (float32: what the steps take) on `device`:
        (S, NUM_COEFS). Build it once per sampling run and index it with the step indices."""
        return self.coefficients(eta).to(device=device, dtype=dtype)

    def gather_coefficients(self, step_index: torch.Tensor, eta: float = 0.0,
                            table: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample coefficients (B, NUM_COEFS) float32 for step indices (B,) into this process,
        on step_index's device. `table`: a `coefficient_table(eta, device)` to reuse (then eta is unused)."""
        if table is None:
            table = self.coefficient_table(eta, device=torch.as_tensor(step_index).device)
        return table[torch.as_tensor(step_index, device=table.device).long()]

    def model_timesteps(self, step_index: torch.Tensor) -> torch.Tensor:
        """The timesteps the model receives for step indices (B,): the original timesteps
        timestep_map[step_index] (int64), or as float32 scaled by 1000 / T when rescale_timesteps
        (guided-diffusion's _WrappedModel). On step_index's device."""
        idx = torch.as_tensor(step_index)
        t = self.timestep_map.to(idx.device)[idx.long()]
        if self.rescale_timesteps:
            t = t.float() * (1000.0 / self.original_num_steps)
        return t

    def model_timestep_table(self, device=None) -> torch.Tensor:
        """`model_timesteps` of every step index, (S,), on `device` (for a static loop)."""
        return self.model_timesteps(torch.arange(self.num_timesteps, device=device))

    # -- forward process --
    def q_sample(self, x_start: torch.Tensor, step_index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Diffuse x_0 to step `step_index` (B,): sqrt(ab) * x_0 + sqrt(1 - ab) * noise, in x_start's dtype
        (coefficients gathered in float64, cast to float32)."""
        idx = torch.as_tensor(step_index, device=x_start.device).long()
        shape = (-1,) + (1,) * (x_start.dim() - 1)
        a = self.sqrt_alphas_cumprod.to(x_start.device)[idx].float().reshape(shape)
        b = self.sqrt_one_minus_alphas_cumprod.to(x_start.device)[idx].float().reshape(shape)
        return (a * x_start.float() + b * noise.float()).to(x_start.dtype)

    # -- the reverse step --
    def check_model_output(self, x: torch.Tensor, model_output: torch.Tensor) -> None:
        """ValueError naming model_output when its shape does not fit x and this process's variance."""
        want = self.model_output_channels(x.shape[1])
        if (model_output.dim() != x.dim() or model_output.shape[0] != x.shape[0]
                or model_output.shape[2:] != x.shape[2:] or model_output.shape[1] != want):
            extra = " (learned variance: prediction and variance channels)" if self.learned_variance else ""
            raise ValueError(f"model_output must have shape {(x.shape[0], want, *x.shape[2:])}{extra} "
                             f"for x of shape {tuple(x.shape)} and variance={self.variance!r}; "
                             f"got {tuple(model_output.shape)}")

    def p_sample_step(self, x: torch.Tensor, model_output: torch.Tensor, step_index: torch.Tensor,
                      noise: torch.Tensor | None = None, *, method: str = "ddpm", eta: float = 0.0,
                      stochasticity: float | None = None, clip_denoised: bool = True,
                      noise_mode: str = "normal", project_noise: str | None = None, clip=None,
                      guidance_grad: torch.Tensor | None = None, eps_from_x0: bool = True,
                      dynamic_threshold=None, coef: torch.Tensor | None = None):
        """One reverse step x_t -> x_{t-1} of this process (reference.diffusion_step with this
        process's coefficients). Returns (x_prev, pred_x0), both shaped and typed like x.

        Args:
            x: (B, C, *spatial) the current sample.
            model_output: (B, C, ...) or (B, 2C, ...) with learned variance: the model's output at
                (x, model_timesteps(step_index)).
            step_index: (B,) int indices into this (respaced) process.
            noise: (B, C, *spatial) standard normal draw, or None (no noise).
            method: "ddpm" or "ddim"; eta / stochasticity: the DDIM eta in [0, 1].
            clip_denoised, noise_mode ("normal" | "correct", "squared", "zero"), project_noise
            (None, "pixel", "sample"), clip ((lo, hi) clamp of x_prev), guidance_grad (B, C, ...),
            eps_from_x0, dynamic_threshold: see reference.diffusion_step.
            coef: precomputed (B, NUM_COEFS) float32 from gather_coefficients; eta is then unused.
        """
        opts = validate_step_options(method=method, eta=eta, stochasticity=stochasticity,
                                     noise_mode=noise_mode, project_noise=project_noise, clip=clip,
                                     dynamic_threshold=dynamic_threshold)
        self.check_model_output(x, model_output)
        for name, t in (("noise", noise), ("guidance_grad", guidance_grad)):
            if t is not None and t.shape != x.shape:
                raise ValueError(f"{name} must have x's shape {tuple(x.shape)}; got {tuple(t.shape)}")
        idx = _as_index_tensor("step_index", step_index, self.num_timesteps, device=x.device)
        if idx.shape[0] != x.shape[0]:
            raise ValueError(f"step_index must have shape ({x.shape[0]},); got {tuple(idx.shape)}")
        if coef is None:
            coef = self.gather_coefficients(idx, opts["eta"])
        elif coef.shape != (x.shape[0], NUM_COEFS):
            raise ValueError(f"coef must have shape ({x.shape[0]}, {NUM_COEFS}); got {tuple(coef.shape)}")
        return self._reference_step(x, model_output, coef, noise, opts, clip_denoised, guidance_grad, eps_from_x0)

    def _reference_step(self, x, model_output, coef, noise, opts: dict, clip_denoised: bool,
                        guidance_grad, eps_from_x0: bool):
        """reference.diffusion_step with this process's prediction/variance and checked `opts`
        (validate_step_options); no checks, no host synchronisation."""
        return reference.diffusion_step(
            x, model_output, coef, noise, method=opts["method"], prediction=self.prediction,
            variance=self.variance, clip_denoised=clip_denoised, noise_mode=opts["noise_mode"],
            project_noise=opts["project_noise"], clip=opts["clip"], guidance_grad=guidance_grad,
            eps_from_x0=eps_from_x0, dynamic_threshold=opts["dynamic_threshold"])


# ---- guidance -----------------------------------------------------------------------------------------

def classifier_gradient(cond_fn: Callable, x: torch.Tensor, t_model: torch.Tensor,
                        model_kwargs: dict | None = None) -> torch.Tensor:
    """cond_fn(x, t, **model_kwargs) -> d log p(y | x_t) / d x_t, shaped like x (float32).

    t_model are the timesteps the model receives (`Diffusion.model_timesteps`: ORIGINAL timesteps,
    scaled when rescale_timesteps), as in guided-diffusion's condition_mean / condition_score."""
    grad = cond_fn(x, t_model, **(model_kwargs or {}))
    if not isinstance(grad, torch.Tensor) or grad.shape != x.shape:
        raise ValueError(f"cond_fn must return a tensor of x's shape {tuple(x.shape)}; got "
                         f"{tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__}")
    return grad.float()


def cfg_model_inputs(x: torch.Tensor, t_model: torch.Tensor, model_kwargs: dict | None,
                     null_label: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The doubled batch of classifier-free guidance: x (B, ...) -> (2B, ...), conditional half
    first, then the unconditional half whose label `y` is `null_label`. Other tensors of
    model_kwargs with leading dim B are repeated; the rest passes through."""
    kwargs = dict(model_kwargs or {})
    if "y" not in kwargs or kwargs["y"] is None:
        raise ValueError("classifier-free guidance needs class labels (class_labels or model_kwargs['y'])")
    b = x.shape[0]
    doubled = {}
    for name, value in kwargs.items():
        if name == "y":
            doubled[name] = torch.cat([value, torch.full_like(value, int(null_label))])
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == b:
            doubled[name] = torch.cat([value, value])
        else:
            doubled[name] = value
    return torch.cat([x, x]), torch.cat([t_model, t_model]), doubled


def combine_cfg(model_output: torch.Tensor, guidance_scale: float, channels: int) -> torch.Tensor:
    """Classifier-free guidance on the output (2B, C', ...) of a doubled batch (conditional half
    first): pred = uncond + s * (cond - uncond) on the first `channels` channels; the remaining
    (learned variance) channels are the conditional ones. Returns (B, C', ...) float32."""
    cond, uncond = model_output.float().chunk(2, dim=0)
    pred = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([pred, cond[:, channels:]], dim=1)


def guided_model_output(model: Callable, x: torch.Tensor, t_model: torch.Tensor,
                        model_kwargs: dict | None = None, guidance_scale: float | None = None,
                        null_label: int | None = None) -> torch.Tensor:
    """model(x, t, **model_kwargs), or with `guidance_scale` one call on the doubled batch combined by
    `combine_cfg` (needs `null_label`, the label of the unconditional class)."""
    if guidance_scale is None:
        return model(x, t_model, **(model_kwargs or {}))
    if null_label is None:
        raise ValueError("null_label (the class label of the unconditional model) is required with guidance_scale")
    x2, t2, kwargs2 = cfg_model_inputs(x, t_model, model_kwargs, null_label)
    return combine_cfg(model(x2, t2, **kwargs2), float(guidance_scale), x.shape[1])


# ---- the reference loop ---------------------------------------------------------------------------

def check_class_labels(labels, num_classes: int | None, batch: int | None = None) -> torch.Tensor:
    """Validated class labels as a (B,) int64 tensor: integers in [0, num_classes) (>= 0 when
    num_classes is None), B == batch when batch is given. Raises ValueError naming class_labels."""
    labels = torch.as_tensor(labels)
    if batch is None:
        labels = labels.reshape(-1)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool or (
            batch is not None and labels.shape != (batch,)):
        shape = f" of shape ({batch},)" if batch is not None else ""
        raise ValueError(f"class_labels must be an integer tensor{shape}; got {labels.dtype} {tuple(labels.shape)}")
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            bound = f"[0, {num_classes - 1}]" if num_classes is not None else ">= 0"
            raise ValueError(f"class_labels must lie in {bound}; got values in [{lo}, {hi}]")
    return labels.long()


def _model_device(model, default="cpu"):
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device(default)


def reference_sample_loop(model: Callable, diffusion: Diffusion, shape_or_x_T, *, method: str = "ddpm",
                          eta: float = 0.0, stochasticity: float | None = None, noise=None,
                          clip_denoised: bool = True, noise_mode: str = "normal",
                          project_noise: str | None = None, clip=None, cond_fn: Callable | None = None,
                          guidance_scale: float | None = None, null_label: int | None = None,
                          class_labels=None, num_classes: int | None = None, model_kwargs: dict | None = None,
                          eps_from_x0: bool = True, dynamic_threshold=None, device=None,
                          progress: bool = False) -> torch.Tensor:
    """The plain Python sampling loop: steps S-1 .. 0 of `diffusion`, one model call per step.

    Args:
        model: callable model(x, t, **model_kwargs) -> (B, C or 2C, ...), t the ORIGINAL timesteps
            (diffusion.model_timesteps).
        diffusion: the (respaced / skipped) process.
        shape_or_x_T: the shape (B, C, H, W) of x_T, drawn standard normal (from `noise` when it is a
            torch.Generator, else torch's global RNG), or x_T itself.
        method, eta / stochasticity, clip_denoised, noise_mode, project_noise, eps_from_x0,
            dynamic_threshold: see Diffusion.p_sample_step.
        noise: the per-step noise: None (torch.randn_like(x) each step, the RNG order of
            guided-diffusion), a torch.Generator, a callable noise(step_index: int, x) -> tensor like x,
            or a tensor (S, B, C, ...) indexed by step index.
        clip: (lo, hi) clamps x_T at the start and every new sample (the seed's clipping).
        cond_fn: classifier guidance, cond_fn(x, t, **model_kwargs) -> gradient like x, evaluated at
            x_t with the model's timesteps.
        guidance_scale, null_label: classifier-free guidance (one model call on the doubled batch).
        class_labels: (B,) int labels passed as model_kwargs["y"]; checked against `num_classes`
            (default: model.num_classes when the model has it).
        device: where x_T is drawn when a shape is given (default: the model's parameters' device).
        progress: show a tqdm bar.
    Returns x_0, (B, C, H, W) in x_T's dtype.
    """
    opts = validate_step_options(method=method, eta=eta, stochasticity=stochasticity, noise_mode=noise_mode,
                                 project_noise=project_noise, clip=clip, dynamic_threshold=dynamic_threshold)
    if guidance_scale is not None and null_label is None:
        raise ValueError("null_label (the class label of the unconditional model) is required with guidance_scale")
    generator = noise if isinstance(noise, torch.Generator) else None
    if isinstance(shape_or_x_T, torch.Tensor):
        x = shape_or_x_T
    else:
        shape = tuple(int(s) for s in shape_or_x_T)
        dev = device if device is not None else (generator.device if generator is not None
                                                 else _model_device(model))
        x = torch.randn(shape, generator=generator, device=dev)
    if x.dim() < 2:
        raise ValueError(f"x_T must be (B, C, ...); got shape {tuple(x.shape)}")
    batch = x.shape[0]
    kwargs = dict(model_kwargs or {})
    if class_labels is not None:
        kwargs["y"] = class_labels
    if kwargs.get("y") is not None:
        if num_classes is None:
            num_classes = getattr(model, "num_classes", None)
        kwargs["y"] = check_class_labels(kwargs["y"], num_classes, batch).to(x.device)
    if opts["clip"] is not None:
        x = x.clamp(*opts["clip"])

    # per-run tables on the device, indexed per step (no per-step host copies or synchronisation)
    table = diffusion.coefficient_table(opts["eta"], device=x.device)
    t_table = diffusion.model_timestep_table(device=x.device)
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps)
    for i in steps:
        idx = torch.full((batch,), i, dtype=torch.long, device=x.device)
        t_model = t_table[idx]
        out = guided_model_output(model, x, t_model, kwargs, guidance_scale, null_label)
        diffusion.check_model_output(x, out)
        grad = classifier_gradient(cond_fn, x, t_model, kwargs) if cond_fn is not None else None
        if noise is None:
            z = torch.randn_like(x)
        elif generator is not None:
            z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        elif isinstance(noise, torch.Tensor):
            z = noise[i]
        else:
            z = noise(i, x)
        if z.shape != x.shape:
            raise ValueError(f"noise must give tensors of x's shape {tuple(x.shape)}; got {tuple(z.shape)} "
                             f"at step {i}")
        x, _ = diffusion._reference_step(x, out, table[idx], z, opts, clip_denoised, grad, eps_from_x0)
    return x
