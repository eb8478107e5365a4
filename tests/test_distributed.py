"""Sharded sampling under torchrun (gloo on the CPU) with a randomised model: the same npz for 1 and
2 processes, equal to a plain sample() (7 samples in chunks of 2: an uneven last chunk), resume
after a crash without recomputing finished chunks, a changed configuration refused."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import randomize_weights

import ddpm_fast

FLAGS = ("--image_size 8 --num_channels 32 --num_res_blocks 1 --attention_resolutions 4 "
         "--channel_mult 1,2 --num_head_channels 16 --class_cond True --learn_sigma True "
         "--diffusion_steps 20 --noise_schedule cosine --resblock_updown True "
         "--use_scale_shift_norm True")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, _ = ddpm_fast.from_flags(FLAGS)
    randomize_weights(model, seed=5)  # a fresh model outputs 0: labels and weights would not matter
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def _torchrun(nproc, checkpoint, out_dir, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ddpm_fast.cli", "sample", "--checkpoint", str(checkpoint), "--flags", FLAGS,
           "--num-samples", str(NUM_SAMPLES), "--batch-size", "2", "--chunk-size", "2", "--steps", "5",
           "--seed", "3", "--out-dir", str(out_dir), "--out", str(out_dir / "samples.npz"),
           "--no-progress", "--grid", "", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


NUM_SAMPLES = 7  # chunks of 2: 0-1, 2-3, 4-5 and the uneven 6


def _computed(proc):
    return sum(int(n) for n in re.findall(r"computed (\d+) chunks", proc.stdout))


def test_two_processes_give_the_same_npz_as_one(checkpoint, tmp_path):
    one = _torchrun(1, checkpoint, tmp_path / "one")
    two = _torchrun(2, checkpoint, tmp_path / "two")
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    a = (tmp_path / "one" / "samples.npz").read_bytes()
    b = (tmp_path / "two" / "samples.npz").read_bytes()
    assert a == b
    assert _computed(two) == 4 and two.stdout.count("rank ") >= 2
    with np.load(tmp_path / "two" / "samples.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (NUM_SAMPLES, 8, 8, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [i % 1000 for i in range(NUM_SAMPLES)]
    # the merged set is a plain sample() of all indices with the same model, seed and labels
    model, _ = ddpm_fast.from_flags(FLAGS, checkpoint=str(checkpoint))
    kw = dict(steps="5", num_samples=NUM_SAMPLES, batch_size=2, seed=3, progress=False)
    plain = ddpm_fast.sample(model.eval(), class_labels=torch.from_numpy(labels), **kw)
    np.testing.assert_array_equal(images, ddpm_fast.to_images(plain))
    relabelled = ddpm_fast.sample(model, class_labels=torch.from_numpy(labels) + 10, **kw)
    assert np.abs(ddpm_fast.to_images(relabelled).astype(int) - images).max() > 8  # labels matter


def test_resume_after_a_crash_and_refuse_a_changed_configuration(checkpoint, tmp_path):
    ref = _torchrun(2, checkpoint, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    # a run stopped after one chunk per process (as a killed job would be): 2 of 3 chunks exist
    part = _torchrun(2, checkpoint, tmp_path / "run", "--max-chunks", "1")
    assert part.returncode == 0, part.stderr[-2000:]
    assert _computed(part) == 2
    assert sorted(p.name for p in (tmp_path / "run").glob("chunk-*.npz")) == [
        "chunk-000000.npz", "chunk-000001.npz"]
    assert not (tmp_path / "run" / "samples.npz").exists()
    assert "not finished" in part.stdout
    resumed = _torchrun(2, checkpoint, tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _computed(resumed) == 2  # only the missing chunks are sampled
    assert re.search(r"skipped 1 finished chunks", resumed.stdout)
    assert (tmp_path / "run" / "samples.npz").read_bytes() == (tmp_path / "ref" / "samples.npz").read_bytes()
    changed = _torchrun(1, checkpoint, tmp_path / "run", "--method", "ddim")
    assert changed.returncode != 0
    assert "another configuration" in changed.stderr and "method" in changed.stderr


def test_merge_refuses_an_unfinished_run(tmp_path):
    from ddpm_fast.distributed import check_manifest, World, merge

    check_manifest(tmp_path, {"num_samples": 4, "chunk_size": 2}, World())
    with pytest.raises(SystemExit, match="2 of 2 chunks are not finished"):
        merge(tmp_path)
