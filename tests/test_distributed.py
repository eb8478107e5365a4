"""Sharded sampling under torchrun (gloo on the CPU): the same npz for 1 and 2 processes,
resume after a crash without recomputing finished chunks, a changed configuration refused."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddpm_fast

FLAGS = ("--image_size 8 --num_channels 32 --num_res_blocks 1 --attention_resolutions 4 "
         "--channel_mult 1,2 --num_head_channels 16 --class_cond True --learn_sigma True "
         "--diffusion_steps 20 --noise_schedule cosine --resblock_updown True "
         "--use_scale_shift_norm True")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model, _ = ddpm_fast.from_flags(FLAGS)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def _torchrun(nproc, checkpoint, out_dir, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ddpm_fast.cli", "sample", "--checkpoint", str(checkpoint), "--flags", FLAGS,
           "--num-samples", "6", "--batch-size", "2", "--chunk-size", "2", "--steps", "5",
           "--seed", "3", "--out-dir", str(out_dir), "--out", str(out_dir / "samples.npz"),
           "--no-progress", "--grid", "", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


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
    assert _computed(two) == 3 and two.stdout.count("rank ") >= 2
    with np.load(tmp_path / "two" / "samples.npz") as data:
        assert data["arr_0"].shape == (6, 8, 8, 3) and data["arr_0"].dtype == np.uint8
        assert data["arr_1"].dtype == np.int64
        assert data["arr_1"].tolist() == [i % 1000 for i in range(6)]


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
    assert _computed(resumed) == 1  # only the missing chunk is sampled
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
