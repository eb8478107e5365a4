"""A compact trainer for ADM U-Nets (improved-DDPM's recipe) and the bundled digits model.

Losses (per sample, averaged over the batch):
  "simple"  the MSE of the model's prediction (eps, x0 or v, per the Diffusion's `prediction`);
  "hybrid"  simple + L_vlb with the mean's gradient stopped (improved-DDPM's L_hybrid): the
            variational bound term sees the model's prediction channels detached and its variance
            channels live; it is the KL between the true posterior q(x_{t-1} | x_t, x_0) and the
            model's p(x_{t-1} | x_t) in bits per dimension, or at t = 0 the discretized Gaussian
            decoder NLL, scaled by num_timesteps / 1000 (lambda = 0.001 on the summed bound).
Timesteps are drawn uniformly; AdamW with a linear learning-rate warm-up; gradient-norm clipping;
an EMA of the weights (decay warm-up min(decay, (1 + step) / (ema_warmup + step))); label
dropout to the null class `num_classes - 1`, so one model samples unconditionally and with
classifier-free guidance.

Gradient accumulation (`grad_accum` N): the loss averaged over N micro-batches of batch_size, one
optimizer step and one EMA update per N (effective batch N * batch_size, in log.jsonl and the
checkpoint). Augmentation (`augment` "flip,rot:DEG", seed 002): horizontal flips with probability
0.5 and rotations uniform in [-DEG, DEG]; the corners a rotation brings in take each image's
background value (the median of its outer ring: -1, blank paper, for the digits). Zero padding
would put 0 there, mid grey in [-1, 1]: a frame the model learns and reproduces (seed 002's black
bezels on faces); a digit rotated by 45 degrees keeps corners of exactly -1 with the background
fill and gets mid-grey corners with zero padding (tests/test_train.py).

Checkpoints (`checkpoint.pt` in the run directory) hold the model, the EMA, the optimizer, the
step, the config and the state of the one generator all the training's random draws come from, so
a resumed run continues exactly as an uninterrupted one would. They are written atomically (a
temporary file, then os.replace).

Function API:   trainer = train(TrainConfig(...), out_dir, minutes=50)
                trainer.export("ddpm_fast/assets", "digits")
Command line:   python -m ddpm_fast.train --out runs/digits --minutes 50 --export ddpm_fast/assets
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import ops
from ._registry import resolve
from .diffusion import Diffusion
from .unet import UNet

LOSSES = ("simple", "hybrid")
UPSAMPLE_MODES = ("bilinear", "nearest")
CHECKPOINT_NAME = "checkpoint.pt"

# The bundled digits model: a class-conditional ADM U-Net at 16x16 with 10 digit classes plus the
# null class 10 of classifier-free guidance; learned variance (out_channels 2) for the hybrid loss.
DIGITS_UNET = dict(image_size=16, in_channels=1, model_channels=32, out_channels=2, num_res_blocks=2,
                   attention_resolutions=(2, 4), dropout=0.0, channel_mult=(1, 2, 2), num_classes=11,
                   num_heads=1, num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=True,
                   resblock_updown=True, use_new_attention_order=False)
DIGITS_DIFFUSION = dict(schedule="cosine", timesteps=1000, variance="learned_range", prediction="epsilon",
                        rescale_timesteps=False)


# ---- data -----------------------------------------------------------------------------------------

def digits_data(image_size: int = 16, upsample: str = "bilinear", holdout: float = 0.2,
                split_seed: int = 0) -> dict:
    """scikit-learn's bundled digits (1797 8x8 grey images, 10 classes; nothing is downloaded),
    upsampled to image_size x image_size and scaled to [-1, 1], with a fixed stratified hold-out.

    Returns a dict of tensors: x_train (N, 1, S, S) float32, y_train (N,) int64, x_test, y_test.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}; got {upsample!r}")
    if not (isinstance(image_size, int) and image_size >= 8 and image_size % 8 == 0):
        raise ValueError(f"image_size must be a multiple of 8 (the digits are 8x8); got {image_size!r}")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must lie in (0, 1); got {holdout!r}")
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]   # (N, 1, 8, 8)
    if image_size != 8:
        kw = dict(align_corners=False) if upsample == "bilinear" else {}
        x = F.interpolate(x, size=(image_size, image_size), mode=upsample, **kw).clamp(-1.0, 1.0)
    y = torch.from_numpy(digits.target.astype(np.int64))
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=holdout, random_state=split_seed,
                                           stratify=digits.target)
    idx_train, idx_test = torch.from_numpy(np.sort(idx_train)), torch.from_numpy(np.sort(idx_test))
    return dict(x_train=x[idx_train].contiguous(), y_train=y[idx_train], x_test=x[idx_test].contiguous(),
                y_test=y[idx_test])


