"""The `ddpm-fast` command line.

  ddpm-fast info                       backends, versions and the device
  ddpm-fast sample [options]           sample a checkpoint (or the bundled digits model) to
                                       guided-diffusion's npz format and a PNG grid
  ddpm-fast demo                       the main job: 100 digits (10 per class), 250 DDPM steps
  ddpm-fast restore [options]          inpaint / restore a PNG
  ddpm-fast merge DIR                  assemble a sharded run's chunks into one npz

Errors are one line, `ddpm-fast: error: ...`, with exit status 2 (--debug: the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _info(args) -> int:
    import ddpm_fast

    print(f"ddpm_fast {ddpm_fast.__version__}  torch {torch.__version__}  "
          f"CUDA {torch.version.cuda or 'none'}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no GPU visible)"
    print(f"device: {dev}; CPU threads: {torch.get_num_threads()}")
    for name, status in ddpm_fast.backends().items():
        print(f"  {name:7s} {status}")
    return 0


def _load_model(args):
    """(model, description): from --checkpoint/--flags, else the bundled digits model. Checks
    --device first."""
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be a torch device such as 'cpu' or 'cuda:0'; got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is visible (use --device cpu)")
    if getattr(args, "diffusers", None):
        if args.checkpoint or args.flags:
            raise ValueError("--diffusers PATH is a whole model: give it without --checkpoint/--flags")
        from .from_diffusers import from_diffusers

        model, diffusion = from_diffusers(args.diffusers)
        if not diffusion.sample_options()["clip_denoised"]:   # the scheduler's clip_sample=False
            args.no_clip_denoised = True
        return model, f"diffusers model {args.diffusers} ({diffusion.scheduler_class})"
    if args.checkpoint or args.flags:
        from .flags import from_flags

        if not args.flags:
            raise ValueError("--checkpoint needs --flags \"MODEL_FLAGS DIFFUSION_FLAGS\" describing it")
        model, _ = from_flags(args.flags, checkpoint=args.checkpoint)
        return model, f"{args.checkpoint or 'random weights'} ({args.flags})"
    from .pretrained import load_pretrained

    return load_pretrained("digits"), "bundled digits model"


def _balanced_labels(num_samples: int, model) -> torch.Tensor | None:
    """Global sample i gets label i mod K (K real classes), so every class is equally present."""
    if getattr(model, "num_classes", None) is None:
        return None
    real = model.num_classes - (1 if getattr(model, "null_label", None) is not None else 0)
    return torch.arange(num_samples) % real


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    """The model and the sampler's options (shared by sample, demo and restore)."""
    p.add_argument("--checkpoint", help="guided-diffusion checkpoint (.pt or .safetensors)")
    p.add_argument("--flags", help="guided-diffusion MODEL_FLAGS + DIFFUSION_FLAGS of the checkpoint")
    p.add_argument("--diffusers", metavar="PATH",
                   help="a diffusers DDPM model: a pipeline folder (unet/ + scheduler/) or a UNet2DModel "
                        "save_pretrained folder; --steps N then spaces like its scheduler")
    p.add_argument("--steps", default="250",
                   help='respacing: "250", "ddim25", "10,15,20", "quad50", "pow2:50"')
    p.add_argument("--skip", default=None, help="the seed's step skipping K (int) or 'quadratic'")
    p.add_argument("--noise-until", type=int, default=None, metavar="K",
                   help="only the first K reverse steps add noise (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity in [0, 1]")
    p.add_argument("--noise", choices=("normal", "squared", "zero"), default="normal")
    p.add_argument("--project-noise", choices=("pixel", "sample"), default=None)
    p.add_argument("--no-clip-denoised", action="store_true")
    p.add_argument("--clip", type=float, nargs=2, metavar=("LO", "HI"), default=None)
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-cuda-graph", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _add_sampling_args(p: argparse.ArgumentParser, *, num_samples: int, batch_size: int) -> None:
    """sample / demo: the sampler's options, the counts and the outputs."""
    _add_sampler_args(p)
    p.add_argument("--num-samples", type=int, default=num_samples)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--out", default="samples.npz", help="npz: arr_0 uint8 NHWC, arr_1 labels")
    p.add_argument("--grid", default="samples.png", help="PNG grid of the samples ('' for none)")
    p.add_argument("--out-dir", default=None,
                   help="sharded, resumable mode (works under torchrun): chunks + manifest in this "
                        "directory, merged into --out at the end")
    p.add_argument("--chunk-size", type=int, default=batch_size, help="samples per chunk file")
    p.add_argument("--truncate", type=float, default=None, metavar="F",
                   help="start at timestep round(F T) - 1 of the process, F in (0, 1] (e.g. 0.8)")
    p.add_argument("--labels", choices=("balanced", "random"), default="balanced",
                   help="sharded mode: label of sample i is i mod K, or seeded random")
    p.add_argument("--max-chunks", type=int, default=None,
                   help="sharded mode: stop after computing this many chunks per process")
    p.add_argument("--log-ranks", action="store_true", help="sharded mode: per-rank log lines")


