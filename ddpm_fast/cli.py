"""The `ddpm-fast` command line.

  ddpm-fast info                       backends, versions and the device
  ddpm-fast sample [options]           sample a checkpoint (or the bundled digits model) to
                                       guided-diffusion's npz format and a PNG grid
  ddpm-fast demo                       the main job: 100 digits (10 per class), 250 DDPM steps
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
    """(model, description): from --checkpoint/--flags, else the bundled digits model."""
    if args.checkpoint or args.flags:
        from .flags import from_flags

        if not args.flags:
            raise SystemExit("--checkpoint needs --flags \"MODEL_FLAGS DIFFUSION_FLAGS\" describing it")
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
    p.add_argument("--steps", default="250", help='respacing: "250", "ddim25", "10,15,20"')
    p.add_argument("--skip", default=None, help="the seed's step skipping K (int) or 'quadratic'")
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
                clip_denoised=not args.no_clip_denoised,
                clip=None if args.clip is None else tuple(args.clip),
                guidance_scale=args.guidance_scale, cuda_graph=not args.no_cuda_graph and "auto")


def _sample(args) -> int:
    from .images import save_grid, to_images
    from .sample import sample

    if args.num_samples < 1:
        raise SystemExit("--num-samples must be >= 1")
    model, what = _load_model(args)
    model = model.to(args.device).eval()
    options = _sampler_options(args)
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
    out.parent.mkdir(parents=True, exist_ok=True)
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


def _sample_sharded(args, model, options) -> int:
    from .distributed import file_sha256, main_log, sharded_sample

    config = {"flags": args.flags, "checkpoint_sha256": file_sha256(args.checkpoint),
              "num_samples": args.num_samples, "chunk_size": args.chunk_size, "seed": args.seed,
              "labels": args.labels, "out": args.out, **{k: v for k, v in options.items()
                                                         if k != "cuda_graph"}}
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


def _restore(args) -> int:
    from PIL import Image

    from .images import to_images
    from .restore import restore

    model, what = _load_model(args)
    model = model.to(args.device).eval()
    channels, size = model.in_channels, model.image_size
    image = _read_png(args.image, channels, size)
    mask = None
    if args.mask:
        from PIL import Image as _Image

        m = _Image.open(args.mask).convert("L")
        if m.size != (size, size):
            m = m.resize((size, size), _Image.NEAREST)
        mask = torch.from_numpy((np.asarray(m) >= 128).astype(np.float32))[None, None]
    options = _sampler_options(args)
    options.pop("batch_size")
    options.pop("cuda_graph")
    t0 = time.perf_counter()
    x = restore(model, image.to(args.device), None if mask is None else mask.to(args.device),
                strength=args.strength, jump_length=args.jump_length, jump_n_sample=args.jump_n_sample,
                reconstruction_guidance=args.reconstruction_guidance, seed=args.seed, **options)
    out = to_images(x)[0]
    Image.fromarray(out[..., 0] if out.shape[-1] == 1 else out).save(args.out)
    print(f"restored {args.image} with {what} in {time.perf_counter() - t0:.1f} s -> {args.out}")
    return 0


def _merge(args) -> int:
    from .distributed import merge

    print(f"wrote {merge(args.dir, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddpm-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
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
    p.add_argument("--mask", default=None, help="PNG, white (>= 128) = known pixel, black = generate")
    p.add_argument("--strength", type=float, default=None, help="(0, 1]: partial-noise restoration")
    p.add_argument("--jump-length", type=int, default=10, help="RePaint jump length")
    p.add_argument("--jump-n-sample", type=int, default=1, help="RePaint resamplings (1 = none)")
    p.add_argument("--reconstruction-guidance", type=float, default=0.0, metavar="W",
                   help="weight of reconstruction guidance towards the known pixels (e.g. 10; 0 = off)")
    p.set_defaults(func=_restore, batch_size=1)
    p = sub.add_parser("merge", help="assemble a sharded run's chunks into one npz")
    p.add_argument("dir")
    p.add_argument("--out", default=None, help="default DIR/samples.npz")
    p.set_defaults(func=_merge)
    p = sub.add_parser("bench-report", help="benchmark suite: run it, tabulate results, speed gate",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("ddpm_fast.benchreport", fromlist=["main"]).main(a.rest))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