# ---- the variational bound ------------------------------------------------------------------------

def _gather(table: torch.Tensor, idx: torch.Tensor, ndim: int) -> torch.Tensor:
    """table (S,) float64 at idx (B,) -> float32 (B, 1, ..., 1) for broadcasting over `ndim` dims."""
    return table.to(idx.device)[idx].float().reshape(-1, *([1] * (ndim - 1)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor,
                                        bin_width: float = 2.0 / 255.0) -> torch.Tensor:
    """log P(x) elementwise, in nats, for x in [-1, 1] quantized to bins of `bin_width` under
    N(means, exp(log_scales)^2); the edge bins extend to -inf / +inf (exact normal CDF)."""
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (x - means + bin_width / 2)
    lower = inv_std * (x - means - bin_width / 2)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    delta = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12)
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, torch.log(delta)))


def predict_x0(diffusion: Diffusion, x_t: torch.Tensor, idx: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """x_0 from the model's prediction channels (eps, x0 or v per diffusion.prediction)."""
    if diffusion.prediction == "epsilon":
        return (_gather(diffusion.sqrt_recip_alphas_cumprod, idx, x_t.dim()) * x_t
                - _gather(diffusion.sqrt_recipm1_alphas_cumprod, idx, x_t.dim()) * pred)
    if diffusion.prediction == "v":
        return (_gather(diffusion.sqrt_alphas_cumprod, idx, x_t.dim()) * x_t
                - _gather(diffusion.sqrt_one_minus_alphas_cumprod, idx, x_t.dim()) * pred)
    return pred


def q_posterior(diffusion: Diffusion, x0: torch.Tensor, x_t: torch.Tensor, idx: torch.Tensor):
    """Mean and clipped log variance of q(x_{t-1} | x_t, x_0)."""
    nd = x_t.dim()
    mean = (_gather(diffusion.posterior_mean_coef1, idx, nd) * x0
            + _gather(diffusion.posterior_mean_coef2, idx, nd) * x_t)
    return mean, _gather(diffusion.posterior_log_variance_clipped, idx, nd).expand_as(x_t)


def model_log_variance(diffusion: Diffusion, var_out: torch.Tensor | None, idx: torch.Tensor,
                       like: torch.Tensor) -> torch.Tensor:
    """The log variance of p(x_{t-1} | x_t): learned_range interpolates between the clipped
    posterior log variance and log(beta) with frac = (v + 1) / 2; learned is v itself."""
    nd = like.dim()
    if diffusion.variance == "learned_range":
        frac = (var_out + 1) / 2
        return (frac * _gather(torch.log(diffusion.betas), idx, nd)
                + (1 - frac) * _gather(diffusion.posterior_log_variance_clipped, idx, nd))
    if diffusion.variance == "learned":
        return var_out
    table = (diffusion.fixed_large_log_variance if diffusion.variance == "fixed_large"
             else diffusion.posterior_log_variance_clipped)
    return _gather(table, idx, nd).expand_as(like)


def vb_terms_bpd(diffusion: Diffusion, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                 idx: torch.Tensor) -> torch.Tensor:
    """The variational-bound term L_t of each sample, (B,), in bits per dimension: KL(q || p) for
    t > 0 and the decoder NLL -log p(x_0 | x_1) at t = 0. model_output (B, C or 2C, ...) is the
    model's output at (x_t, t) (x_0 is not clipped, as in training)."""
    c = x_t.shape[1]
    pred, var_out = model_output[:, :c], (model_output[:, c:] if diffusion.learned_variance else None)
    true_mean, true_log_var = q_posterior(diffusion, x0, x_t, idx)
    model_mean, _ = q_posterior(diffusion, predict_x0(diffusion, x_t, idx, pred), x_t, idx)
    log_var = model_log_variance(diffusion, var_out, idx, x_t)
    dims = tuple(range(1, x_t.dim()))
    kl = normal_kl(true_mean, true_log_var, model_mean, log_var).mean(dim=dims) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_var).mean(dim=dims) / math.log(2.0)
    return torch.where(idx == 0, nll, kl)


