"""The GPU workloads of `make gpu-check` (benchmarks/gpu_check.py), run in their own process:

  kernels   one small run of every CUDA C++ and Triton kernel (GroupNorm + scale-shift + SiLU in
            NCHW and channels_last, fp32 and fp16; attention in both qkv layouts; the DDPM/DDIM
            step with in-kernel noise, learned variance and both noise projections, on a shape
            small enough for one program and one that needs several), each checked against
            ddpm_fast.reference so the run is a real one: the program compute-sanitizer watches.
  bandwidth issue 17's kernel targets, timed (best of --reps, CUDA events) with the cuda backend:
            GroupNorm + scale-shift + SiLU on (16,256,64,64) fp16, NCHW and channels_last (AdaGN's
            scale/shift as emb_out.chunk(2, 1) views), bytes moved (x read twice, y written, the
            parameters) / time >= 85% of the device's peak memory bandwidth (2 x memory clock x bus
            width, or --peak-gbs); the plain DDIM step (eta 1, in-kernel noise) on (64,3,256,256)
            fp16 <= 1.3x a device copy of the same bytes (x and eps read, x_prev and pred_x0
            written: a copy of 2 x numel elements), and the "sample" projection over the plain
            step. Reported (met / MISSED) in the JSON and on stdout; exit status 0 either way.
            The 32 MiB GroupNorm input fits an H100/H200's L2, so its second read may hit the cache.
  attention issue 17's attention target: ops.attention (cuda: the tensor-core kernel) at B 8, 8
            heads of 64, T 256 / 1024 / 4096, fp16, qkv T-contiguous and channel-contiguous, timed
            against F.scaled_dot_product_attention's flash backend on contiguous q, k, v:
            >= 0.9x, reported (met / MISSED) with TFLOP/s; --json PATH.
  e2e       the bundled digits model on the GPU: sample() with the whole-loop CUDA graph equals
            sample() eager for the same seed (the capture's own result, a replay, and a replay with
            a new seed), and eval_digits' quality figures for the given settings; --json PATH.

    python benchmarks/gpu_workloads.py kernels [--device cuda]
    python benchmarks/gpu_workloads.py bandwidth [--json bandwidth.json] [--peak-gbs 4800]
    python benchmarks/gpu_workloads.py attention [--json attention.json]
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
    """fp32 (the scalar kernel) and fp16 / bf16 (the tensor-core kernel, cp.async and ldmatrix under
    the sanitizer), qkv T-contiguous and channel-contiguous, T = 80 (partial tiles)."""
    gen = torch.Generator(device=device).manual_seed(1)
    for dtype, tol in ((torch.float32, 1e-3), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)):
        for layout in ("legacy", "new"):
            for order in ("t", "c"):
                qkv = torch.randn(2, 3 * 2 * 32, 80, device=device, generator=gen).to(dtype)  # 2 heads of 32
                if order == "c":  # the channels_last view: (B, T, 3C) memory
                    qkv = qkv.transpose(1, 2).contiguous().transpose(1, 2)
                got = ops.attention(qkv, 2, layout, backend=backend)
                _check(f"attention[{backend}, {dtype}, {layout}, {order}]", got,
                       reference.attention(qkv, 2, layout), tol)


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


# ---- issue 17: bandwidth targets of the GroupNorm and step kernels --------------------------------

GN_TARGET_PEAK_PERCENT = 85.0   # GroupNorm (16,256,64,64) fp16, both layouts: >= 85% of peak bandwidth
STEP_TARGET_OVER_COPY = 1.3     # step (64,3,256,256) fp16: <= 1.3x a copy of the same bytes


def peak_bandwidth_gbs(device: str = "cuda") -> float:
    """The datasheet memory bandwidth of the device: 2 (double data rate) x memory clock x bus width
    (H100 SXM: 2 x 2.619 GHz x 5120 bit = 3.35 TB/s; H200: 4.8 TB/s)."""
    props = torch.cuda.get_device_properties(device)
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 / 1e9


def best_seconds(fn, reps: int = 50, warmup: int = 5) -> float:
    """Best (minimum) time of fn() in seconds over `reps` runs, each between two CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def _verdict(value: float, limit: float, kind: str) -> str:
    return "met" if (value >= limit if kind == "min" else value <= limit) else "MISSED"