def _sampler_options(args) -> dict:
    """ddpm_fast.sample keyword arguments from the command line."""
    skip = None if args.skip is None else (args.skip if args.skip == "quadratic" else int(args.skip))
    return dict(steps=None if skip is not None else args.steps, skip=skip, batch_size=args.batch_size,
                method=args.method, eta=args.eta, noise=args.noise, project_noise=args.project_noise,
                clip_denoised=not args.no_clip_denoised, noise_until=args.noise_until,
                clip=None if args.clip is None else tuple(args.clip),
                guidance_scale=args.guidance_scale, cuda_graph=not args.no_cuda_graph and "auto")


def _sample(args) -> int:
    from .images import save_grid, to_images
    from .sample import sample

    _check_sampling_args(args)
    model, what = _load_model(args)
    model = model.to(args.device).eval()
    options = dict(_sampler_options(args), truncate=args.truncate)
    classifier = _classifier(args)
    if classifier is not None:
        options["cond_fn"] = classifier
    if args.out_dir:
        return _sample_sharded(args, model, options)
    labels = _balanced_labels(args.num_samples, model)
    print(f"sampling {args.num_samples} images from {what}: {args.method}, "
          f"{'skip K=' + str(options['skip']) if options['skip'] is not None else 'steps ' + str(options['steps'])}, "
          f"seed {args.seed}, device {args.device}", file=sys.stderr)
    t0 = time.perf_counter()
    x = sample(model, num_samples=args.num_samples, class_labels=labels, seed=args.seed,
               progress=not args.no_progress, **options)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    images = to_images(x)
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = labels.numpy().astype(np.int64)
    out = Path(args.out)
    np.savez(out, **arrays)
    if args.grid:
        if labels is not None:
            order = torch.argsort(labels, stable=True)
            classes = labels[order].unique_consecutive()
            per_row = int(np.ceil(args.num_samples / len(classes)))
            save_grid(x[order], args.grid, nrow=per_row, row_labels=[str(int(c)) for c in classes])
        else:
            save_grid(x, args.grid)
    print(f"wrote {out} ({images.shape[0]} images {images.shape[1]}x{images.shape[2]}x{images.shape[3]} uint8"
          f"{', labels' if labels is not None else ''})" + (f" and {args.grid}" if args.grid else ""))
    print(f"sampling took {elapsed:.1f} s: {args.num_samples / elapsed:.2f} images/s")
    return 0


def _classifier(args):
    """Classifier guidance as guided-diffusion's classifier_sample.py: when --flags hold
    --classifier_path, the classifier its CLASSIFIER_FLAGS describe (flags.classifier_from_flags),
    loaded from that path, guiding with --classifier_scale (default 1.0). Else None."""
    if not args.flags:
        return None
    from .classifier import classifier_guidance
    from .flags import classifier_from_flags, parse_flags

    parsed = parse_flags(args.flags)
    path = parsed.get("classifier_path")
    if not path:
        return None
    classifier = classifier_from_flags(args.flags, checkpoint=path).to(args.device)
    print(f"classifier guidance: {path}, scale {parsed.get('classifier_scale', 1.0)}", file=sys.stderr)
    return classifier_guidance(classifier, scale=parsed.get("classifier_scale", 1.0))