def training_losses(model, diffusion: Diffusion, x0: torch.Tensor, idx: torch.Tensor, noise: torch.Tensor,
                    y: torch.Tensor | None = None, loss: str = "hybrid") -> dict:
    """Per-sample losses (B,) at step indices idx: {"loss", "mse"} and "vb" for the hybrid loss."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}; got {loss!r}")
    if loss == "hybrid" and not diffusion.learned_variance:
        raise ValueError("loss='hybrid' needs a learned variance (variance 'learned_range' or 'learned')")
    x_t = diffusion.q_sample(x0, idx, noise)
    out = model(x_t, diffusion.model_timesteps(idx), y)
    c = x0.shape[1]
    pred = out[:, :c]
    if diffusion.prediction == "epsilon":
        target = noise
    elif diffusion.prediction == "x0":
        target = x0
    else:  # v = sqrt(ab) eps - sqrt(1 - ab) x0
        target = (_gather(diffusion.sqrt_alphas_cumprod, idx, x0.dim()) * noise
                  - _gather(diffusion.sqrt_one_minus_alphas_cumprod, idx, x0.dim()) * x0)
    terms = {"mse": (pred - target).pow(2).mean(dim=tuple(range(1, x0.dim())))}
    terms["loss"] = terms["mse"]
    if loss == "hybrid":
        frozen = torch.cat([pred.detach(), out[:, c:]], dim=1)   # the mean learns from the MSE only
        terms["vb"] = vb_terms_bpd(diffusion, frozen, x0, x_t, idx) * (diffusion.num_timesteps / 1000.0)
        terms["loss"] = terms["mse"] + terms["vb"]
    return terms


# ---- augmentation ---------------------------------------------------------------------------------

def parse_augment(spec: str) -> tuple[bool, float]:
    """An augmentation spec -> (flip, max rotation in degrees).

    spec: "" (none) or comma-separated items "flip" (horizontal flip with probability 0.5) and
    "rot:DEG" (rotation by an angle uniform in [-DEG, DEG], 0 < DEG <= 180), e.g. "flip,rot:10".
    Raises ValueError naming `augment` for anything else."""
    if not isinstance(spec, str):
        raise TypeError(f"augment must be a str like 'flip,rot:10'; got {type(spec).__name__}")
    flip, degrees = False, 0.0
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item == "flip" and not flip:
            flip = True
            continue
        if item.startswith("rot:") and not degrees:
            try:
                degrees = float(item[len("rot:"):])
            except ValueError:
                degrees = float("nan")
            if 0.0 < degrees <= 180.0:
                continue
        raise ValueError(f"augment must be '', 'flip', 'rot:DEG' or 'flip,rot:DEG' (0 < DEG <= 180, each "
                         f"item once); got {spec!r}")
    return flip, degrees


def background_value(x: torch.Tensor) -> torch.Tensor:
    """Each image's background value, (B, C, 1, 1): the median of its outermost ring of pixels (the
    digits: -1, their blank paper)."""
    ring = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)
    return ring.median(dim=-1).values[..., None, None]


def rotate(x: torch.Tensor, degrees: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate images x (B, C, H, W) counter-clockwise by `degrees` (B,) about their centre (bilinear).
    Pixels that come from outside the image take `fill` (B, C, 1, 1) (default: background_value,
    so a rotated digit keeps its blank paper in the corners; a fill of 0 would be mid grey in
    [-1, 1]), blended with the image at its edge like any other neighbour."""
    fill = background_value(x) if fill is None else fill
    theta = torch.deg2rad(degrees.to(x.dtype))
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    # output pixel (u, v) reads input (cos u - sin v, sin u + cos v) in normalised coordinates
    # (v pointing down), which turns the picture counter-clockwise as seen on screen
    affine = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], -2)
    grid = F.affine_grid(affine, list(x.shape), align_corners=False)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def draw_augmentation(batch: int, spec: str, generator: torch.Generator, device=None):
    """The random choices of `spec` (parse_augment) for a batch: (flips (B,) bool or None, angles
    (B,) float32 degrees or None). A flip has probability 0.5 (one uniform draw per sample); an
    angle is uniform in [-DEG, DEG] (one uniform draw per sample). No draws for a spec of ""."""
    flip, degrees = parse_augment(spec)
    flips = angles = None
    if flip:
        flips = torch.rand(batch, generator=generator, device=device) < 0.5
    if degrees:
        angles = (torch.rand(batch, generator=generator, device=device) * 2 - 1) * degrees
    return flips, angles


