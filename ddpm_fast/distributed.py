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
    """Write DIR/manifest.json on first use; refuse to continue a run configured differently."""
    path = out_dir / MANIFEST
    if world.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _atomic_write_bytes(path, json.dumps(config, indent=2, sort_keys=True).encode())
    world.barrier()
    saved = json.loads(path.read_text())
    diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
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


def merge(out_dir: str | Path, out: str | Path | None = None) -> Path:
    """Assemble DIR's chunks (all must be there) into one npz in global index order."""
    out_dir = Path(out_dir)
    config = json.loads((out_dir / MANIFEST).read_text())
    chunks = -(-config["num_samples"] // config["chunk_size"])
    missing = [c for c in range(chunks) if not chunk_path(out_dir, c).exists()]
    if missing:
        raise SystemExit(f"{out_dir}: {len(missing)} of {chunks} chunks are not finished "
                         f"(first: {missing[:5]}); re-run the sampling command to complete them")
    images, labels = [], []
    for c in range(chunks):
        with np.load(chunk_path(out_dir, c)) as data:
            images.append(data["arr_0"])
            if "arr_1" in data:
                labels.append(data["arr_1"])
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
