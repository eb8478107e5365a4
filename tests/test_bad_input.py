"""Bad and odd inputs of every public entry point (issue 22): one table, call -> the exception type
and the argument its message names, or the exact expected result. CLI errors must be one line
`ddpm-fast: error: ...` with exit status 2 (checked by `cli` for every CLI row)."""
from __future__ import annotations

import io
import math
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import ddpm_fast as df
from conftest import tiny_unet
from ddpm_fast import ops, reference
from ddpm_fast.diffusion import Diffusion
from ddpm_fast.sample import sample_seeds
from ddpm_fast.step_layout import NUM_COEFS


class CliError(Exception):
    """The one-line error of a `ddpm-fast` run that exited with status 2."""


def cli(*argv) -> None:
    """Run `ddpm-fast argv`; a failure must exit with status 2 and print exactly one line
    `ddpm-fast: error: ...` (then raised as CliError(line) for the table to check)."""
    from ddpm_fast.cli import main

    err = io.StringIO()
    with redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as exc:
            lines = err.getvalue().splitlines()
            assert exc.code == 2, (exc.code, err.getvalue())
            assert len(lines) == 1 and lines[0].startswith("ddpm-fast: error: "), err.getvalue()
            raise CliError(lines[0]) from None
    return None


@dataclass
class Raises:
    exc: type
    names: str  # the argument the message must name


@dataclass
class Equals:
    expected: Callable[[Any], Any]  # env -> the exact expected result


@dataclass
class Holds:
    check: Callable[[Any, Any], None]  # (result, env) -> asserts


class Env:
    """What the calls use: small models, a diffusion, a temporary directory."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.unet = tiny_unet(seed=3)                       # class-conditional 8x8 RGB, 5 classes
        self.d = Diffusion("cosine", 10)
        self.img = torch.linspace(-1, 1, 2 * 3 * 64).reshape(2, 3, 8, 8)
        self.half = torch.zeros(2, 1, 8, 8)
        self.half[..., :4, :] = 1

    def sample(self, **kw):
        return df.sample(self.unet, **{"steps": 2, "progress": False, "seed": 0, **kw})

    def restore(self, image=None, mask=None, **kw):
        image = self.img if image is None else image
        mask = self.half if mask is None else mask
        return df.restore(self.unet, image, mask, **{"steps": 2, "progress": False, "jump_n_sample": 1,
                                                     "reconstruction_guidance": 0.0, **kw})

    def file(self, name: str, data: bytes = b"") -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path


class Generic(torch.nn.Module):
    """A model without in_channels / image_size: the shape must come from x_T."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, y=None):
        return torch.tanh(x) * self.w


def _grad_of(fn, *inputs):
    """(output, grads of sum(output * fixed weights)) for inputs requiring grad."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad((out.float() * weights).sum(), inputs)
    return out.detach(), grads


def _same_grads(fast, ref) -> None:
    (out_f, grads_f), (out_r, grads_r) = fast, ref
    torch.testing.assert_close(out_f, out_r)
    for g_f, g_r in zip(grads_f, grads_r):
        assert g_f is not None
        torch.testing.assert_close(g_f, g_r)


def _qkv(t: int) -> torch.Tensor:
    return torch.randn(1, 3 * 32, t, generator=torch.Generator().manual_seed(t))


def _step_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    coef = Diffusion("cosine", 10).coefficient_table()[[5, 5]]
    return x, torch.randn(2, 3, 4, 4, generator=g), coef


def _gn_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 8, 4, 4, generator=g), torch.randn(8, generator=g), torch.randn(2, 8, generator=g))


def _warnings_of(fn) -> list[str]:
    """The messages of the warnings fn() raises."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


def _huge() -> torch.Tensor:
    """GroupNorm input whose group variance overflows float32."""
    return torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 1e20


def _known_exact(out, env, image=None, mask=None):
    image = env.img if image is None else image
    mask = (env.half if mask is None else mask).expand_as(image)
    keep = mask == 1
    assert torch.equal(out[keep], image[keep])
    assert torch.isfinite(out).all() and out.abs().max() <= 1.01