def augment(x: torch.Tensor, spec: str, generator: torch.Generator) -> torch.Tensor:
    """x (B, C, H, W) with `spec`'s draws (draw_augmentation) applied: the flipped samples mirrored
    left-right, then every sample rotated by its angle (rotate, background fill)."""
    flips, angles = draw_augmentation(x.shape[0], spec, generator, x.device)
    if flips is not None:
        x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    if angles is not None:
        x = rotate(x, angles)
    return x


# ---- checkpoints ----------------------------------------------------------------------------------

def atomic_save(obj, path) -> None:
    """torch.save(obj) to `path` through a temporary file in the same directory and os.replace:
    `path` is either its old content or the complete new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- the trainer ----------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Everything a run depends on (saved in every checkpoint and in the exported JSON)."""
    unet: dict = field(default_factory=lambda: dict(DIGITS_UNET))
    diffusion: dict = field(default_factory=lambda: dict(DIGITS_DIFFUSION))
    loss: str = "hybrid"
    lr: float = 3e-4
    lr_warmup: int = 200            # steps of linear learning-rate warm-up (0 = none)
    weight_decay: float = 0.0
    batch_size: int = 64
    ema_decay: float = 0.999
    ema_warmup: int = 10            # decay at step s: min(ema_decay, (1 + s) / (ema_warmup + s)); 0 = off
    grad_clip: float = 1.0          # max gradient norm (0 = off)
    label_dropout: float = 0.1      # probability of replacing the label by the null class
    seed: int = 0
    image_size: int = 16
    upsample: str = "bilinear"
    holdout: float = 0.2
    checkpoint_every: int = 500
    log_every: int = 50
    grad_accum: int = 1             # micro-batches of batch_size per optimizer step (effective batch N * batch_size)
    augment: str = ""               # "flip", "rot:DEG" or "flip,rot:DEG" (parse_augment); "" = none

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}; got {self.loss!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1); got {self.ema_decay}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1); got {self.label_dropout}")
        if self.label_dropout > 0 and not self.unet.get("num_classes"):
            raise ValueError("label_dropout needs a class-conditional model (unet num_classes >= 2)")
        if not isinstance(self.grad_accum, int) or isinstance(self.grad_accum, bool) or self.grad_accum < 1:
            raise ValueError(f"grad_accum must be an int >= 1 (micro-batches per optimizer step); "
                             f"got {self.grad_accum!r}")
        parse_augment(self.augment)

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step: batch_size * grad_accum."""
        return self.batch_size * self.grad_accum

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def build_unet(unet_kwargs: dict, **extra) -> UNet:
    """The UNet of a config (extra: UNet keyword options such as backend)."""
    return UNet(**unet_kwargs, **extra)


def fused_by_default(device) -> bool:
    """Whether training runs on the fused ops by default on `device`: when every op has a fused
    kernel there (each has its fused backward on every backend), else the reference ops do."""
    device = torch.device(device)
    return all(resolve(op, "auto", device) != "torch" for op in ops.__all__)


class Trainer:
    """One training run: model, EMA, optimizer, step, RNG states; `fit` runs it, `save` checkpoints.

    Args:
        config: the TrainConfig.
        out_dir: where checkpoint.pt and log.jsonl go (None: nowhere, e.g. in tests).
        data: (x (N, C, H, W) in [-1, 1], y (N,) int64) to train on; default digits_data(config).
        device: the torch device.
        fused: run the model's forward and backward on the fused ops (backend "auto", fast
            paths on) instead of the pure-PyTorch reference ops (backend "torch"); default
            `fused_by_default(device)`. Losses, gradients and the EMA agree between the two to
            float32 rounding (tests/test_train.py); not part of the config or the checkpoint.
    """

    def __init__(self, config: TrainConfig, out_dir=None, data=None, device="cpu", fused: bool | None = None):
        config.validate()
        self.config = config
        self.device = torch.device(device)
        self.out_dir = None if out_dir is None else Path(out_dir)
        if data is None:
            d = digits_data(config.image_size, config.upsample, config.holdout)
            data = (d["x_train"], d["y_train"])
        self.x, self.y = data[0].to(self.device), data[1].to(self.device)
        self.diffusion = Diffusion(**config.diffusion)
        self.fused = fused_by_default(self.device) if fused is None else bool(fused)
        with torch.random.fork_rng(devices=[]):          # the initial weights, global RNG untouched
            torch.manual_seed(config.seed)
            self.model = build_unet(config.unet, backend="auto" if self.fused else "torch").to(self.device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        # every random draw of training (batches, timesteps, noise, label dropout, dropout seeds)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.step = 0
        self.elapsed = 0.0                                   # training seconds over all sessions
        self.num_classes = config.unet.get("num_classes")

    # -- one optimisation step --
    def _batch(self):
        """One micro-batch (x0, y, idx, noise) of config.batch_size drawn from the run's generator:
        data rows, augmentation (config.augment; no draws when off), timesteps, noise, label dropout."""
        g, b = self.generator, self.config.batch_size
        pick = torch.randint(0, self.x.shape[0], (b,), generator=g, device=self.device)
        x0, y = self.x[pick], self.y[pick]
        if self.config.augment:
            x0 = augment(x0, self.config.augment, g)
        idx = torch.randint(0, self.diffusion.num_timesteps, (b,), generator=g, device=self.device)
        noise = torch.randn(x0.shape, generator=g, device=self.device)
        if self.num_classes is None:
            y = None
        elif self.config.label_dropout > 0:
            drop = torch.rand(b, generator=g, device=self.device) < self.config.label_dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes - 1), y)
        return x0, y, idx, noise

    def accumulate_gradients(self) -> dict:
        """Zero the gradients, then for each of config.grad_accum micro-batches backpropagate its
        batch-mean loss / grad_accum: the gradients are those of the mean loss over all
        grad_accum * batch_size samples. Returns each loss term's mean over those samples (floats)."""
        cfg = self.config
        devices = [self.device] if self.device.type == "cuda" else []
        self.opt.zero_grad(set_to_none=True)
        sums: dict = {}
        for _ in range(cfg.grad_accum):
            x0, y, idx, noise = self._batch()
            # the model's own randomness (dropout) is seeded from the run's generator, so a resumed
            # run repeats it and the global RNG is left alone
            dropout_seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.generator, device=self.device))
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(dropout_seed)
                terms = training_losses(self.model, self.diffusion, x0, idx, noise, y, cfg.loss)
                (terms["loss"].mean() / cfg.grad_accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach().mean())
        return {k: v / cfg.grad_accum for k, v in sums.items()}

    def train_step(self) -> dict:
        """One AdamW step on config.grad_accum fresh micro-batches (one EMA update); returns the
        mean losses over them as floats. All micro-batches of a step run inside this call and an
        interruption during them rewinds the run's generator, so a checkpoint always holds the state
        between two optimizer steps: a run interrupted mid-accumulation restarts that accumulation
        cleanly on resume and continues exactly as an uninterrupted run."""
        cfg = self.config
        rng = self.generator.get_state()
        try:
            out = self.accumulate_gradients()
        except BaseException:
            # interrupted mid-accumulation: nothing was applied; rewind the draws so a checkpoint
            # written now resumes by redoing this step's accumulation whole
            self.generator.set_state(rng)
            self.opt.zero_grad(set_to_none=True)
            raise
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                     if cfg.grad_clip > 0 else torch.tensor(float("nan")))
        lr = cfg.lr * min(1.0, (self.step + 1) / cfg.lr_warmup) if cfg.lr_warmup > 0 else cfg.lr
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.step += 1
        self._update_ema()
        out.update(lr=lr, grad_norm=float(grad_norm))
        return out

    @torch.no_grad()
    def _update_ema(self) -> None:
        cfg = self.config
        decay = cfg.ema_decay
        if cfg.ema_warmup > 0:
            decay = min(decay, (1 + self.step) / (cfg.ema_warmup + self.step))
        ema_p, p = list(self.ema.parameters()), list(self.model.parameters())
        torch._foreach_lerp_(ema_p, p, 1.0 - decay)
        for eb, b in zip(self.ema.buffers(), self.model.buffers()):
            eb.copy_(b)

    # -- checkpoints --
    def state_dict(self) -> dict:
        return dict(model=self.model.state_dict(), ema=self.ema.state_dict(), opt=self.opt.state_dict(),
                    step=self.step, elapsed=self.elapsed, config=dataclasses.asdict(self.config),
                    effective_batch=self.config.effective_batch, generator=self.generator.get_state())

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
        self.generator.set_state(state["generator"].cpu())

    def save(self, path=None) -> Path:
        """Atomically write the checkpoint (default out_dir/checkpoint.pt)."""
        if path is None:
            if self.out_dir is None:
                raise ValueError("path is required when the trainer has no out_dir")
            path = self.out_dir / CHECKPOINT_NAME
        atomic_save(self.state_dict(), path)
        return Path(path)

    @classmethod
    def resume(cls, path, out_dir=None, data=None, device="cpu", fused: bool | None = None) -> "Trainer":
        """A trainer continuing the checkpoint at `path` exactly where it stopped."""
        state = torch.load(path, map_location=device, weights_only=False)
        trainer = cls(TrainConfig.from_dict(state["config"]), out_dir=out_dir, data=data, device=device,
                      fused=fused)
        trainer.load_state_dict(state)
        return trainer

    # -- the loop --
    def fit(self, steps: int | None = None, minutes: float | None = None, progress: bool = True) -> dict:
        """Train until `steps` total steps or `minutes` of wall time in this call (whichever comes
        first; at least one must be given), checkpointing every config.checkpoint_every steps and
        at the end. Returns {"step", "elapsed", "loss" (mean of the last log interval), ...}."""
        if steps is None and minutes is None:
            raise ValueError("give steps (a total step count) or minutes (a wall-time budget)")
        cfg = self.config
        deadline = None if minutes is None else time.monotonic() + 60.0 * minutes
        log = None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.out_dir / "log.jsonl", "a")
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=self.step, disable=not progress, dynamic_ncols=True,
                   desc="train", mininterval=5.0)
        sums, count, last = {}, 0, {}
        try:
            while (steps is None or self.step < steps) and (deadline is None or time.monotonic() < deadline):
                t0 = time.monotonic()
                terms = self.train_step()
                self.elapsed += time.monotonic() - t0
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or count == 1 and self.step == 1:
                    last = {k: v / count for k, v in sums.items()}
                    bar.set_postfix(loss=f"{last['loss']:.4f}", mse=f"{last['mse']:.4f}")
                    if log is not None:
                        log.write(json.dumps(dict(step=self.step, elapsed=round(self.elapsed, 1),
                                                  effective_batch=cfg.effective_batch, **last)) + "\n")
                        log.flush()
                    sums, count = {}, 0
                if self.out_dir is not None and self.step % cfg.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
            if self.out_dir is not None:
                self.save()
            if log is not None:
                log.close()
        if count and not last:
            last = {k: v / count for k, v in sums.items()}
        self.last_losses = last
        return dict(step=self.step, elapsed=self.elapsed, **last)

    def _final_losses(self) -> dict:
        """The losses of the last logged interval (this session's, else the run log's last line)."""
        last = getattr(self, "last_losses", None)
        if not last and self.out_dir is not None and (self.out_dir / "log.jsonl").exists():
            lines = (self.out_dir / "log.jsonl").read_text().splitlines()
            last = json.loads(lines[-1]) if lines else {}
        return {k: round(float(last[k]), 5) for k in ("loss", "mse", "vb") if k in (last or {})}

    # -- the bundle --
    def export(self, directory, name: str, extra: dict | None = None) -> tuple[Path, Path]:
        """Write the EMA weights to <directory>/<name>.safetensors and <name>.json (UNet kwargs,
        Diffusion options, guided-diffusion flags, the null label, training facts)."""
        from safetensors.torch import save_file
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.ema.state_dict().items()}
        st_path, json_path = directory / f"{name}.safetensors", directory / f"{name}.json"
        save_file(weights, str(st_path))
        cfg = self.config
        unet = dict(cfg.unet)
        unet["attention_resolutions"] = list(unet["attention_resolutions"])
        unet["channel_mult"] = list(unet["channel_mult"])
        meta = dict(
            name=name, unet=unet, diffusion=dict(cfg.diffusion),
            num_classes=unet.get("num_classes"),
            null_label=None if not unet.get("num_classes") else unet["num_classes"] - 1,
            flags=guided_diffusion_flags(cfg.unet, cfg.diffusion),
            data=dict(source="sklearn.datasets.load_digits", image_size=cfg.image_size, upsample=cfg.upsample,
                      holdout=cfg.holdout, range=[-1, 1]),
            training=dict(steps=self.step, seconds=round(self.elapsed, 1), loss=cfg.loss, lr=cfg.lr,
                          batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                          effective_batch=cfg.effective_batch, augment=cfg.augment,
                          ema_decay=cfg.ema_decay, label_dropout=cfg.label_dropout,
                          seed=cfg.seed, final_losses=self._final_losses(), **(extra or {})),
        )
        json_path.write_text(json.dumps(meta, indent=2) + "\n")
        return st_path, json_path


