"""The static reverse loop: written once, run eagerly or captured whole into a CUDA graph.

All per-step values live in device tensors prepared before the loop (the plan): coefficient
rows gathered from the float64 tables, the model's timesteps and the noise step ids. The loop
itself performs no host synchronisation and no per-step Python arithmetic on schedule values,
so torch.cuda.graph can record all of it (graphs.py).
"""
from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from . import ops, philox
from .diffusion import classifier_gradient
from .step_layout import METHODS, NOISE_MODES, NONZERO, PROJECTIONS, code

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepOptions:
    """Options of every reverse step (see ddpm_fast.reference.diffusion_step)."""

    method: str = "ddpm"
    prediction: str = "epsilon"
    variance: str = "fixed_small"
    clip_denoised: bool = True
    noise_mode: str = "normal"
    project_noise: str | None = None
    clip: tuple[float, float] | None = None
    eps_from_x0: bool = True
    dynamic_threshold: tuple[float, float] | None = None

    def __post_init__(self):
        code("method", self.method, METHODS)
        code("noise", self.noise_mode, NOISE_MODES)
        code("project_noise", self.project_noise, PROJECTIONS)
        if self.clip is not None:
            lo, hi = self.clip
            if not lo < hi:
                raise ValueError(f"clip must be (lo, hi) with lo < hi; got {self.clip!r}")

    def step_kwargs(self) -> dict:
        return dict(method=self.method, prediction=self.prediction, variance=self.variance,
                    clip_denoised=self.clip_denoised, noise_mode=self.noise_mode,
                    project_noise=self.project_noise, clip=self.clip, eps_from_x0=self.eps_from_x0,
                    dynamic_threshold=self.dynamic_threshold)


@dataclass
class Plan:
    """Everything the loop reads per step, on the sampling device.

    coef: (S, NUM_COEFS) float32 rows of the step coefficients (step index s = 0 .. S-1);
    t_model: (S,) the timesteps the model receives at each step index (original timesteps,
    rescaled to 0..1000 when the diffusion says so); step_ids: (S,) int64 noise step ids;
    initial_step: () int64, x_T's step id (philox.INITIAL_NOISE_STEP; made with the plan so
    that the loop creates no tensor from a host scalar: a CUDA graph captures it as it is).
    The loop visits s = S-1 down to 0."""

    coef: torch.Tensor
    t_model: torch.Tensor
    step_ids: torch.Tensor
    options: StepOptions
    initial_step: torch.Tensor | None = None
    num_steps: int = field(init=False)

    def __post_init__(self):
        self.num_steps = self.coef.shape[0]
        if self.initial_step is None:
            self.initial_step = torch.full((), philox.INITIAL_NOISE_STEP, dtype=torch.int64,
                                           device=self.coef.device)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the loop reads from the plan (what a captured graph must keep alive)."""
        return self.coef, self.t_model, self.step_ids, self.initial_step

    def to(self, device) -> "Plan":
        """The same plan on `device`."""
        return replace(self, coef=self.coef.to(device), t_model=self.t_model.to(device),
                       step_ids=self.step_ids.to(device), initial_step=self.initial_step.to(device))

    def digest(self) -> str:
        """A hash of the plan's values and options (a captured loop's cache key: a changed
        schedule, respacing, eta, rescaling or per-step noise switch gives another digest).
        Reads the tensors on the host: call it on a CPU plan, or accept a device sync."""
        h = hashlib.sha256(repr(self.options).encode())
        for t in self.tensors():
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def make_plan(diffusion, options: StepOptions, eta: float, device: torch.device) -> Plan:
    """Gather the (respaced) diffusion's float64 tables into float32 device tensors, once."""
    return Plan(coef=diffusion.coefficient_table(eta, device=device),
                t_model=diffusion.model_timestep_table(device=device),
                step_ids=torch.arange(diffusion.num_timesteps, device=device, dtype=torch.int64),
                options=options)


def check_noise_until(noise_until) -> int | None:
    """Validate `noise_until` (None or an int >= 0): TypeError / ValueError naming it."""
    if noise_until is None:
        return None
    if not isinstance(noise_until, numbers.Integral) or isinstance(noise_until, bool):
        raise TypeError(f"noise_until must be None or an int >= 0 (the number of reverse steps that add "
                        f"noise); got {type(noise_until).__name__}")
    if noise_until < 0:
        raise ValueError(f"noise_until must be >= 0; got {noise_until}")
    return int(noise_until)