def bandwidth(device: str = "cuda", peak_gbs: float | None = None, reps: int = 50) -> dict:
    """Issue 17's targets for the cuda backend (see the module docstring); returns the figures."""
    peak = peak_gbs or peak_bandwidth_gbs(device)
    gen = torch.Generator(device=device).manual_seed(17)
    result = {"device": torch.cuda.get_device_name(device), "peak_GB/s": peak, "targets": []}

    n, c, h, w = 16, 256, 64, 64
    x = torch.randn(n, c, h, w, device=device, generator=gen).half()
    weight, bias = torch.randn(2, c, device=device, generator=gen)
    scale, shift = (0.5 * torch.randn(n, 2 * c, device=device, generator=gen)).half().chunk(2, 1)
    for layout in ("nchw", "channels_last"):
        xl = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x

        def gn(xl=xl):
            return ops.group_norm_scale_shift(xl, 32, weight, bias, scale, shift, 1e-5, True, backend="cuda")

        _check(f"bandwidth group_norm[{layout}]", gn(),
               reference.group_norm_scale_shift(xl, 32, weight, bias, scale, shift, 1e-5, True), 2e-2)
        nbytes = 3 * xl.numel() * xl.element_size() + sum(
            t.numel() * t.element_size() for t in (weight, bias, scale, shift))
        seconds = best_seconds(gn, reps)
        gbs = nbytes / seconds / 1e9
        percent = 100 * gbs / peak
        result[f"group_norm_{layout}"] = {"seconds": seconds, "GB/s": gbs, "%peak": percent}
        result["targets"].append({"what": f"GroupNorm (16,256,64,64) fp16 {layout}: % of peak bandwidth",
                                  "value": percent, "limit": GN_TARGET_PEAK_PERCENT, "kind": "min",
                                  "verdict": _verdict(percent, GN_TARGET_PEAK_PERCENT, "min")})

    shape = (64, 3, 256, 256)
    xs = torch.randn(shape, device=device, generator=gen).half()
    eps = torch.randn(shape, device=device, generator=gen).half()
    process = Diffusion("cosine", 1000).respace("ddim50")
    coef = process.gather_coefficients(torch.full((shape[0],), 25, device=device), 1.0)
    seed = torch.arange(shape[0], device=device)
    step = torch.tensor(7, device=device)
    same_bytes = torch.empty(2 * xs.numel(), device=device, dtype=xs.dtype)
    copy_dst = torch.empty_like(same_bytes)
    t_copy = best_seconds(lambda: copy_dst.copy_(same_bytes), reps)
    times = {}
    for project in (None, "sample"):
        def stp(project=project):
            return ops.diffusion_step(xs, eps, coef, seed=seed, step=step, method="ddim",
                                      project_noise=project, backend="cuda")
        got, x0 = stp()
        noise = philox.philox_normal(seed, 7, shape[1:])
        want, want_x0 = reference.diffusion_step(xs, eps, coef, noise, method="ddim", project_noise=project)
        _check(f"bandwidth diffusion_step[project={project}]", got, want, 2e-2)
        times[str(project)] = best_seconds(stp, reps)
    ratio = times["None"] / t_copy
    result["step"] = {"seconds": times["None"], "copy_same_bytes_seconds": t_copy, "over_copy": ratio,
                      "sample_projection_seconds": times["sample"],
                      "sample_over_plain": times["sample"] / times["None"]}
    result["targets"].append({"what": "step (64,3,256,256) fp16: time / copy of the same bytes",
                              "value": ratio, "limit": STEP_TARGET_OVER_COPY, "kind": "max",
                              "verdict": _verdict(ratio, STEP_TARGET_OVER_COPY, "max")})
    return result


# ---- issue 17: the tensor-core attention kernel vs SDPA's flash backend ---------------------------

