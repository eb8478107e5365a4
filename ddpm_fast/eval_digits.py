"""Sample quality of the digits model, judged by a classifier trained on the real digits.

For one sampler setting it draws class-conditional samples (balanced over the 10 digits),
downsamples them 16x16 -> 8x8 (2x2 average, the data's own resolution) and reports:
  accuracy    fraction of samples an SVC trained on real digits classifies as their intended label;
  confidence  mean predicted probability (Platt-calibrated SVC) of the intended label;
  diversity   mean over classes of (mean pairwise L2 distance among the class's samples) /
              (the same among the class's real digits): 1 = as varied as the data, 0 = collapsed.
The classifier trains on the data's training split (the same 16x16 round trip as the model's
data) and is checked on the hold-out split (`classifier_accuracy`); nothing is cached.

    python -m ddpm_fast.eval_digits                       # DDPM 250 and DDIM 50 (eta 0), 1000 samples each
    python -m ddpm_fast.eval_digits --setting ddim:25 --samples 100 --grid samples.png
    python -m ddpm_fast.eval_digits --setting ddim:K8:eta=1:noise=zero --setting ddim:K8:eta=1:project=sample
    python -m ddpm_fast.eval_digits --setting ddpm:250:until=75 --setting ddim:quad50 --setting ddim:50:truncate=0.8
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from .train import digits_data

NUM_DIGITS = 10
DEFAULT_SETTINGS = ("ddpm:250", "ddim:50")


def to_8x8(images: torch.Tensor) -> np.ndarray:
    """(B, 1, S, S) images in [-1, 1] -> (B, 64) float64 at the digits' 8x8 resolution (area average)."""
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[-1] % 8 or images.shape[-2] != images.shape[-1]:
        raise ValueError(f"images must be (B, 1, S, S) with S a multiple of 8; got {tuple(images.shape)}")
    x = images.detach().float().cpu().clamp(-1, 1)
    if x.shape[-1] != 8:
        x = F.avg_pool2d(x, x.shape[-1] // 8)
    return x.reshape(x.shape[0], 64).double().numpy()


class DigitClassifier:
    """An RBF SVC on 8x8 digits in [-1, 1] with Platt-calibrated (sigmoid) probabilities.

    Trained on the training split of `digits_data(image_size, upsample)` taken back to 8x8, so the
    real digits it sees went through the same 16x16 round trip as the model's training data."""

    def __init__(self, image_size: int = 16, upsample: str = "bilinear", holdout: float = 0.2):
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import SVC

        data = digits_data(image_size, upsample, holdout)
        self.x_train, self.y_train = to_8x8(data["x_train"]), data["y_train"].numpy()
        self.x_test, self.y_test = to_8x8(data["x_test"]), data["y_test"].numpy()
        self.svc = CalibratedClassifierCV(SVC(C=10.0, gamma="scale"), method="sigmoid", ensemble=False)
        self.svc.fit(self.x_train, self.y_train)
        self.classifier_accuracy = float((self.svc.predict(self.x_test) == self.y_test).mean())

    def real(self, label: int) -> np.ndarray:
        """All real digits (both splits) of one class, (N, 64)."""
        x = np.concatenate([self.x_train, self.x_test])
        y = np.concatenate([self.y_train, self.y_test])
        return x[y == label]

    def predict_proba(self, x8: np.ndarray) -> np.ndarray:
        """(B, 64) -> (B, 10) class probabilities."""
        return self.svc.predict_proba(x8)


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean L2 distance over all pairs of rows of x (N, D), N >= 2."""
    t = torch.from_numpy(np.asarray(x, dtype=np.float64))
    return float(torch.pdist(t).mean())


def sample_digits(model, labels: torch.Tensor, seed: int = 0, guidance_scale: float | None = None,
                  **sampler) -> torch.Tensor:
    """Class-conditional samples (B, C, H, W) in [-1, 1] of `model` (which carries model.diffusion)
    for labels (B,): the ONE place the evaluation calls a sampler, ddpm_fast.sample with the
    keyword arguments `sampler` (method, steps or skip, eta, noise, project_noise,
    noise_until, truncate: see parse_setting), per-sample noise streams from `seed`."""
    from .sample import sample

    with torch.no_grad():
        return sample(model, class_labels=labels, batch_size=labels.shape[0], seed=seed,
                      guidance_scale=guidance_scale, progress=False, **sampler)


# setting keys -> (ddpm_fast.sample keyword, parser)
_SETTING_KEYS = {"eta": ("eta", float), "noise": ("noise", str), "project": ("project_noise", str),
                 "until": ("noise_until", int), "truncate": ("truncate", float)}
_SETTING_HELP = ("a setting looks like 'ddpm:250', 'ddim:50', 'ddim:50:eta=1', "
                 "'ddim:K8:eta=1:noise=zero:project=sample' (K8 = the seed's step skipping K = 8), "
                 "'ddim:quad50' or 'ddim:pow2:50' (spacings denser near x0), 'ddpm:100:until=30' or "
                 "'ddim:50:truncate=0.8' (keys: eta, noise=normal|squared|zero, project=pixel|sample, "
                 "until=K noise in the first K steps only, truncate=F start at F T)")


def parse_setting(setting: str) -> dict:
    """A sampler setting -> the keyword arguments of ddpm_fast.sample it stands for.

    'METHOD:SPACING[:key=value...]': METHOD ddpm or ddim; SPACING N (respaced to N steps, DDIM with
    guided-diffusion's 'ddimN' spacing), KN (the seed's step skipping K = N), quadN (the DDIM
    code's quadratic spacing) or powP:N (the power family, Diffusion.respace); keys eta, noise
    (normal|squared|zero), project (pixel|sample), until (noise_until, an int) and truncate (a
    fraction), e.g. 'ddim:K8:eta=1:noise=zero', 'ddpm:250:until=75', 'ddim:50:truncate=0.8'."""
    parts = setting.split(":") if isinstance(setting, str) else []
    if len(parts) < 2 or parts[0] not in ("ddpm", "ddim"):
        raise ValueError(f"{_SETTING_HELP}; got {setting!r}")
    method, spacing, keys = parts[0], parts[1], parts[2:]
    out: dict = {"method": method}
    try:
        if spacing[:1] == "K":
            count = int(spacing[1:])
            out.update(steps=None, skip=count)
        elif spacing.startswith("quad"):
            count = int(spacing[len("quad"):])
            out["steps"] = spacing
        elif spacing.startswith("pow"):
            power, count = float(spacing[len("pow"):]), int(keys[0])
            if not 0 < power < float("inf"):
                raise ValueError
            out["steps"] = f"{spacing}:{count}"
            keys = keys[1:]
        else:
            count = int(spacing)
            out["steps"] = f"ddim{count}" if method == "ddim" else str(count)
        if count < 1:
            raise ValueError
        for item in keys:
            key, value = item.split("=")
            name, kind = _SETTING_KEYS[key]
            out[name] = kind(value)
    except (ValueError, KeyError, IndexError):
        raise ValueError(f"{_SETTING_HELP}; got {setting!r}") from None
    return out


def evaluate(model, setting: str = "ddpm:250", num_samples: int = 1000, eta: float = 0.0,
             guidance_scale: float | None = None, seed: int = 0, batch_size: int = 500,
             classifier: DigitClassifier | None = None) -> dict:
    """Accuracy, confidence and diversity of `num_samples` class-conditional samples (labels
    0..9 in turn) drawn with `setting` ('ddpm:250', 'ddim:50', ...). Returns a dict of floats
    plus per-class accuracies and the sampling time."""
    if num_samples < 2 * NUM_DIGITS:
        raise ValueError(f"num_samples must be >= {2 * NUM_DIGITS} (two per digit for the diversity); got {num_samples}")
    sampler = parse_setting(setting)
    if eta and "eta" not in sampler:
        sampler["eta"] = eta
    classifier = classifier or DigitClassifier(model.image_size)
    labels = torch.arange(num_samples) % NUM_DIGITS
    t0 = time.monotonic()
    chunks = [sample_digits(model, labels[i:i + batch_size], seed + i, guidance_scale, **sampler)
              for i in range(0, num_samples, batch_size)]
    seconds = time.monotonic() - t0
    x8 = to_8x8(torch.cat(chunks))
    proba = classifier.predict_proba(x8)
    lab = labels.numpy()
    predicted = classifier.svc.classes_[proba.argmax(1)]
    correct = predicted == lab
    ratios, per_class = [], {}
    for c in range(NUM_DIGITS):
        mine = lab == c
        per_class[c] = float(correct[mine].mean())
        ratios.append(mean_pairwise_distance(x8[mine]) / mean_pairwise_distance(classifier.real(c)))
    return dict(setting=setting, eta=sampler.get("eta", 0.0), guidance_scale=guidance_scale, num_samples=num_samples,
                accuracy=float(correct.mean()), confidence=float(proba[np.arange(len(lab)), lab].mean()),
                diversity=float(np.mean(ratios)), per_class_accuracy=per_class,
                classifier_accuracy=classifier.classifier_accuracy, sample_seconds=round(seconds, 1),
                images=torch.cat(chunks))


def save_grid(images: torch.Tensor, path, per_row: int = NUM_DIGITS) -> None:
    """Save (B, 1, H, W) images in [-1, 1] as a PNG grid."""
    from PIL import Image

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    b, h, w = x.shape
    rows = (b + per_row - 1) // per_row
    grid = torch.zeros(rows * h, per_row * w, dtype=torch.uint8)
    for i in range(b):
        r, c = divmod(i, per_row)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = x[i]
    Image.fromarray(grid.numpy()).resize((per_row * w * 4, rows * h * 4), Image.NEAREST).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.eval_digits", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits", help="bundled model name (ddpm_fast.load_pretrained)")
    p.add_argument("--setting", action="append", help=f"repeatable; {_SETTING_HELP} "
                   f"(default {' and '.join(DEFAULT_SETTINGS)})")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta of settings that give none")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--grid", default=None, help="save the first 100 samples of the last setting as a PNG")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .pretrained import load_pretrained

    model = load_pretrained(args.model)
    classifier = DigitClassifier(model.image_size, model.pretrained_config.get("data", {}).get("upsample", "bilinear"))
    print(f"classifier hold-out accuracy: {classifier.classifier_accuracy:.4f}")
    results = []
    for setting in args.setting or DEFAULT_SETTINGS:
        r = evaluate(model, setting, args.samples, args.eta, args.guidance_scale, args.seed, args.batch_size,
                     classifier)
        images = r.pop("images")
        results.append(r)
        print(f"{setting:>24}: accuracy {r['accuracy']:.4f}  confidence {r['confidence']:.4f}  "
              f"diversity {r['diversity']:.3f}  ({r['num_samples']} samples, {r['sample_seconds']} s)")
    print("\n| setting | samples | classified as their label | mean confidence | diversity ratio | seconds |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| `{r['setting']}` | {r['num_samples']} | {100 * r['accuracy']:.1f}% | {r['confidence']:.3f} | "
              f"{r['diversity']:.3f} | {r['sample_seconds']} |")
    if args.grid:
        save_grid(images[:100], args.grid)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
