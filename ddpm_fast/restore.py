"""Restoration with a pretrained diffusion model: inpainting (RePaint-style, with optional
resampling jumps) and partial-noise restoration of degraded images (SDEdit-style `strength`).

Every step reuses the sampler's plan and fused step, so all of ddpm_fast.sample's options apply
(method, eta, noise mode, projection, clipping, step skipping K). Noise comes from the same
counter-based generator, in streams of its own for the forward-noised known region.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from . import philox, validate
from .diffusion import check_class_labels
from .loop import StepOptions, check_noise_until, make_plan, reverse_loop, reverse_process, with_noise_until
from .reference import predicted_x0
from .sample import _model_fn, sample_seeds, seeded_labels
from .step_layout import SQRT_1M_AB, SQRT_AB, SQRT_AB_PREV

# Noise stream ids (the steps' own noise uses ids 0 .. S * rounds - 1).
_KNOWN_STREAM = 1 << 40
_UNDO_STREAM = 2 << 40
_START_STREAM = 3 << 40


def repaint_schedule(num_steps: int, jump_length: int = 10, jump_n_sample: int = 1) -> list[int]:
    """RePaint's time schedule over step indices S-1 .. 0: go down; after every `jump_length`
    steps jump back up `jump_length` steps, `jump_n_sample - 1` times per jump point. Returns the
    visited indices followed by -1 (the clean image); a rise t -> t+1 is a forward (undo) step.
    With jump_n_sample = 1 it is simply S-1, S-2, ..., 0, -1."""
    if jump_length < 1:
        raise ValueError(f"jump_length must be >= 1; got {jump_length}")
    if jump_n_sample < 1:
        raise ValueError(f"jump_n_sample must be >= 1; got {jump_n_sample}")
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    t = num_steps
    out = []
    while t >= 1:
        t -= 1
        out.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                out.append(t)
    out.append(-1)
    return out


def _runs(schedule: Sequence[int]):
    """Split a schedule into ('down', [s ...]) runs of reverse steps and ('up', s_from, s_to)
    forward undo steps."""
    down: list[int] = []
    for a, b in zip(schedule, schedule[1:]):
        if b < a:
            down.append(a)
        else:
            if down:
                yield ("down", down)
                down = []
            yield ("up", a, b)
    if down:
        yield ("down", down)


def restore(model: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor | None = None, *,
            steps: int | str | Sequence[int] | None = 50, method: str = "ddpm",
            strength: float | None = None, jump_length: int = 5, jump_n_sample: int | None = None,
            diffusion=None, class_labels=None, guidance_scale: float | None = None,
            eta: float = 0.0, noise: str = "normal", project_noise: str | None = None,
            clip_denoised: bool = True, clip: tuple[float, float] | None = None,
            skip: int | str | None = None, noise_until: int | None = None,
            reconstruction_guidance: float | None = None, seed: int = 0,
            progress: bool = True, backend: str = "auto") -> torch.Tensor:
    """Restore images with a diffusion model.

    The defaults inpaint well: 50 steps, RePaint jumps of 5 steps with 3 passes and reconstruction
    guidance 10 when a mask is given (measured on the bundled digits model, lower half of 100
    held-out digits unknown, unconditional, seed 0: the SVC recognised 86% of the restored
    digits, 27% of the masked ones; the former defaults, 250 plain steps, 53%. That figure predates
    the fix that gives the known region fresh noise on every RePaint pass; tests/test_restore.py
    runs these defaults and holds them to >= 75%); 50 plain steps without a mask.

    Args:
        image: (B, C, H, W) finite, in [-1, 1].
        mask: (B or 1, 1 or C, H, W), 1 = known pixel, 0 = to generate, as bools, integers in
            {0, 1} or floats in [0, 1] (a fraction blends the image into the generated pixel); a
            0/255 mask is refused with a hint. None restores the whole image (needs `strength`).
            Pixels whose mask is 1 come back exactly equal to `image`.
        steps / skip / method / eta / noise / project_noise / clip_denoised / clip: as in
            ddpm_fast.sample.
        strength: in (0, 1]: noise the image to that fraction of the process and run the reverse
            process from there (SDEdit). None: start from pure noise (inpainting).
        jump_length, jump_n_sample: RePaint resampling (jump_n_sample = 1: no resampling);
            jump_n_sample defaults to 3 with a mask, 1 without.
        noise_until: k: only the first k reverse steps from the start (step indices start ..
            start - k + 1, start = S - 1 or strength's) add noise, as in ddpm_fast.sample; a step
            revisited by a RePaint jump keeps its own choice (decided per step index, not per visit).
        reconstruction_guidance: weight w >= 0 of reconstruction guidance (Ho et al. 2022, "Video
            Diffusion Models", sec. 3.1) for inpainting: each step is also guided by
            -w * sqrt(ab_t) * d/dx_t |mask * (x0_hat(x_t) - image)|^2, the gradient through the
            model of how far its predicted x0 strays from the known pixels, so the generated
            region agrees with them (classifier-guidance style: DDPM shifts the mean by
            variance * gradient, DDIM shifts eps). Costs one more model call and its backward
            pass per step. Default 10 with a mask, 0 (plain RePaint replacement) without one, and
            with strength alone it must stay 0. Use it with resampling
            (jump_n_sample > 1): on the bundled digits model, lower-half inpainting recovers the
            true digit for 87% of held-out digits with 50 steps, jumps of 5, 3 passes and w = 10
            (67% without guidance), but only 28% with guidance and no resampling (300 digits).
        class_labels: labels for a class-conditional model; default its null label
            (unconditional) when it has one, else labels drawn from the seed.
    Returns:
        (B, C, H, W) float32 in [-1, 1].
    """
    if reconstruction_guidance != 0 and mask is not None and torch.is_inference_mode_enabled():
        # reconstruction guidance differentiates through the model, which inference_mode forbids:
        # run outside it (as under no_grad), on normal copies of the tensor arguments
        args = {k: v for k, v in locals().items() if k != "args"}
        with torch.inference_mode(False), torch.no_grad():
            return restore(**validate.normal_tensors(args))
    diffusion = diffusion if diffusion is not None else getattr(model, "diffusion", None)
    if diffusion is None:
        raise ValueError("the model carries no diffusion (model.diffusion); pass diffusion=")
    validate.image("image", image)
    b, c, h, w = image.shape
    in_ch, size = getattr(model, "in_channels", None), getattr(model, "image_size", None)
    if (in_ch is not None and c != in_ch) or (size is not None and (h, w) != (size, size)):
        raise ValueError(f"image has shape {tuple(image.shape)} but the model takes "
                         f"({in_ch}, {size}, {size}) images")
    if mask is not None:
        mask = validate.mask("mask", mask, tuple(image.shape))
    if strength is not None:
        strength = validate.number("strength", strength, low=0.0, high=1.0, low_open=True)
    if mask is None and strength is None:
        raise ValueError("give a mask (inpainting) or a strength (restoration of the whole image)")
    if skip is not None and steps not in (None, 50):
        raise ValueError("give either steps or skip, not both")
    seed = validate.seed(seed)
    eta = validate.number("eta", eta, low=0.0, high=1.0)
    if guidance_scale is not None:
        guidance_scale = validate.number("guidance_scale", guidance_scale)
    inpainting = mask is not None
    jump_length = validate.integer("jump_length", jump_length, minimum=1)
    jump_n_sample = validate.integer("jump_n_sample", (3 if inpainting else 1) if jump_n_sample is None
                                     else jump_n_sample, minimum=1)
    reconstruction_guidance = validate.number(
        "reconstruction_guidance", (10.0 if inpainting else 0.0) if reconstruction_guidance is None
        else reconstruction_guidance, low=0.0)
    if reconstruction_guidance and mask is None:
        raise ValueError("reconstruction_guidance needs a mask (the known pixels it pulls towards)")

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    noise_until = check_noise_until(noise_until)
    process = reverse_process(diffusion, steps, skip)
    options = StepOptions(method=method, prediction=diffusion.prediction, variance=diffusion.variance,
                          clip_denoised=clip_denoised, noise_mode=noise, project_noise=project_noise,
                          clip=None if clip is None else (float(clip[0]), float(clip[1])))
    plan = make_plan(process, options, eta, device)
    coef64 = torch.as_tensor(process.coefficients(eta=eta), dtype=torch.float64)
    num = plan.num_steps

    image = image.to(device=device, dtype=torch.float32)
    known = None if mask is None else mask.to(device=device, dtype=torch.float32).expand_as(image)
    seeds = sample_seeds(seed, 0, b, device)
    labels = _restore_labels(model, class_labels, b, seed, device)
    fn = _model_fn(model, labels, guidance_scale, getattr(model, "null_label", None), None, None)
    shape = (c, h, w)

    def q_sample(s: int, stream: int) -> torch.Tensor:
        z = philox.philox_normal(seeds, torch.tensor(stream + s, device=device), shape)
        return plan.coef[s, SQRT_AB] * image + plan.coef[s, SQRT_1M_AB] * z

    current = {}  # the step index s of the step under way (set by before_step, read by cond_fn)

    def keep_known(x: torch.Tensor, s: int) -> torch.Tensor:
        current["s"] = s
        # fresh noise on every pass over a step (RePaint): the stream moves with the passes made
        return x if known is None else known * q_sample(s, _KNOWN_STREAM + visits * num) + (1 - known) * x

    cond_fn = None
    if reconstruction_guidance:
        def cond_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            coef = plan.coef[current["s"]]
            x = x.detach().requires_grad_(True)
            x0 = predicted_x0(x, fn(x, t)[:, :c], coef.expand(b, -1), diffusion.prediction)
            loss = (known * (x0 - image)).square().sum()
            (grad,) = torch.autograd.grad(loss, x)
            return -float(reconstruction_guidance) * coef[SQRT_AB] * grad

    if strength is not None:
        start = max(int(round(float(strength) * num)) - 1, 0)
        x = q_sample(start, _START_STREAM)
    else:
        start = num - 1
        x = philox.initial_noise(seeds, shape)
    if options.clip is not None:
        x = x.clamp(*options.clip)
    plan = with_noise_until(plan, noise_until, start)
    schedule = repaint_schedule(start + 1, jump_length, jump_n_sample)
    visits = 0
    with torch.no_grad():
        for run in _runs(schedule):
            if run[0] == "down":
                # fresh noise ids on every pass over a step (RePaint re-samples)
                run_plan = replace(plan, step_ids=plan.step_ids + visits * num)
                x = reverse_loop(fn, run_plan, x, seeds, steps=run[1], before_step=keep_known,
                                 cond_fn=cond_fn, progress=False, backend=backend)
                visits += 1
            else:
                _, s_from, s_to = run  # forward one step: x_{s_to} ~ q(x_{s_to} | x_{s_from})
                sqrt_alpha = float(coef64[s_to, SQRT_AB] / coef64[s_to, SQRT_AB_PREV])
                z = philox.philox_normal(seeds, torch.tensor(_UNDO_STREAM + visits * num + s_to,
                                                             device=device), shape)
                x = sqrt_alpha * x + (1 - sqrt_alpha ** 2) ** 0.5 * z
    # known pixels exactly (even where x is not finite); fractional mask values blend
    return x if known is None else torch.where(known == 1, image, known * image + (1 - known) * x)


def _restore_labels(model, class_labels, b, seed, device):
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        if class_labels is not None:
            raise ValueError("class_labels were given but the model is not class-conditional")
        return None
    if class_labels is not None:
        return check_class_labels(torch.as_tensor(class_labels).reshape(-1), num_classes, b).to(device)
    null = getattr(model, "null_label", None)
    if null is not None:
        return torch.full((b,), null, dtype=torch.long, device=device)
    return seeded_labels(seed, 0, b, num_classes).to(device)
