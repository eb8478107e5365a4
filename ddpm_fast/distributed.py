"""Sampling at scale: sharded, reproducible, resumable sampling of large sample sets.

Run the same `ddpm-fast sample --out-dir DIR ...` command alone or under torchrun
(`torchrun --nproc_per_node=N -m ddpm_fast.cli sample ...`; NCCL on GPUs, gloo on CPU):

* global sample index i always uses the noise of (seed, i) and the label i mod K (K classes) —
  or, with labels="random", a label drawn from a generator seeded by the seed — so the final set
  is the same for 1, 2 or 8 processes;
* the indices are cut into fixed chunks; chunk c goes to rank c mod world_size; each finished
  chunk is written atomically (temporary file, then rename) as DIR/chunk-<c>.npz, so a crash loses
  at most the chunks in flight, and re-running the same command skips the finished ones;
* DIR/manifest.json records the configuration (flags, checkpoint hash, sampler options, seed,
  counts); a run with a different configuration is refused;
* rank 0 shows one progress bar counting samples over all ranks and, at the end, assembles
  guided-diffusion's npz (arr_0 uint8 NHWC in index order, arr_1 labels) — also available as
  `ddpm-fast merge DIR --out samples.npz`.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"
# Options that do not change the samples (sample i depends on (seed, i) alone): a resume may change them.
RESULT_NEUTRAL = ("batch_size",)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    initialised_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self):
        if self.distributed:
            torch.distributed.barrier()

    def sum(self, value: int) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
        torch.distributed.all_reduce(t)
        return int(t.item())

    def close(self):
        if self.initialised_here:
            torch.distributed.destroy_process_group()


def _collective_device():
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def init_world() -> World:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR...), if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if torch.distributed.is_initialized():
        return World(torch.distributed.get_rank(), torch.distributed.get_world_size())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend)
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), True)


def file_sha256(path: str | Path | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_manifest(out_dir: Path, config: dict, world: World) -> None:
    """Write DIR/manifest.json on first use; refuse to continue a run configured differently
    (options of RESULT_NEUTRAL, such as batch_size, may differ: they do not change the samples)."""
    path = out_dir / MANIFEST
    if world.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _atomic_write_bytes(path, json.dumps(config, indent=2, sort_keys=True).encode())
    world.barrier()
    saved = json.loads(path.read_text())
    diff = sorted(k for k in set(saved) | set(config)
                  if k not in RESULT_NEUTRAL and saved.get(k) != config.get(k))
    if diff:
        details = "; ".join(f"{k}: was {saved.get(k)!r}, now {config.get(k)!r}" for k in diff)
        raise SystemExit(f"{out_dir} holds a run with another configuration ({details}). "
                         "Use a new --out-dir, or re-run with the original options to resume.")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def chunk_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"chunk-{index:06d}.npz"


def write_chunk(path: Path, images: np.ndarray, labels: np.ndarray | None) -> None:
    """Write one finished chunk atomically: a reader sees the whole file or none."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _read_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST
    if not path.is_file():
        raise SystemExit(f"{out_dir}: no {MANIFEST}; not the --out-dir of a sharded run")
    try:
        config = json.loads(path.read_text())
        num_samples, chunk_size = int(config["num_samples"]), int(config["chunk_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{path}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    if num_samples < 1 or chunk_size < 1:
        raise SystemExit(f"{path}: num_samples {num_samples} and chunk_size {chunk_size} must be >= 1")
    return config


def _read_chunk(path: Path, count: int, like: tuple | None, labelled: bool | None):
    """(images, labels or None) of one chunk file, checked: it loads, arr_0 is uint8 (count, H,
    W, C) shaped like the other chunks (`like`), arr_1 (count,) integers when the run has labels."""
    try:
        with np.load(path) as data:
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data else None
    except Exception as exc:  # truncated / corrupt zip, missing arr_0, not an npz
        raise SystemExit(f"{path}: corrupt chunk ({type(exc).__name__}: {exc}); delete it and re-run "
                         "the sampling command to recompute it") from None
    problem = None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != count:
        problem = f"arr_0 is {images.dtype} {images.shape}, expected uint8 ({count}, H, W, C)"
    elif like is not None and images.shape[1:] != like:
        problem = f"images of shape {images.shape[1:]}, the other chunks hold {like}"
    elif labelled is not None and (labels is not None) != labelled:
        problem = "labels (arr_1) present in some chunks but not in others"
    elif labels is not None and (labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer)):
        problem = f"arr_1 is {labels.dtype} {labels.shape}, expected ({count},) integers"
    if problem:
        raise SystemExit(f"{path}: corrupt chunk ({problem}); delete it and re-run the sampling "
                         "command to recompute it")
    return images, labels


def merge(out_dir: str | Path, out: str | Path | None = None) -> Path:
    """Assemble DIR's chunks (all must be there) into one npz in global index order. Each chunk is
    checked (it loads; its image count, shape, dtype and labels match the manifest and the other
    chunks) before anything is written; SystemExit with the chunk's path otherwise."""
    out_dir = Path(out_dir)
    config = _read_manifest(out_dir)
    num_samples, chunk_size = int(config["num_samples"]), int(config["chunk_size"])
    chunks = -(-num_samples // chunk_size)
    missing = [c for c in range(chunks) if not chunk_path(out_dir, c).exists()]
    if missing:
        raise SystemExit(f"{out_dir}: {len(missing)} of {chunks} chunks are not finished "
                         f"(first: {missing[:5]}); re-run the sampling command to complete them")
    stray = sorted(p.name for p in out_dir.glob("chunk-*.npz")
                   if p.stem[len("chunk-"):].isdigit() and int(p.stem[len("chunk-"):]) >= chunks)
    if stray:
        raise SystemExit(f"{out_dir}: {len(stray)} chunk files beyond the manifest's {chunks} chunks "
                         f"(first: {stray[:3]}); the directory mixes runs")
    images, labels = [], []
    like = labelled = None
    for c in range(chunks):
        count = min(chunk_size, num_samples - c * chunk_size)
        imgs, labs = _read_chunk(chunk_path(out_dir, c), count, like, labelled)
        like, labelled = imgs.shape[1:], labs is not None
        images.append(imgs)
        if labs is not None:
            labels.append(labs)
    out = Path(out) if out is not None else out_dir / "samples.npz"
    arrays = {"arr_0": np.concatenate(images)}
    if labels:
        arrays["arr_1"] = np.concatenate(labels)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    return out


def labels_for(indices: torch.Tensor, num_classes: int | None, mode: str, seed: int) -> torch.Tensor | None:
    """Label of each global sample index: balanced (i mod K) or random (seeded, per index)."""
    if num_classes is None:
        return None
    if mode == "balanced":
        return indices % num_classes
    if mode == "random":
        from .sample import seeded_labels

        start, count = int(indices[0]), indices.numel()
        return seeded_labels(seed, start, count, num_classes)
    raise ValueError(f"labels must be 'balanced' or 'random'; got {mode!r}")


def sharded_sample(model, *, out_dir: str | Path, num_samples: int, chunk_size: int, config: dict,
                   sample_kwargs: dict, labels: str = "balanced", seed: int = 0,
                   max_chunks: int | None = None, progress: bool = True, log=None) -> dict:
    """Sample global indices 0..num_samples-1 into DIR in chunks, over all ranks of the world.

    sample_kwargs are ddpm_fast.sample's options (steps, method, eta, batch_size, ...).
    max_chunks stops this run after computing that many chunks on each rank (a job slice).
    Returns {"computed": chunks computed here, "skipped": finished chunks found, "merged": path
    or None} for this rank."""
    from .images import to_images
    from .sample import sample

    out_dir = Path(out_dir)
    world = init_world()
    try:
        check_manifest(out_dir, config, world)
        chunks = -(-num_samples // chunk_size)
        mine = list(range(world.rank, chunks, world.size))
        rounds = -(-chunks // world.size)
        real_classes = None
        if getattr(model, "num_classes", None) is not None:
            real_classes = model.num_classes - (1 if getattr(model, "null_label", None) is not None else 0)
        bar = None
        if progress and world.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_samples, desc="samples", unit="img")
        computed = skipped = 0
        for r in range(rounds):
            done_now = 0
            if r < len(mine) and (max_chunks is None or computed < max_chunks):
                c = mine[r]
                start, stop = c * chunk_size, min((c + 1) * chunk_size, num_samples)
                path = chunk_path(out_dir, c)
                if path.exists():
                    skipped += 1
                else:
                    idx = torch.arange(start, stop)
                    y = labels_for(idx, real_classes, labels, seed)
                    x = sample(model, num_samples=stop - start, class_labels=y, seed=seed,
                               start_index=start, progress=False, **sample_kwargs)
                    write_chunk(path, to_images(x), None if y is None else y.numpy().astype(np.int64))
                    computed += 1
                    if log:
                        log(f"rank {world.rank}: chunk {c} ({start}..{stop - 1}) written")
                done_now = stop - start
            total = world.sum(done_now)
            if bar is not None:
                bar.update(total)
        if bar is not None:
            bar.close()
        world.barrier()
        merged = None
        finished = all(chunk_path(out_dir, c).exists() for c in range(chunks))
        if world.rank == 0 and finished:
            merged = merge(out_dir, config.get("out"))
        world.barrier()
        return {"computed": computed, "skipped": skipped, "merged": merged, "rank": world.rank,
                "world_size": world.size, "finished": finished}
    finally:
        world.close()


def main_log(rank: int, enabled: bool):
    if not enabled:
        return None
    return lambda msg: print(msg, file=sys.stderr, flush=True)