ATTENTION_TARGET_VS_SDPA = 0.9  # B 8, 8 heads of 64, T 256 / 1024 / 4096, fp16: >= 0.9x SDPA (flash)
ATTENTION_CASES = ((8, 8, 64, 256), (8, 8, 64, 1024), (8, 8, 64, 4096))


def attention_speed(device: str = "cuda", reps: int = 30) -> dict:
    """ops.attention (cuda backend: the mma.sync kernel) on qkv (B, 3C, T) in both stride orders
    (T-contiguous: the NCHW conv output; channel-contiguous: the channels_last view unet.py passes),
    against F.scaled_dot_product_attention restricted to its flash backend on contiguous
    (B, heads, T, ch) q, k, v made outside the timing (SDPA's best case: no packing counted).
    speed = t_sdpa / t_ours; targets at issue 17's shapes (reported, exit status 0 either way)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device=device).manual_seed(23)
    result = {"device": torch.cuda.get_device_name(device), "cases": [], "targets": []}
    for batch, heads, ch, length in ATTENTION_CASES:
        base = torch.randn(batch, 3 * heads * ch, length, device=device, generator=gen).half()
        q, k, v = (t.reshape(batch, heads, ch, length).transpose(2, 3).contiguous()
                   for t in reference.split_qkv(base, heads, "new"))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            t_sdpa = best_seconds(lambda: F.scaled_dot_product_attention(q, k, v), reps)
        flops = 4.0 * batch * heads * length * length * ch
        for order in ("T-contiguous", "channel-contiguous"):
            qkv = base if order == "T-contiguous" else base.transpose(1, 2).contiguous().transpose(1, 2)
            _check(f"attention speed [{order}, T={length}]", ops.attention(qkv, heads, "new", backend="cuda"),
                   reference.attention(qkv, heads, "new"), 5e-3)
            t_ours = best_seconds(lambda qkv=qkv: ops.attention(qkv, heads, "new", backend="cuda"), reps)
            speed = t_sdpa / t_ours
            result["cases"].append({"batch": batch, "heads": heads, "head_dim": ch, "T": length, "order": order,
                                    "seconds": t_ours, "sdpa_flash_seconds": t_sdpa, "vs_sdpa": speed,
                                    "TFLOP/s": flops / t_ours / 1e12})
            result["targets"].append({"what": f"attention B{batch} h{heads} D{ch} T{length} fp16 {order}: "
                                              "speed vs SDPA flash", "value": speed,
                                      "limit": ATTENTION_TARGET_VS_SDPA, "kind": "min",
                                      "verdict": _verdict(speed, ATTENTION_TARGET_VS_SDPA, "min")})
    return result


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
    bw = sub.add_parser("bandwidth")
    bw.add_argument("--device", default="cuda")
    bw.add_argument("--json", default=None)
    bw.add_argument("--peak-gbs", type=float, default=None)
    bw.add_argument("--reps", type=int, default=50)
    at = sub.add_parser("attention")
    at.add_argument("--json", default=None)
    at.add_argument("--reps", type=int, default=30)
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
    if args.what == "bandwidth":
        result = bandwidth(args.device, args.peak_gbs, args.reps)
        for t in result["targets"]:
            sign = ">=" if t["kind"] == "min" else "<="
            print(f"- {t['verdict']}: {t['what']} = {t['value']:.3g} (target {sign} {t['limit']:g}, issue 17)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    if args.what == "attention":
        result = attention_speed("cuda", args.reps)
        for c in result["cases"]:
            print(f"attention B{c['batch']} h{c['heads']} D{c['head_dim']} T{c['T']:<5} {c['order']:<18} "
                  f"{c['seconds'] * 1e6:9.1f} us  SDPA flash {c['sdpa_flash_seconds'] * 1e6:9.1f} us  "
                  f"{c['vs_sdpa']:.2f}x  {c['TFLOP/s']:.1f} TFLOP/s")
        for t in result["targets"]:
            print(f"- {t['verdict']}: {t['what']} = {t['value']:.3g} (target >= {t['limit']:g}, issue 17)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    result = e2e([s for s in args.settings.split(",") if s], args.samples)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
