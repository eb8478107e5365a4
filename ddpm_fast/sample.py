"""ddpm_fast.sample: the mission's entry point.

    images = ddpm_fast.sample(model, steps=250)

Builds the plan (respaced float64 tables -> per-step float32 device tensors), draws x_T from the
counter-based generator (sample i of seed s is the same image whatever the batch it sits in),
and runs the static reverse loop: eagerly on the CPU, or captured whole into one CUDA graph on a
GPU (graphs.py).
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Sequence

import torch

from . import graphs, validate
from .diffusion import check_class_labels, guided_model_output, validate_step_options
from .loop import (StepOptions, check_noise_until, initial_noise, make_plan, reverse_loop, reverse_process,
                   start_noise_scale, with_noise_until)

SEED_BITS = 32


def sample_seeds(seed: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-sample int64 seeds (count,) of global sample indices start .. start+count-1 under base
    `seed`: seed * 2^32 + index (two's complement), so every (seed, index) pair has its own noise
    stream. seed must lie in [-2^31, 2^31) and the indices in [0, 2^32) (ddpm_fast.validate: a
    clear error outside, never an alias); seeds in [0, 2^31) keep the images they always had."""
    seed = validate.seed(seed)
    validate.sample_range(start, count)
    return (seed << SEED_BITS) + torch.arange(start, start + count, dtype=torch.int64, device=device)


def _check_labels(class_labels, num_classes):
    """Validate user labels once: a class-conditional model, integer labels in range."""
    if class_labels is None:
        return None
    if num_classes is None:
        raise ValueError("class_labels were given but the model is not class-conditional "
                         "(num_classes is None)")
    return check_class_labels(class_labels, num_classes)


def seeded_labels(seed: int, start: int, count: int, num_classes: int) -> torch.Tensor:
    """Labels of global sample indices start .. start+count-1 when the user gives none: uniform
    over num_classes, a function of (seed, index) alone so batching does not change them."""
    g = torch.Generator().manual_seed(int(seed) % (1 << 62))
    return torch.randint(0, num_classes, (start + count,), generator=g)[start:]


def _model_fn(model, labels, guidance_scale, null_label, dtype, model_kwargs):
    """The per-step model call (x, t) -> float32 output: labels go in as y, classifier-free
    guidance (diffusion.guided_model_output: one call on the doubled batch) when guidance_scale
    is set, inputs cast to `dtype` for a reduced-precision model."""
    kwargs = dict(model_kwargs or {})
    if labels is not None:
        kwargs["y"] = labels

    def call_model(x, t, **kw):
        return model(x if dtype is None else x.to(dtype), t, **kw)

    def call(x, t):
        return guided_model_output(call_model, x, t, kwargs, guidance_scale, null_label).float()

    return call