def _check_sampling_args(args) -> None:
    """Everything of `sample` / `demo` that can be checked before any work: counts, seed, and the
    output files (suffix, not a directory, a writable directory)."""
    from .images import check_image_path
    from .validate import integer, output_file, seed

    integer("--num-samples", args.num_samples, minimum=1)
    integer("--batch-size", args.batch_size, minimum=1)
    integer("--chunk-size", args.chunk_size, minimum=1)
    if args.max_chunks is not None:
        integer("--max-chunks", args.max_chunks, minimum=1)
    seed(args.seed, "--seed")
    output_file("--out", args.out, (".npz",))
    if args.grid:
        check_image_path("--grid", args.grid)
    if args.out_dir and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise ValueError(f"--out-dir {args.out_dir!r} exists and is not a directory")


def _sample_sharded(args, model, options) -> int:
    from .distributed import file_sha256, main_log, sharded_sample

    weights = args.checkpoint
    if getattr(args, "diffusers", None):
        from .from_diffusers import weights_file
        weights = str(weights_file(args.diffusers))
    config = {"flags": args.flags, "checkpoint_sha256": file_sha256(weights),
              **({"diffusers": str(args.diffusers)} if getattr(args, "diffusers", None) else {}),
              "num_samples": args.num_samples, "chunk_size": args.chunk_size, "seed": args.seed,
              "labels": args.labels, "out": args.out, **{k: v for k, v in options.items()
                                                         if k not in ("cuda_graph", "batch_size", "cond_fn")}}
    config["clip"] = None if config["clip"] is None else list(config["clip"])
    t0 = time.perf_counter()
    rank = int(os.environ.get("RANK", "0"))
    stats = sharded_sample(model, out_dir=args.out_dir, num_samples=args.num_samples,
                           chunk_size=args.chunk_size, config=config,
                           sample_kwargs=options, labels=args.labels,
                           seed=args.seed, max_chunks=args.max_chunks,
                           progress=not args.no_progress, log=main_log(rank, args.log_ranks))
    print(f"rank {stats['rank']}/{stats['world_size']}: computed {stats['computed']} chunks, "
          f"skipped {stats['skipped']} finished chunks in {time.perf_counter() - t0:.1f} s", flush=True)
    if stats["merged"] is not None:
        print(f"wrote {stats['merged']}", flush=True)
    elif stats["rank"] == 0 and not stats["finished"]:
        print("not finished: re-run the same command to compute the remaining chunks", flush=True)
    return 0


def _read_png(path: str, channels: int, size: int | None) -> torch.Tensor:
    """A PNG as (1, C, H, W) in [-1, 1] (grey for 1 channel, RGB for 3), resized to the model's
    image_size when it differs."""
    from PIL import Image

    im = Image.open(path).convert("L" if channels == 1 else "RGB")
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy())
    arr = arr[None] if arr.dim() == 2 else arr.permute(2, 0, 1)
    return (arr / 127.5 - 1.0)[None]


def _read_mask(path: str, size: int | None, threshold: int) -> torch.Tensor:
    """A mask PNG as (1, 1, H, W) float32: 1 (known) where its grey value is >= threshold."""
    from PIL import Image

    m = Image.open(path).convert("L")
    if size is not None and m.size != (size, size):
        m = m.resize((size, size), Image.NEAREST)
    return torch.from_numpy((np.asarray(m) >= threshold).astype(np.float32))[None, None]