def _merge_dir(env, name, chunks):
    """A sharded run's directory: manifest of 4 samples in chunks of 2, and the given chunk files."""
    from ddpm_fast.distributed import World, check_manifest

    d = env.tmp / name
    check_manifest(d, {"num_samples": 4, "chunk_size": 2}, World())
    for index, data in chunks.items():
        (d / f"chunk-{index:06d}.npz").write_bytes(data)
    return d


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _save_safetensors(env, name):
    from safetensors.torch import save_file

    path = env.tmp / name
    save_file({"w": torch.ones(2)}, str(path))
    return path


IMG8 = np.zeros((2, 8, 8, 3), np.uint8)
FAST = ("--num-samples", 1, "--steps", 1, "--no-progress")  # should a check regress, the run is short

CASES = {
    # ---- sample: counts, seeds, dtypes, numbers, shapes, labels ----------------------------------
    "sample num_samples=0 -> empty": (
        lambda e: e.sample(num_samples=0), Holds(lambda r, e: r.shape == (0, 3, 8, 8) or pytest.fail(r.shape))),
    "sample num_samples=-1": (lambda e: e.sample(num_samples=-1), Raises(ValueError, "num_samples")),
    "sample num_samples=2.0": (lambda e: e.sample(num_samples=2.0), Raises(TypeError, "num_samples")),
    "sample batch_size=0": (lambda e: e.sample(batch_size=0), Raises(ValueError, "batch_size")),
    "sample seed=2**31": (lambda e: e.sample(seed=2 ** 31), Raises(ValueError, "seed")),
    "sample seed=-2**31-1": (lambda e: e.sample(seed=-2 ** 31 - 1), Raises(ValueError, "seed")),
    "sample seed=1.5": (lambda e: e.sample(seed=1.5), Raises(TypeError, "seed")),
    "sample seed=3.0": (lambda e: e.sample(seed=3.0), Raises(TypeError, "seed")),
    "sample seed=True": (lambda e: e.sample(seed=True), Raises(TypeError, "seed")),
    "sample seed numpy int64 == int": (
        lambda e: e.sample(seed=np.int64(7)), Equals(lambda e: e.sample(seed=7))),
    "seeds -1 and 2^31-1 differ": (
        lambda e: torch.equal(e.sample(seed=-1), e.sample(seed=2 ** 31 - 1)), Equals(lambda e: False)),
    "seeds in [0, 2^31) keep their keys": (
        lambda e: sample_seeds(123, 5, 3), Equals(lambda e: torch.tensor([123 * 2 ** 32 + i for i in (5, 6, 7)]))),
    "negative seed keys": (
        lambda e: sample_seeds(-2 ** 31, 0, 2), Equals(lambda e: torch.tensor([-2 ** 63, -2 ** 63 + 1]))),
    "sample start_index=-1": (lambda e: e.sample(start_index=-1), Raises(ValueError, "start_index")),
    "sample index beyond 2^32": (
        lambda e: sample_seeds(0, 2 ** 32 - 1, 2), Raises(ValueError, "start_index")),
    "sample dtype=torch.int32": (lambda e: e.sample(dtype=torch.int32), Raises(ValueError, "dtype")),
    "sample dtype='float16'": (lambda e: e.sample(dtype="float16"), Raises(TypeError, "dtype")),
    "sample guidance_scale=nan": (lambda e: e.sample(guidance_scale=math.nan), Raises(ValueError, "guidance_scale")),
    "sample guidance_scale='2'": (lambda e: e.sample(guidance_scale="2"), Raises(TypeError, "guidance_scale")),
    "sample eta=nan": (lambda e: e.sample(method="ddim", eta=math.nan), Raises(ValueError, "eta")),
    "sample x_T with NaN": (
        lambda e: e.sample(x_T=torch.full((1, 3, 8, 8), math.nan)), Raises(ValueError, "x_T")),
    "sample shape from x_T (generic model)": (
        lambda e: df.sample(Generic(), steps=2, diffusion=e.d, x_T=torch.zeros(2, 1, 4, 6), progress=False).shape,
        Equals(lambda e: torch.Size([2, 1, 4, 6]))),
    "sample model_kwargs y == class_labels": (
        lambda e: e.sample(num_samples=2, model_kwargs={"y": torch.tensor([1, 3])}),
        Equals(lambda e: e.sample(num_samples=2, class_labels=torch.tensor([1, 3])))),
    "sample model_kwargs y and class_labels": (
        lambda e: e.sample(class_labels=[1], model_kwargs={"y": torch.tensor([1])}), Raises(ValueError, "class_labels")),
    "sample model_kwargs y out of range": (
        lambda e: e.sample(model_kwargs={"y": torch.tensor([7])}), Raises(ValueError, "class_labels")),
    "schedule with beta = 1 warns (documented)": (
        lambda e: _warnings_of(lambda: Diffusion(np.array([0.1, 1.0]))), Holds(
            lambda r, e: any("beta of 1" in m for m in r) or pytest.fail(f"no warning: {r}"))),
    "schedule with beta = 1, v prediction: no warning": (
        lambda e: [m for m in _warnings_of(lambda: Diffusion(np.array([0.1, 1.0]), prediction="v")) if "beta" in m],
        Equals(lambda e: [])),
    # ---- UNet --------------------------------------------------------------------------------------
    "UNet int64 images": (
        lambda e: e.unet(torch.zeros(1, 3, 8, 8, dtype=torch.int64), torch.tensor([1]), torch.tensor([0])),
        Raises(ValueError, "x")),
    "UNet y out of range": (
        lambda e: e.unet(torch.zeros(1, 3, 8, 8), torch.tensor([1]), torch.tensor([5])), Raises(ValueError, "y")),
    "UNet negative y": (
        lambda e: e.unet(torch.zeros(1, 3, 8, 8), torch.tensor([1]), torch.tensor([-1])), Raises(ValueError, "y")),
    "UNet float y": (
        lambda e: e.unet(torch.zeros(1, 3, 8, 8), torch.tensor([1]), torch.tensor([1.0])), Raises(ValueError, "y")),
    # ---- ops: gradients are never dropped ------------------------------------------------------------
    "group_norm grad == reference grad": (
        lambda e: _grad_of(lambda x, w, s: ops.group_norm_scale_shift(x, 4, w, None, s, None, silu=True), *_gn_inputs()),
        Holds(lambda r, e: _same_grads(r, _grad_of(
            lambda x, w, s: reference.group_norm_scale_shift(x, 4, w, None, s, None, silu=True), *_gn_inputs())))),
    "attention grad T=64": (
        lambda e: _grad_of(lambda q: ops.attention(q, 2), _qkv(64)),
        Holds(lambda r, e: _same_grads(r, _grad_of(lambda q: reference.attention(q, 2), _qkv(64))))),
    "attention grad T=512 (packed path)": (
        lambda e: _grad_of(lambda q: ops.attention(q, 2, "new"), _qkv(512)),
        Holds(lambda r, e: _same_grads(r, _grad_of(lambda q: reference.attention(q, 2, "new"), _qkv(512))))),
    "diffusion_step grad == reference grad": (
        lambda e: _grad_of(lambda x, m: ops.diffusion_step(x, m, _step_inputs()[2], method="ddim"), *_step_inputs()[:2]),
        Holds(lambda r, e: _same_grads(r, _grad_of(
            lambda x, m: reference.diffusion_step(x, m, _step_inputs()[2], method="ddim"), *_step_inputs()[:2])))),
    # ---- ops: odd values -----------------------------------------------------------------------------
    "group_norm 1e20 input: reference NaN (documented)": (
        lambda e: torch.isnan(reference.group_norm_scale_shift(_huge(), 2)).all().item(),
        Equals(lambda e: True)),
    "group_norm 1e20 input: kernel finite (documented)": (
        lambda e: torch.isfinite(ops.group_norm_scale_shift(_huge(), 2, backend="cpu")).all().item(),
        Equals(lambda e: True)),
    "reference group_norm on N=0": (
        lambda e: ops.group_norm_scale_shift(torch.zeros(0, 4, 3, 3), 2, backend="torch").shape,
        Equals(lambda e: ops.group_norm_scale_shift(torch.zeros(0, 4, 3, 3), 2).shape)),
    "reference group_norm on H=0": (
        lambda e: ops.group_norm_scale_shift(torch.zeros(2, 4, 0, 3), 2, backend="torch").shape,
        Equals(lambda e: torch.Size([2, 4, 0, 3]))),
    "reference attention on B=0": (
        lambda e: ops.attention(torch.zeros(0, 12, 5), 2, backend="torch").shape, Equals(lambda e: torch.Size([0, 4, 5]))),
    "reference attention on T=0": (
        lambda e: ops.attention(torch.zeros(2, 12, 0), 2, backend="torch").shape, Equals(lambda e: torch.Size([2, 4, 0]))),
    "reference diffusion_step on B=0": (
        lambda e: ops.diffusion_step(torch.zeros(0, 3, 4, 4), torch.zeros(0, 3, 4, 4), torch.zeros(0, NUM_COEFS),
                                     backend="torch")[0].shape, Equals(lambda e: torch.Size([0, 3, 4, 4]))),
    # ---- restore -------------------------------------------------------------------------------------
    "restore 0/255 mask": (lambda e: e.restore(mask=e.half * 255), Raises(ValueError, "mask")),
    "restore NaN mask": (lambda e: e.restore(mask=e.half * math.nan), Raises(ValueError, "mask")),
    "restore negative mask": (lambda e: e.restore(mask=e.half - 1), Raises(ValueError, "mask")),
    "restore NaN image": (lambda e: e.restore(image=e.img * math.nan), Raises(ValueError, "image")),
    "restore int image": (lambda e: e.restore(image=e.img.long()), Raises(ValueError, "image")),
    "restore seed=0.5": (lambda e: e.restore(seed=0.5), Raises(TypeError, "seed")),
    "restore strength=nan": (lambda e: e.restore(mask=None, strength=math.nan), Raises(ValueError, "strength")),
    "restore jump_n_sample=0": (lambda e: e.restore(jump_n_sample=0), Raises(ValueError, "jump_n_sample")),
    "restore guidance_scale=inf": (lambda e: e.restore(guidance_scale=math.inf), Raises(ValueError, "guidance_scale")),
    "restore bool mask keeps known pixels": (lambda e: e.restore(mask=e.half.bool()), Holds(_known_exact)),
    "restore int {0,1} mask keeps known pixels": (lambda e: e.restore(mask=e.half.long()), Holds(_known_exact)),
    "restore (1, C) mask keeps known pixels": (
        lambda e: e.restore(mask=e.half[:1].expand(1, 3, 8, 8)), Holds(_known_exact)),
    "restore soft mask keeps mask-1 pixels": (
        lambda e: e.restore(mask=e.half * 0.5 + (torch.arange(8) < 2).float().reshape(1, 1, 1, 8) * 0.5),
        Holds(lambda r, e: _known_exact(r, e, mask=e.half * 0.5 + (torch.arange(8) < 2).float().reshape(1, 1, 1, 8) * 0.5))),
    # ---- images --------------------------------------------------------------------------------------
    "to_images NaN": (lambda e: df.to_images(torch.full((1, 3, 2, 2), math.nan)), Raises(ValueError, "x")),
    "to_images int tensor": (lambda e: df.to_images(torch.zeros(1, 3, 2, 2, dtype=torch.long)), Raises(ValueError, "x")),
    "to_images list": (lambda e: df.to_images([[0.0]]), Raises(TypeError, "x")),
    "to_images empty": (lambda e: df.to_images(torch.zeros(0, 3, 4, 5)).shape, Equals(lambda e: (0, 4, 5, 3))),
    "to_images inf clamps": (
        lambda e: df.to_images(torch.tensor([math.inf, -math.inf]).reshape(1, 1, 1, 2)).ravel().tolist(),
        Equals(lambda e: [255, 0])),
    "save_grid empty": (lambda e: df.save_grid(torch.zeros(0, 3, 4, 4), e.tmp / "g.png"), Raises(ValueError, "x")),
    "save_grid NaN": (lambda e: df.save_grid(torch.full((1, 3, 4, 4), math.nan), e.tmp / "g.png"), Raises(ValueError, "x")),
    "save_grid no extension": (lambda e: df.save_grid(torch.zeros(1, 3, 4, 4), e.tmp / "noext"), Raises(ValueError, "path")),
    "save_grid 2 channels": (lambda e: df.save_grid(torch.zeros(1, 2, 4, 4), e.tmp / "g.png"), Raises(ValueError, "x")),
    "save_grid nrow=0": (lambda e: df.save_grid(torch.zeros(1, 3, 4, 4), e.tmp / "g.png", nrow=0), Raises(ValueError, "nrow")),
    # ---- checkpoints: the format from the content, errors with the path --------------------------
    "checkpoint .SAFETENSORS": (
        lambda e: sorted(df.flags.load_checkpoint(_save_safetensors(e, "w.SAFETENSORS"))), Equals(lambda e: ["w"])),
    "checkpoint safetensors named .pt": (
        lambda e: sorted(df.flags.load_checkpoint(_save_safetensors(e, "w.pt"))), Equals(lambda e: ["w"])),
    "checkpoint torch file named .safetensors": (
        lambda e: (torch.save({"v": torch.ones(1)}, e.tmp / "t.safetensors"),
                   sorted(df.flags.load_checkpoint(e.tmp / "t.safetensors")))[1], Equals(lambda e: ["v"])),
    "checkpoint truncated safetensors": (
        lambda e: df.flags.load_checkpoint(e.file("cut.safetensors", _save_safetensors(e, "ok.safetensors").read_bytes()[:-3])),
        Raises(ValueError, "cut.safetensors")),
    "checkpoint garbage": (lambda e: df.flags.load_checkpoint(e.file("junk.pt", b"0123456789")), Raises(ValueError, "junk.pt")),
    "checkpoint path not a str": (lambda e: df.flags.load_checkpoint(3), Raises(TypeError, "checkpoint")),
    # ---- command line: checked before any work, one-line errors ------------------------------------
    "cli --out /proc/x.npz": (lambda e: cli("sample", *FAST, "--out", "/proc/x.npz", "--grid", ""), Raises(CliError, "--out")),
    "cli --out without .npz": (lambda e: cli("sample", *FAST, "--out", e.tmp / "samples", "--grid", ""), Raises(CliError, "--out")),
    "cli --out DIR": (lambda e: cli("sample", *FAST, "--out", e.tmp, "--grid", ""), Raises(CliError, "is a directory")),
    "cli --grid noext": (lambda e: cli("sample", *FAST, "--out", e.tmp / "s.npz", "--grid", e.tmp / "noext"), Raises(CliError, "--grid")),
    "cli --num-samples 0": (lambda e: cli("sample", "--num-samples", 0), Raises(CliError, "--num-samples")),
    "cli --seed 2^32": (lambda e: cli("sample", *FAST, "--seed", 2 ** 32, "--out", e.tmp / "s.npz"), Raises(CliError, "--seed")),
    "cli --seed 1.5 (argparse)": (lambda e: cli("sample", "--seed", "1.5"), Raises(CliError, "--seed")),
    "cli --device bogus": (
        lambda e: cli("sample", *FAST, "--device", "bogus", "--out", e.tmp / "s.npz", "--grid", ""), Raises(CliError, "--device")),
    "cli --chunk-size 0 writes no manifest": (
        lambda e: (cli("sample", *FAST, "--chunk-size", 0, "--out-dir", e.tmp / "run", "--out", e.tmp / "s.npz")),
        Raises(CliError, "--chunk-size")),
    "cli checkpoint without --flags": (
        lambda e: cli("sample", *FAST, "--checkpoint", e.file("c.pt"), "--out", e.tmp / "s.npz", "--grid", ""),
        Raises(CliError, "--flags")),
    "cli restore --mask-threshold 0": (
        lambda e: cli("restore", "--image", e.file("i.png"), "--mask-threshold", 0, "--out", e.tmp / "o.png"),
        Raises(CliError, "--mask-threshold")),
    "cli restore --out noext": (
        lambda e: cli("restore", "--image", e.file("i.png"), "--out", e.tmp / "restored"), Raises(CliError, "--out")),
    "cli restore missing image": (
        lambda e: cli("restore", "--image", e.tmp / "nope.png", "--out", e.tmp / "o.png"), Raises(CliError, "--image")),
    "cli merge missing manifest": (lambda e: cli("merge", e.tmp), Raises(CliError, "manifest")),
    "cli merge unfinished": (
        lambda e: cli("merge", _merge_dir(e, "m0", {0: _npz(arr_0=IMG8)})), Raises(CliError, "not finished")),
    "cli merge corrupt chunk": (
        lambda e: cli("merge", _merge_dir(e, "m1", {0: _npz(arr_0=IMG8), 1: _npz(arr_0=IMG8)[:50]})),
        Raises(CliError, "chunk-000001.npz")),
    "cli merge chunk count": (
        lambda e: cli("merge", _merge_dir(e, "m2", {0: _npz(arr_0=IMG8), 1: _npz(arr_0=IMG8[:1])})),
        Raises(CliError, "chunk-000001.npz")),
    "cli merge chunk shape": (
        lambda e: cli("merge", _merge_dir(e, "m3", {0: _npz(arr_0=IMG8), 1: _npz(arr_0=IMG8[:, :4])})),
        Raises(CliError, "chunk-000001.npz")),
    "cli merge labels in some chunks": (
        lambda e: cli("merge", _merge_dir(e, "m4", {0: _npz(arr_0=IMG8, arr_1=np.zeros(2, np.int64)),
                                                     1: _npz(arr_0=IMG8)})),
        Raises(CliError, "chunk-000001.npz")),
    "cli merge stray chunk": (
        lambda e: cli("merge", _merge_dir(e, "m5", {0: _npz(arr_0=IMG8), 1: _npz(arr_0=IMG8), 2: _npz(arr_0=IMG8)})),
        Raises(CliError, "beyond")),
    "cli merge good chunks": (
        lambda e: (cli("merge", _merge_dir(e, "m6", {0: _npz(arr_0=IMG8), 1: _npz(arr_0=IMG8 + 1)})),
                   np.load(e.tmp / "m6" / "samples.npz")["arr_0"][:, 0, 0, 0].tolist())[1],
        Equals(lambda e: [0, 0, 1, 1])),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return Env(tmp_path_factory.mktemp("bad_input"))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, env):
    call, expect = CASES[case]
    if isinstance(expect, Raises):
        with pytest.raises(expect.exc) as info:
            call(env)
        assert expect.names in str(info.value), str(info.value)
    elif isinstance(expect, Equals):
        got, want = call(env), expect.expected(env)
        if isinstance(want, torch.Tensor):
            assert torch.equal(got, want), (got, want)
        else:
            assert got == want, (got, want)
    else:
        expect.check(call(env), env)


def test_cli_chunk_size_0_leaves_no_manifest(env):
    """The refused run leaves nothing behind that would refuse the corrected one."""
    with pytest.raises(CliError):
        cli("sample", "--chunk-size", 0, "--out-dir", env.tmp / "run0", "--out", env.tmp / "s0.npz")
    assert not (env.tmp / "run0").exists()


def test_resume_with_another_batch_size_is_accepted(env):
    """batch_size does not change the samples, so a resume that changes only it is accepted; any
    other option still refuses."""
    from ddpm_fast.distributed import World, check_manifest

    d = env.tmp / "resume"
    check_manifest(d, {"num_samples": 4, "chunk_size": 2, "batch_size": 2}, World())
    check_manifest(d, {"num_samples": 4, "chunk_size": 2, "batch_size": 4}, World())
    check_manifest(d, {"num_samples": 4, "chunk_size": 2}, World())
    with pytest.raises(SystemExit, match="seed"):
        check_manifest(d, {"num_samples": 4, "chunk_size": 2, "seed": 1}, World())


def test_cli_debug_shows_the_exception(env):
    from ddpm_fast.cli import main

    with pytest.raises(ValueError, match="--num-samples"):
        main(["sample", "--num-samples", "0", "--debug"])