def sample(model: torch.nn.Module, steps: int | str | Sequence[int] | None = 250, *, diffusion=None,
           shape: Sequence[int] | None = None, batch_size: int = 1, num_samples: int | None = None,
           class_labels=None, method: str = "ddpm", eta: float = 0.0, stochasticity: float | None = None,
           noise: str = "normal", project_noise: str | None = None, clip_denoised: bool = True,
           clip: tuple[float, float] | None = None, dynamic_threshold: tuple[float, float] | None = None,
           skip: int | str | None = None, noise_until: int | None = None, truncate: float | None = None,
           cond_fn: Callable | None = None, guidance_scale: float | None = None,
           null_label: int | None = None, x_T: torch.Tensor | None = None, seed: int | None = None,
           generator: torch.Generator | None = None, progress: bool = True,
           cuda_graph: bool | str = "auto", dtype: torch.dtype | None = None,
           return_x0: bool = False, model_kwargs: dict | None = None, start_index: int = 0,
           backend: str = "auto"):
    """Sample images from a diffusion model.

    Args:
        model: a ddpm_fast.UNet (carries `model.diffusion`) or any nn.Module predicting the
            diffusion's output from (x, t, y=labels) — then pass `diffusion=`.
        steps: respacing of the diffusion: an int or "250", "ddim25", "10,15,20", a list of
            timesteps, or None for every step.
        diffusion: the (unrespaced) ddpm_fast.Diffusion; default model.diffusion.
        shape: (C, H, W) of one sample; default from the model's in_channels and image_size.
        batch_size: samples per model call. num_samples: total samples (default: batch_size,
            or the length of class_labels / x_T), produced batch by batch.
        class_labels: (N,) labels for a class-conditional model; default: drawn from the seed.
        method: "ddpm" or "ddim"; eta (alias stochasticity) in [0, 1] for DDIM.
        noise: the seed's noise stddev mode, "normal", "squared" or "zero".
        project_noise: None, "pixel" or "sample" (the seed's noise projection).
        clip_denoised: clamp predicted x0 to [-1, 1]. clip: (lo, hi) clamps x_T and every x_t.
        dynamic_threshold: (ratio, max_value): Imagen's dynamic thresholding of the predicted x0
            instead of clip_denoised's clamp (per sample: s = clamp(ratio-quantile of |x0|, 1,
            max_value), x0 = clamp(x0, -s, s) / s; diffusers' `thresholding`); None: off.
        skip: the seed's step skipping K (an int >= 1) or "quadratic", instead of steps.
        noise_until: k >= 0: only the first k reverse steps add noise, later ones add none
            (DDPM: the posterior mean; DDIM: its eta's direction term kept); None (or k >= the
            number of steps): every step as configured; 0: no step noise (seed 003).
        truncate: fraction in (0, 1]: run only the first round(fraction * T) timesteps of the
            diffusion (respaced by `steps` / `skip`), from an x_T drawn with the noise stddev
            sqrt(1 - alpha_bar) of the timestep it starts at (seed 004: the last 20% of a linear
            schedule's timesteps carry almost no signal). A given x_T is used as it is.
        cond_fn: classifier guidance, cond_fn(x, t, y=labels, **model_kwargs) -> grad (eager only).
        guidance_scale: classifier-free guidance scale s (needs a model trained with a null
            label; `null_label` defaults to model.null_label).
        x_T: (N, C, H, W) starting noise; default drawn from the per-sample seeds.
        seed: base seed (int); default drawn from `generator` / torch's global generator.
            Sample i uses the noise streams of (seed, start_index + i).
        progress: tqdm bar over steps (eager), or over batches when there are several.
        cuda_graph: "auto" (whole-loop CUDA graph for CUDA models when possible; a failed
            capture warns once and samples eagerly), True (a failed capture raises) or False.
            Captured loops are cached per model (ddpm_fast.graphs: at most cache_limit() per
            model, clear_cache()) and recaptured when the model's weights or layout change.
        dtype: the model's input dtype (e.g. torch.float16 for a converted model).
        return_x0: also return the final predicted x0.
        model_kwargs: extra keyword arguments of every model call (and of cond_fn). A tensor
            with num_samples rows is split into batches like class_labels; other values are
            passed whole. In a captured loop the tensors are static inputs (new values replay,
            a new shape or dtype recaptures).
        backend: op backend of the fused steps ("auto", "torch", "cpu", "cuda", "triton").
    Returns:
        (N, C, H, W) float32 tensor in [-1, 1] (with clip_denoised), plus the final x0 when
        return_x0.
    """
    if cond_fn is not None and (torch.is_inference_mode_enabled() or torch.is_grad_enabled()):
        # classifier guidance differentiates through cond_fn (the loop enables grad for that call
        # alone); everything else runs under no_grad as without cond_fn, and outside
        # inference_mode, which forbids autograd: on normal copies of the tensor arguments
        args = {k: v for k, v in locals().items() if k != "args"}
        with torch.inference_mode(False), torch.no_grad():
            return sample(**validate.normal_tensors(args))
    diffusion = diffusion if diffusion is not None else getattr(model, "diffusion", None)
    if diffusion is None:
        raise ValueError("the model carries no diffusion (model.diffusion); pass diffusion=")
    if stochasticity is not None:
        eta = validate.number("stochasticity", stochasticity, low=0.0, high=1.0)
    eta = validate.number("eta", eta, low=0.0, high=1.0)
    validate.choice("method", method, ("ddpm", "ddim"))
    batch_size = validate.integer("batch_size", batch_size, minimum=1)
    if num_samples is not None:
        num_samples = validate.integer("num_samples", num_samples, minimum=0)
    if seed is not None:
        seed = validate.seed(seed)
    validate.integer("start_index", start_index, minimum=0)
    dtype = validate.float_dtype("dtype", dtype)
    if guidance_scale is not None:
        guidance_scale = validate.number("guidance_scale", guidance_scale)
    if x_T is not None:
        validate.finite_tensor("x_T", x_T, dims=4, what=" (N, C, H, W)")
        if shape is None and (getattr(model, "in_channels", None) is None
                              or getattr(model, "image_size", None) is None):
            shape = tuple(x_T.shape[1:])
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict or None; got {type(model_kwargs).__name__}")
    if model_kwargs and model_kwargs.get("y") is not None and getattr(model, "num_classes", None) is not None:
        # the labels of a class-conditional model, given the guided-diffusion way: used as
        # class_labels (validated, split into batches), never replaced by seeded labels
        if class_labels is not None:
            raise ValueError("give the labels once: class_labels or model_kwargs['y'], not both")
        model_kwargs = dict(model_kwargs)
        class_labels = model_kwargs.pop("y")
    if cuda_graph not in ("auto", True, False):
        raise ValueError(f"cuda_graph must be 'auto', True or False; got {cuda_graph!r}")
    if skip is not None and steps not in (None, 250):
        raise ValueError("give either steps or skip (the seed's K step skipping), not both")
    noise_until = check_noise_until(noise_until)
    process = reverse_process(diffusion, steps, skip, truncate)
    x_T_scale = start_noise_scale(diffusion, truncate)
    options = StepOptions(method=method, prediction=diffusion.prediction, variance=diffusion.variance,
                          clip_denoised=clip_denoised, noise_mode=noise, project_noise=project_noise,
                          clip=None if clip is None else (float(clip[0]), float(clip[1])),
                          dynamic_threshold=validate_step_options(dynamic_threshold=dynamic_threshold)[
                              "dynamic_threshold"])

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    in_ch = getattr(model, "in_channels", None)
    image_size = getattr(model, "image_size", None)
    num_classes = getattr(model, "num_classes", None)
    model_null = getattr(model, "null_label", None)
    if shape is None:
        if in_ch is None or image_size is None:
            raise ValueError("shape=(C, H, W) is needed: the model has no in_channels/image_size")
        shape = (in_ch, image_size, image_size)
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (C, H, W); got {shape}")
    if in_ch is not None and shape[0] != in_ch:
        raise ValueError(f"shape {shape} has {shape[0]} channels but the model takes {in_ch}")
    if image_size is not None and shape[1:] != (image_size, image_size):
        raise ValueError(f"shape {shape} does not match the model's image_size {image_size}")
    class_labels = _check_labels(class_labels, num_classes)
    if x_T is not None:
        if x_T.dim() != 4 or tuple(x_T.shape[1:]) != shape:
            raise ValueError(f"x_T must have shape (N, {', '.join(map(str, shape))}); "
                             f"got {tuple(x_T.shape)}")
        num_samples = x_T.shape[0] if num_samples is None else num_samples
    if class_labels is not None and num_samples is None:
        num_samples = class_labels.numel()
    num_samples = batch_size if num_samples is None else int(num_samples)
    for name, t in (("x_T", x_T), ("class_labels", class_labels)):
        if t is not None and t.shape[0] != num_samples:
            raise ValueError(f"{name} holds {t.shape[0]} samples but {num_samples} are asked for")
    if guidance_scale is not None:
        null_label = model_null if null_label is None else null_label
        if null_label is None or num_classes is None:
            raise ValueError("guidance_scale needs a class-conditional model with a null label "
                             "(model.null_label or null_label=)")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    validate.sample_range(start_index, num_samples)
    if num_samples == 0:
        empty = torch.empty((0, *shape), device=device)
        return (empty, empty.clone()) if return_x0 else empty

    # the plan on the host first: its digest (the graph cache's key) costs no device sync
    plan = with_noise_until(make_plan(process, options, eta, "cpu"), noise_until)
    use_graph = _use_graph(cuda_graph, device, cond_fn)
    plan_digest = plan.digest() if use_graph else None
    plan = plan.to(device)
    kw_tensors, kw_values = _split_model_kwargs(model_kwargs)
    real_classes = None if num_classes is None else (
        num_classes - 1 if model_null is not None else num_classes)
    batches = range(0, num_samples, batch_size)
    many = len(batches) > 1
    if many and progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="sampling", unit="batch")

    def loop(plan, seeds, x_T=None, labels=None, **kw_inputs):
        # everything a captured graph reads comes in through the arguments (static inputs and
        # the plan it owns) or is the model's; nothing here makes a tensor from a host value
        x = initial_noise(seeds, shape, options.clip, x_T_scale, step=plan.initial_step) if x_T is None else (
            x_T if options.clip is None else x_T.clamp(*options.clip))
        kwargs = {**kw_values, **{k[len(_KW):]: v for k, v in kw_inputs.items()}}
        fn = _model_fn(model, labels, guidance_scale, null_label, dtype, kwargs)
        guide = None
        if cond_fn is not None:
            kw = dict(kwargs)
            if labels is not None:
                kw.setdefault("y", labels)
            guide = lambda x, t: cond_fn(x, t, **kw)  # noqa: E731
        return reverse_loop(fn, plan, x, seeds, cond_fn=guide, return_x0=return_x0,
                            progress=progress and not many and not use_graph, backend=backend)

    outs = []
    for start in batches:
        b = min(batch_size, num_samples - start)
        inputs = {"seeds": sample_seeds(seed, start_index + start, b, device)}
        if x_T is not None:
            inputs["x_T"] = x_T[start:start + b].to(device=device, dtype=torch.float32)
        if num_classes is not None:
            inputs["labels"] = (class_labels[start:start + b] if class_labels is not None else
                                seeded_labels(seed, start_index + start, b, real_classes)).to(device)
        for name, t in kw_tensors.items():  # per-sample tensors are split like the labels
            inputs[_KW + name] = (t[start:start + b] if t.dim() and t.shape[0] == num_samples else t).to(device)
        captured = None
        if use_graph:
            key = (b, shape, dtype, plan_digest, options, guidance_scale, null_label, return_x0, backend,
                   x_T_scale, _values_key(kw_values),
                   tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(inputs.items())))
            captured, new = _captured_loop(model, key, loop, plan, inputs, device, cuda_graph)
        with torch.no_grad():
            if captured is None:
                outs.append(loop(plan, **inputs))
            else:
                outs.append(captured.first_result if new else captured(**inputs))
    if return_x0:
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    return torch.cat(outs)