def _restore(args) -> int:
    from PIL import Image

    from .images import check_image_path, to_images
    from .restore import restore
    from .validate import integer, seed

    out_path = check_image_path("--out", args.out)
    integer("--mask-threshold", args.mask_threshold, minimum=1, maximum=255)
    seed(args.seed, "--seed")
    for name, path in (("--image", args.image), ("--mask", args.mask)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name} {path!r}: no such file")
    model, what = _load_model(args)
    model = model.to(args.device).eval()
    channels, size = model.in_channels, model.image_size
    image = _read_png(args.image, channels, size)
    mask = None if not args.mask else _read_mask(args.mask, size, args.mask_threshold)
    options = _sampler_options(args)
    options.pop("batch_size")
    options.pop("cuda_graph")
    # restore's own defaults (ddpm_fast.restore) unless given on the command line
    extra = {k: v for k, v in (("steps", args.steps), ("jump_length", args.jump_length),
                               ("jump_n_sample", args.jump_n_sample),
                               ("reconstruction_guidance", args.reconstruction_guidance)) if v is not None}
    options.update(extra)
    if options["steps"] is None and options["skip"] is None:
        options.pop("steps")
    t0 = time.perf_counter()
    x = restore(model, image.to(args.device), None if mask is None else mask.to(args.device),
                strength=args.strength, seed=args.seed, **options)
    out = to_images(x)[0]
    Image.fromarray(out[..., 0] if out.shape[-1] == 1 else out).save(out_path)
    print(f"restored {args.image} with {what} in {time.perf_counter() - t0:.1f} s -> {args.out}")
    return 0


def _merge(args) -> int:
    from .distributed import merge
    from .validate import output_file

    if args.out is not None:
        output_file("--out", args.out, (".npz",))
    print(f"wrote {merge(args.dir, args.out)}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `ddpm-fast: error: ...`, exit status 2."""

    def error(self, message: str):
        _print_error(message)
        raise SystemExit(2)


def _print_error(message) -> None:
    text = " ".join(str(message).split())
    print(f"ddpm-fast: error: {text}", file=sys.stderr)


# Errors reported as one line without a traceback (anything else is a bug: traceback).
_USER_ERRORS = (ValueError, TypeError, OSError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status 0. A usage or input error is printed as one
    line `ddpm-fast: error: ...` and exits with status 2 (SystemExit(2), as argparse does) unless
    --debug asks for the traceback."""
    parser = _Parser(prog="ddpm-fast", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="backends, versions and the device").set_defaults(func=_info)
    p = sub.add_parser("sample", help="sample images to an npz and a PNG grid")
    _add_sampling_args(p, num_samples=16, batch_size=16)
    p.set_defaults(func=_sample)
    p = sub.add_parser("demo", help="the main job: 100 digits from the bundled model, 250 DDPM steps")
    _add_sampling_args(p, num_samples=100, batch_size=100)
    p.set_defaults(func=_sample)
    p = sub.add_parser("restore", help="inpaint / restore a PNG with the model")
    _add_sampler_args(p)
    p.add_argument("--out", default="restored.png", help="output PNG")
    p.add_argument("--image", required=True, help="input PNG")
    p.add_argument("--mask", default=None,
                   help="PNG, white (grey >= --mask-threshold) = known pixel, black = generate")
    p.add_argument("--mask-threshold", type=int, default=128, metavar="T",
                   help="grey value (1..255) from which a mask pixel counts as known (default 128)")
    p.add_argument("--strength", type=float, default=None, help="(0, 1]: partial-noise restoration")
    p.add_argument("--jump-length", type=int, default=None, help="RePaint jump length (default 5)")
    p.add_argument("--jump-n-sample", type=int, default=None,
                   help="RePaint passes per jump point (1 = none; default 3 with a mask, else 1)")
    p.add_argument("--reconstruction-guidance", type=float, default=None, metavar="W",
                   help="weight of reconstruction guidance towards the known pixels "
                        "(default 10 with a mask, else 0 = off)")
    p.set_defaults(func=_restore, batch_size=1, steps=None)
    p = sub.add_parser("merge", help="assemble a sharded run's chunks into one npz")
    p.add_argument("dir")
    p.add_argument("--out", default=None, help="default DIR/samples.npz")
    p.set_defaults(func=_merge)
    p = sub.add_parser("bench-report", help="benchmark suite: run it, tabulate results, speed gate",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("ddpm_fast.benchreport", fromlist=["main"]).main(a.rest))
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # also after the subcommand
    args = parser.parse_args([a for a in argv if a != "--debug"])
    try:
        return args.func(args)
    except _USER_ERRORS as exc:
        if debug:
            raise
        _print_error(exc)
        raise SystemExit(2) from None
    except SystemExit as exc:  # a message from a library call (manifest, merge)
        if debug or exc.code is None or isinstance(exc.code, int):
            raise
        _print_error(exc.code)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
