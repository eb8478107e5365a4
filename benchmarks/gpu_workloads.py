"""The GPU workloads of `make gpu-check` (benchmarks/gpu_check.py), run in their own process:

  kernels   one small run of every CUDA C++ and Triton kernel (GroupNorm + scale-shift + SiLU in
            NCHW and channels_last, fp32 and fp16; attention in both qkv layouts; the DDPM/DDIM
            step with in-kernel noise, learned variance and both noise projections, on a shape
            small enough for one program and one that needs several), each checked against
            ddpm_fast.reference so the run is a real one: the program compute-sanitizer watches.
  e2e       the bundled digits model on the GPU: sample() with the whole-loop CUDA graph equals
            sample() eager for the same seed (the capture's own result, a replay, and a replay with
            a new seed), and eval_digits' quality figures for the given settings; --json PATH.

    python benchmarks/gpu_workloads.py kernels [--device cuda]
    python benchmarks/gpu_workloads.py e2e --json e2e.json --settings ddpm:250,ddim:50
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import ddpm_fast
from ddpm_fast import graphs, ops, philox, reference
from ddpm_fast.diffusion import Diffusion


def gpu_backends(device: str) -> list[str]:
    """The kernel backends usable on `device` ("cuda" and/or "triton"), none when it is the CPU."""
    if not device.startswith("cuda"):
        return []
    return [b for b in ("cuda", "triton") if ddpm_fast.backends()[b]]


def _check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = (got.float() - want.float()).abs().max().item()
    if not err <= tol:  # NaN fails too
        raise AssertionError(f"{name}: max |kernel - reference| = {err:.3g} > {tol}")


def run_group_norm(backend: str, device: str) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
        for channels_last in (False, True):
            x = torch.randn(2, 64, 8, 8, device=device, generator=gen).to(dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            w, b = (torch.randn(64, device=device, generator=gen) for _ in range(2))
            scale, shift = (torch.randn(2, 64, device=device, generator=gen) for _ in range(2))
            got = ops.group_norm_scale_shift(x, 32, w, b, scale, shift, 1e-5, True, backend=backend)
            want = reference.group_norm_scale_shift(x, 32, w, b, scale, shift, 1e-5, True)
            _check(f"group_norm_scale_shift[{backend}, {dtype}, channels_last={channels_last}]",
                   got, want, tol)


def run_attention(backend: str, device: str) -> None:
    gen = torch.Generator(device=device).manual_seed(1)
    for dtype, tol in ((torch.float32, 1e-3), (torch.float16, 5e-3)):
        for layout in ("legacy", "new"):
            qkv = torch.randn(2, 3 * 2 * 32, 80, device=device, generator=gen).to(dtype)  # 2 heads of 32
            got = ops.attention(qkv, 2, layout, backend=backend)
            _check(f"attention[{backend}, {dtype}, {layout}]", got, reference.attention(qkv, 2, layout), tol)


def run_diffusion_step(backend: str, device: str) -> None:
    process = Diffusion("cosine", 1000, variance="learned_range").respace("10")
    gen = torch.Generator(device=device).manual_seed(2)
    # (2,3,8,8): one program per sample; (2,3,48,48): several (multi-block sums of the projection)
    for shape in ((2, 3, 8, 8), (2, 3, 48, 48)):
        x = torch.randn(shape, device=device, generator=gen)
        out = torch.randn(shape[0], 2 * shape[1], *shape[2:], device=device, generator=gen).clamp(-1, 1)
        seed = torch.arange(shape[0], device=device)
        steps = torch.tensor([5, 5], device=device)
        for method, eta, project in (("ddpm", 0.0, None), ("ddim", 1.0, "sample"), ("ddim", 1.0, "pixel")):
            coef = process.gather_coefficients(steps, eta)
            kw = dict(method=method, variance="learned_range", project_noise=project)
            got, x0 = ops.diffusion_step(x, out, coef, seed=seed, step=7, backend=backend, **kw)
            noise = philox.philox_normal(seed, 7, shape[1:])   # the pure-PyTorch draw
            want, want_x0 = reference.diffusion_step(x, out, coef, noise, **kw)
            name = f"diffusion_step[{backend}, {method}, project={project}, {tuple(shape)}]"
            _check(name, got, want, 1e-4)
            _check(name + " x0", x0, want_x0, 1e-4)


def kernels(device: str = "cuda") -> list[str]:
    """Run every kernel once on `device`; returns the names of what ran. Raises on a mismatch."""
    ran = []
    for backend in gpu_backends(device):
        for fn in (run_group_norm, run_attention, run_diffusion_step):
            fn(backend, device)
            ran.append(f"{fn.__name__[4:]}[{backend}]")
    torch.cuda.synchronize()
    return ran


def graph_vs_eager(model, labels: torch.Tensor, steps: str = "50") -> dict:
    """sample() eager vs with the whole-loop CUDA graph, DDIM eta 1 (fresh noise every step):
    the capture's result and a replay for seed 0, and a replay for seed 1, each against eager."""
    kw = dict(steps=f"ddim{steps}", method="ddim", eta=1.0, class_labels=labels,
              batch_size=labels.numel(), progress=False)
    graphs.clear_cache()
    diffs = {}
    for seed, name in ((0, "capture"), (0, "replay"), (1, "replay_new_seed")):
        graph = ddpm_fast.sample(model, seed=seed, cuda_graph=True, **kw)
        eager = ddpm_fast.sample(model, seed=seed, cuda_graph=False, **kw)
        diffs[name] = (graph - eager).abs().max().item()
    return {"graph_max_abs_diff": max(diffs.values()), "graph_diffs": diffs,
            "graph_cache_size": graphs.cache_size(),
            # same kernels in the same order on the same inputs: equal up to float reassociation
            "graph_equals_eager": all(d <= 1e-4 for d in diffs.values())
            and graphs.cache_size() == 1}


def e2e(settings: list[str], num_samples: int = 1000) -> dict:
    from ddpm_fast.eval_digits import DigitClassifier, evaluate

    model = ddpm_fast.load_pretrained("digits", device="cuda")
    labels = torch.arange(100, device="cuda") % 10
    t0 = time.monotonic()
    result = graph_vs_eager(model, labels)
    result["graph_seconds"] = round(time.monotonic() - t0, 1)
    classifier = DigitClassifier(model.image_size,
                                 model.pretrained_config.get("data", {}).get("upsample", "bilinear"))
    result["quality"] = {}
    for setting in settings:
        r = evaluate(model, setting, num_samples, classifier=classifier)
        r.pop("images")
        result["quality"][setting] = {k: r[k] for k in ("accuracy", "confidence", "diversity",
                                                          "num_samples", "sample_seconds")}
        print(f"{setting}: accuracy {r['accuracy']:.4f} confidence {r['confidence']:.4f} "
              f"diversity {r['diversity']:.3f} ({r['sample_seconds']} s)", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--device", default="cuda")
    e = sub.add_parser("e2e")
    e.add_argument("--json", required=True)
    e.add_argument("--settings", default="ddpm:250,ddim:50")
    e.add_argument("--samples", type=int, default=1000)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU is visible", file=sys.stderr)
        return 2
    if args.what == "kernels":
        ran = kernels(args.device)
        if not ran:
            print("no GPU kernel backend is available", file=sys.stderr)
            return 1
        print("ran: " + ", ".join(ran))
        return 0
    result = e2e([s for s in args.settings.split(",") if s], args.samples)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