def with_noise_until(plan: Plan, noise_until: int | None, start: int | None = None) -> Plan:
    """The plan whose steps add noise only during the first `noise_until` reverse steps (seed 003's
    "stopping Gaussian noise after k inference steps").

    The reverse process starts at step index `start` (default S - 1) and goes down, so the noisy
    steps are start, start - 1, ..., start - k + 1; every step index <= start - k gets 0 in its
    NONZERO coefficient column, which every step implementation (reference, CPU C++, CUDA, Triton)
    multiplies the noise by. The loop stays one static loop (nothing but a per-step coefficient
    changes), the DDPM step becomes its posterior mean, DDIM keeps its eta's direction term
    (DDIM_DIR) and only drops the sigma * z term. noise_until >= start + 1 (or None) returns the
    plan unchanged; 0 gives a noise-free reverse process."""
    k = check_noise_until(noise_until)
    start = plan.num_steps - 1 if start is None else int(start)
    if k is None or k > start:
        return plan
    coef = plan.coef.clone()
    coef[:start - k + 1, NONZERO] = 0.0
    return replace(plan, coef=coef)


def initial_noise(seeds: torch.Tensor, sample_shape: tuple[int, ...],
                  clip: tuple[float, float] | None = None, scale: float = 1.0,
                  step: int | torch.Tensor = philox.INITIAL_NOISE_STEP) -> torch.Tensor:
    """x_T for each sample's seed (B,) int64 -> (B, *sample_shape) float32, from the same
    counter-based generator as the steps' noise (its own step id), times `scale` (a truncated
    process's start_noise_scale), clamped when `clip` is set. step: x_T's step id, best the
    plan's `initial_step` tensor (no host-to-device copy inside a captured loop)."""
    x = philox.initial_noise(seeds, sample_shape, step=step)
    if scale != 1.0:
        x = x * scale
    return x if clip is None else x.clamp(clip[0], clip[1])


def reverse_process(diffusion, steps=None, skip=None, truncate: float | None = None):
    """The process a sampler runs: `diffusion` truncated to its first `truncate` fraction of steps
    (Diffusion.truncate; None keeps them all), then step-skipped (`skip`: Diffusion.skip) or
    respaced (`steps`: Diffusion.respace; None keeps every step)."""
    base = diffusion if truncate is None else diffusion.truncate(truncate)
    if skip is not None:
        return base.skip(skip)
    return base if steps is None else base.respace(steps)


def start_noise_scale(diffusion, truncate: float | None) -> float:
    """The stddev of a truncated process's drawn x_T: sqrt(1 - alpha_bar) of the timestep it starts
    at (the noise of q(x_t | x_0) with nothing known of x_0), 1.0 when nothing is truncated. For a
    linear schedule at 0.8 T it is 0.9993 (x_T ~ N(0, I) as in the DDIM code's quadratic runs); for
    the cosine schedule at 0.8 T, 0.95."""
    if truncate is None:
        return 1.0
    process = diffusion.truncate(truncate)
    if process.num_timesteps == diffusion.num_timesteps:
        return 1.0
    return float(process.sqrt_one_minus_alphas_cumprod[-1])


def reverse_loop(model_fn: ModelFn, plan: Plan, x: torch.Tensor, seeds: torch.Tensor | None, *,
                 cond_fn: Callable | None = None, return_x0: bool = False,
                 progress: bool = False, backend: str = "auto",
                 steps: Sequence[int] | None = None,
                 before_step: Callable[[torch.Tensor, int], torch.Tensor] | None = None):
    """Run the reverse process from x = x_T (B, C, H, W) through the steps of the plan.

    model_fn(x, t) -> model output (B, C or 2C, H, W), with t the (B,) model timesteps;
    seeds (B,) int64 key the in-kernel noise (None: no noise, e.g. deterministic DDIM);
    cond_fn(x, t) -> classifier-guidance gradient (needs autograd: eager only); it alone runs
    with gradients: the model calls and the steps run under no_grad (no autograd graph is
    recorded through the U-Net even when its parameters require grad);
    steps: the step indices to visit, in order (default S-1 down to 0; restoration visits
    part of them); before_step(x, s) -> x runs before each step (restoration's known region).
    Returns x (B, C, H, W) float32 after the last step, and its predicted x0 when return_x0.
    """
    b = x.shape[0]
    kwargs = plan.options.step_kwargs()
    steps = list(range(plan.num_steps - 1, -1, -1) if steps is None else steps)
    last = steps[-1] if steps else None
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", unit="step", leave=False)
    x0 = None
    for s in steps:
        with torch.no_grad():
            if before_step is not None:
                x = before_step(x, s)
            t = plan.t_model[s].expand(b)
            out = model_fn(x, t)
        grad = None
        if cond_fn is not None:
            with torch.enable_grad():
                grad = classifier_gradient(cond_fn, x, t)
        with torch.no_grad():
            x, x0 = ops.diffusion_step(
                x, out, plan.coef[s].expand(b, -1), seed=seeds,
                step=None if seeds is None else plan.step_ids[s], guidance_grad=grad,
                return_x0=return_x0 and s == last, backend=backend, **kwargs)
    return (x, x0) if return_x0 else x