def guided_diffusion_flags(unet: dict, diffusion: dict) -> str:
    """The MODEL_FLAGS + DIFFUSION_FLAGS of guided-diffusion's scripts for these settings
    (attention_resolutions there are resolutions: image_size // downsample rate). guided-diffusion's
    class_cond fixes 1000 classes: num_classes is carried separately in the bundle's JSON."""
    size = unet["image_size"]
    res = ",".join(str(size // r) for r in sorted(unet["attention_resolutions"]))
    mult = ",".join(str(m) for m in unet["channel_mult"])
    flags = dict(image_size=size, num_channels=unet["model_channels"], num_res_blocks=unet["num_res_blocks"],
                 attention_resolutions=res, channel_mult=mult, dropout=unet.get("dropout", 0.0),
                 class_cond=unet.get("num_classes") is not None,
                 learn_sigma=diffusion["variance"] in ("learned_range", "learned"),
                 num_heads=unet.get("num_heads", 1), num_head_channels=unet.get("num_head_channels", -1),
                 num_heads_upsample=unet.get("num_heads_upsample", -1),
                 use_scale_shift_norm=unet.get("use_scale_shift_norm", False),
                 resblock_updown=unet.get("resblock_updown", False),
                 use_new_attention_order=unet.get("use_new_attention_order", False),
                 diffusion_steps=diffusion["timesteps"], noise_schedule=diffusion["schedule"],
                 predict_xstart=diffusion["prediction"] == "x0", rescale_timesteps=diffusion["rescale_timesteps"],
                 use_kl=False, rescale_learned_sigmas=diffusion["variance"] == "learned_range")
    return " ".join(f"--{k} {v}" for k, v in flags.items())


def train(config: TrainConfig | None = None, out_dir=None, steps: int | None = None,
          minutes: float | None = None, resume: bool = True, progress: bool = True,
          device="cpu", fused: bool | None = None) -> Trainer:
    """Run (or, when out_dir holds a checkpoint and resume is True, continue) a training run;
    returns the Trainer (its `ema` holds the weights to ship)."""
    ckpt = None if out_dir is None else Path(out_dir) / CHECKPOINT_NAME
    if resume and ckpt is not None and ckpt.exists():
        trainer = Trainer.resume(ckpt, out_dir=out_dir, device=device, fused=fused)
    else:
        trainer = Trainer(config or TrainConfig(), out_dir=out_dir, device=device, fused=fused)
    trainer.fit(steps=steps, minutes=minutes, progress=progress)
    return trainer


def export_checkpoint(path, directory, name: str) -> tuple[Path, Path]:
    """Export the EMA weights of the checkpoint at `path` as <directory>/<name>.safetensors/.json."""
    return Trainer.resume(path, out_dir=Path(path).parent).export(directory, name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, log.jsonl); resumed if present")
    p.add_argument("--minutes", type=float, default=None, help="wall-time budget of this call")
    p.add_argument("--steps", type=int, default=None, help="total step count to stop at")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if --out has a checkpoint")
    p.add_argument("--export", default=None, help="directory to write <name>.safetensors and <name>.json into")
    p.add_argument("--name", default="digits", help="bundle name for --export")
    p.add_argument("--export-only", action="store_true", help="export --out's checkpoint without training")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="forward and backward on the fused ops (default: on where every op has a fused "
                        "kernel for --device); --no-fused: the pure-PyTorch reference ops")
    d = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("unet", "diffusion"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(d, f.name)), default=getattr(d, f.name))
    p.add_argument("--model-channels", type=int, default=DIGITS_UNET["model_channels"])
    p.add_argument("--num-res-blocks", type=int, default=DIGITS_UNET["num_res_blocks"])
    p.add_argument("--dropout", type=float, default=DIGITS_UNET["dropout"])
    args = p.parse_args(argv)
    if args.export_only:
        if not args.export:
            p.error("--export-only needs --export DIR")
        for path in export_checkpoint(Path(args.out) / CHECKPOINT_NAME, args.export, args.name):
            print(f"wrote {path}")
        return 0
    if args.steps is None and args.minutes is None:
        p.error("give --minutes and/or --steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                         if f.name not in ("unet", "diffusion")})
    cfg.unet.update(model_channels=args.model_channels, num_res_blocks=args.num_res_blocks, dropout=args.dropout)
    trainer = train(cfg, args.out, steps=args.steps, minutes=args.minutes, resume=not args.no_resume,
                    progress=not args.quiet, device=args.device, fused=args.fused)
    print(json.dumps(dict(step=trainer.step, elapsed_s=round(trainer.elapsed, 1))))
    if args.export:
        for path in trainer.export(args.export, args.name):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