_KW = "model_kwargs."  # the static-input names of model_kwargs tensors


def _split_model_kwargs(model_kwargs) -> tuple[dict, dict]:
    """model_kwargs -> (its tensors: static inputs of a captured loop, the other values)."""
    kwargs = dict(model_kwargs or {})
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in kwargs.items() if k not in tensors}


def _values_key(values: dict) -> tuple:
    """The non-tensor model_kwargs as part of a graph's key (repr where a value is unhashable)."""
    out = []
    for k, v in sorted(values.items()):
        try:
            hash(v)
        except TypeError:
            v = ("repr", repr(v))
        out.append((k, v))
    return tuple(out)


def _captured_loop(model, key, loop, plan, inputs, device, cuda_graph):
    """(the cached or newly captured loop for key, was_new), or (None, False) to run eagerly:
    with cuda_graph="auto" a failed capture warns once and is not tried again (True raises)."""
    if cuda_graph != "auto" or not graphs.failed_before(model, key):
        def build():
            # the graph reads this call's plan: the captured loop owns it from now on
            return graphs.CapturedLoop(functools.partial(loop, plan), {k: v.clone() for k, v in inputs.items()},
                                       owned=plan.tensors(), device=device)
        try:
            with torch.no_grad():
                return graphs.cached(model, key, build)
        except Exception as error:  # noqa: BLE001 (any capture failure falls back to eager)
            if cuda_graph is True:
                raise
            graphs.capture_failed(model, key, error)
    return None, False


def _use_graph(cuda_graph, device, cond_fn) -> bool:
    if cuda_graph is False:
        return False
    if not graphs.capturable(device):
        if cuda_graph is True:
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device; it is on {device}")
        return False
    if cond_fn is not None:
        if cuda_graph is True:
            warnings.warn("cuda_graph=True ignored: classifier guidance (cond_fn) needs autograd, "
                          "which a CUDA graph cannot replay; sampling eagerly", stacklevel=3)
        return False
    return True
