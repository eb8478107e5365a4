"""The seeds' remaining sampler options (issue 18), each against an independent computation:
noise_until (seed 003: noise in the first k reverse steps only) through sample / restore / the
CLI on every step backend, the "quadN" and "powP:N" spacings (exact integer arithmetic), the
truncated process (truncate=F), and all of them inside the captured CUDA-graph loop."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import ddpm_fast
from conftest import device_of, tiny_unet
from ddpm_fast import graphs, philox, reference
from ddpm_fast.diffusion import Diffusion, diffusers_timesteps
from ddpm_fast.loop import make_plan, reverse_process, StepOptions, with_noise_until
from ddpm_fast.restore import _START_STREAM
from ddpm_fast.sample import sample_seeds
from ddpm_fast.step_layout import NONZERO, NUM_COEFS, SQRT_1M_AB, SQRT_AB


# ---- spacings ---------------------------------------------------------------------------------------

def _quad_exact(T, S):
    """The DDIM code's int(linspace(0, sqrt(0.8 T), S)^2) in exact rational arithmetic:
    floor(0.8 T i^2 / (S - 1)^2), repeats kept once."""
    return sorted({math.floor(Fraction(4 * T, 5) * i * i / (S - 1) ** 2) for i in range(S)})


def _pow_exact(T, S, p):
    """round((T - 1) (i / (S - 1))^p) for an integer p, exactly (Python's round: half to even)."""
    return sorted({round((T - 1) * Fraction(i, S - 1) ** p) for i in range(S)})


def _quad_float(T, S):
    """The DDIM code's int(linspace(0, sqrt(0.8 T), S)^2) in plain Python floats: numpy's linspace
    is i * (stop / (S - 1)) with the last point set to stop; squared, truncated, repeats kept once."""
    stop = math.sqrt(T * 0.8)
    points = [i * (stop / (S - 1)) for i in range(S - 1)] + [stop]
    return sorted({int(v * v) for v in points})


@pytest.mark.parametrize("T,S", [(1000, 50), (1000, 25), (1000, 100), (100, 10), (4000, 50)])
def test_quad_spacing_is_exactly_the_quadratic(T, S):
    d = Diffusion("linear", T)
    q = d.respace(f"quad{S}")
    want = _quad_exact(T, S)
    assert q.timestep_map.tolist() == want
    assert q.num_timesteps == len(want) and want[-1] == int(0.8 * T) and want[0] == 0
    torch.testing.assert_close(q.alphas_cumprod, d.alphas_cumprod[want], rtol=1e-12, atol=0)


@pytest.mark.parametrize("T,S", [(1000, 51), (1000, 16), (60, 12), (500, 155), (1000, 101)])
def test_quad_spacing_keeps_the_ddim_codes_rounding(T, S):
    """Where the DDIM code's float64 rounding moves a square across an integer (T = 60, S = 12:
    sqrt(48)^2 = 47.99..., so its top timestep is 47) quadN follows the code, not the exact value."""
    got = Diffusion("linear", T).respace(f"quad{S}").timestep_map.tolist()
    assert got == _quad_float(T, S)
    assert got == sorted({int(s) for s in np.linspace(0, np.sqrt(T * 0.8), S) ** 2})
    assert got != _quad_exact(T, S)


def test_quad_repeats_are_documented_counts():
    d = Diffusion("cosine", 1000)
    assert d.respace("quad50").num_timesteps == 49      # 0 twice (800 / 49^2 < 1)
    assert d.respace("quad100").num_timesteps == 96
    assert d.respace("quad25").num_timesteps == 25      # no repeats below 30 steps
    assert d.respace("quad10").timestep_map.tolist() == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]


@pytest.mark.parametrize("T,S,p", [(1000, 50, 2), (1000, 50, 1), (200, 20, 3), (1000, 10, 2)])
def test_power_spacing_exact(T, S, p):
    d = Diffusion("linear", T)
    got = d.respace(f"pow{p}:{S}").timestep_map.tolist()
    assert got == _pow_exact(T, S, p)
    assert got[0] == 0 and got[-1] == T - 1
    if p == 1:  # even: diffusers' "linspace" timesteps
        assert got == sorted(diffusers_timesteps(T, S, "linspace"))
    if p > 1:   # denser near x0: the gaps grow with t
        gaps = np.diff(got)
        assert (np.diff(gaps) >= -1).all() and gaps[-1] > 4 * gaps[1]


def test_power_spacing_fractional_power():
    got = Diffusion("linear", 500).respace("pow1.5:30").timestep_map.tolist()
    assert got == sorted({int(np.round(499 * (i / 29) ** 1.5)) for i in range(30)})
    gaps = np.diff(Diffusion("linear", 500).respace("pow0.5:30").timestep_map.numpy())
    assert gaps[0] > 4 * gaps[-1]   # p < 1: denser near T


@pytest.mark.parametrize("spec", ["quad1", "quad0", "quad2000", "pow0:50", "pow2:1", "pow2:5000", "quadx",
                                  "pow:50", "pow2"])
def test_bad_spacings_name_the_spec(spec):
    with pytest.raises(ValueError, match="spec"):
        Diffusion("linear", 1000).respace(spec)


def test_truncate_keeps_the_first_timesteps():
    d = Diffusion("cosine", 1000)
    t = d.truncate(0.8)
    assert t.timestep_map.tolist() == list(range(800)) and t.original_num_steps == 1000
    torch.testing.assert_close(t.alphas_cumprod, d.alphas_cumprod[:800], rtol=1e-12, atol=0)
    torch.testing.assert_close(t.betas, d.betas[:800], rtol=1e-9, atol=0)
    assert d.truncate(1.0).timestep_map.tolist() == list(range(1000))
    # then respaced: guided-diffusion's 50 even steps over 800 = round(i * 799 / 49)
    r = reverse_process(d, "50", truncate=0.8)
    assert r.timestep_map.tolist() == [round(i * 799 / 49) for i in range(50)]
    assert reverse_process(d, None, skip=8, truncate=0.5).timestep_map.max() == 499
    assert reverse_process(d, "quad20", truncate=0.5).timestep_map.max() == 400
    for bad in (0, 0.0, 1.5, -0.2, 0.0004):
        with pytest.raises(ValueError, match="truncate"):
            d.truncate(bad)
    for bad in ("0.8", True, None):
        with pytest.raises(TypeError, match="truncate"):
            d.truncate(bad)


# ---- noise_until ------------------------------------------------------------------------------------

def test_noise_until_only_zeroes_the_nonzero_column():
    d = Diffusion("cosine", 30, variance="learned_range").respace("10")
    plan = make_plan(d, StepOptions(), 0.0, torch.device("cpu"))
    for k, want in [(0, [0] * 10), (3, [0] * 7 + [1] * 3), (9, [0] + [1] * 9), (10, [0] + [1] * 9),
                    (50, [0] + [1] * 9)]:
        new = with_noise_until(plan, k)
        assert new.coef[:, NONZERO].tolist() == want
        others = [c for c in range(NUM_COEFS) if c != NONZERO]
        assert torch.equal(new.coef[:, others], plan.coef[:, others])
    assert with_noise_until(plan, None) is plan
    # restoration starting at step index 6: noise at 6, 5 only
    assert with_noise_until(plan, 2, start=6).coef[:, NONZERO].tolist() == [0] * 5 + [1] * 5
    for bad, err in ((-1, ValueError), (2.0, TypeError), (True, TypeError), ("3", TypeError)):
        with pytest.raises(err, match="noise_until"):
            with_noise_until(plan, bad)


def _independent_loop(model, process, seeds, k, labels, method="ddpm", eta=0.0, x_T_scale=1.0):
    """Steps S-1 .. 0 in a plain Python loop on reference.diffusion_step: the n-th step (n = 0, 1, ...)
    gets its Philox noise when n < k and None after (a Python branch, not the coefficient column)."""
    shape = (model.in_channels, model.image_size, model.image_size)
    b = seeds.shape[0]
    x = philox.initial_noise(seeds.cpu(), shape, backend="torch") * x_T_scale
    coef = process.coefficients(eta).float()
    t_map = process.timestep_map
    for n, s in enumerate(range(process.num_timesteps - 1, -1, -1)):
        with torch.no_grad():
            out = model.cpu()(x, t_map[s].expand(b), labels.cpu())
        z = philox.philox_normal(seeds.cpu(), s, shape) if k is None or n < k else None
        x, _ = reference.diffusion_step(x, out, coef[s].expand(b, -1), z, method=method,
                                        prediction=process.prediction, variance=process.variance)
    return x


_CPU = pytest.mark.skipif(not ddpm_fast.backends()["cpu"].available, reason="ddpm_fast._C is not built")
_TRITON = pytest.mark.skipif(not ddpm_fast.backends()["triton"].available, reason="triton unavailable")
_CASES = [("ddpm", 0.0, 3), ("ddpm", 0.0, 0), ("ddim", 1.0, 2), ("ddim", 1.0, 0), ("ddim", 0.6, 5)]


# every case on the reference and the C++ kernel; one on Triton (its CPU interpreter is slow) and CUDA
@pytest.mark.parametrize("backend,method,eta,k", [("torch", *c) for c in _CASES] + [
    pytest.param("cpu", *c, marks=_CPU) for c in _CASES] + [
    pytest.param("triton", "ddim", 1.0, 2, marks=_TRITON),
    pytest.param("cuda", "ddpm", 0.0, 3, marks=pytest.mark.cuda),
    pytest.param("cuda", "ddim", 1.0, 2, marks=pytest.mark.cuda)])
def test_sample_noise_until_equals_independent_loop(backend, method, eta, k):
    dev = device_of(backend)
    model = tiny_unet(seed=2)
    labels = torch.tensor([0, 3, 1])
    seed = 7
    fast = ddpm_fast.sample(model.to(dev), steps="6", method=method, eta=eta, noise_until=k, seed=seed,
                            class_labels=labels, batch_size=3, progress=False, backend=backend,
                            cuda_graph=False).cpu()
    ref = _independent_loop(model, model.diffusion.respace("6"), sample_seeds(seed, 0, 3), k, labels,
                            method, eta)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-5)
    if k == 0 and method == "ddim":  # eta's direction term is kept: not the eta 0 sampler
        eta0 = ddpm_fast.sample(model.to(dev), steps="6", method="ddim", eta=0.0, seed=seed, class_labels=labels,
                                batch_size=3, progress=False, backend=backend, cuda_graph=False).cpu()
        assert (eta0 - fast).abs().max() > 1e-2


def test_noise_until_edges():
    model = tiny_unet(seed=3)
    kw = dict(steps="5", seed=1, class_labels=torch.tensor([1, 2]), batch_size=2, progress=False)
    full = ddpm_fast.sample(model, **kw)
    assert torch.equal(ddpm_fast.sample(model, noise_until=5, **kw), full)
    assert torch.equal(ddpm_fast.sample(model, noise_until=100, **kw), full)
    some = ddpm_fast.sample(model, noise_until=3, **kw)
    none = ddpm_fast.sample(model, noise_until=0, **kw)
    assert (some - full).abs().max() > 1e-3 and (some - none).abs().max() > 1e-3
    # noise_until=0 draws nothing after x_T: the other seeds' step noise cannot matter
    ref = _independent_loop(model, model.diffusion.respace("5"), sample_seeds(1, 0, 2), 0, torch.tensor([1, 2]))
    torch.testing.assert_close(none, ref, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="noise_until"):
        ddpm_fast.sample(model, noise_until=-1, **kw)
    with pytest.raises(TypeError, match="noise_until"):
        ddpm_fast.sample(model, noise_until=0.5, **kw)


@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_sample_truncate_equals_independent_loop(method, eta):
    """truncate=0.8 of T = 20 with 5 steps: timesteps [0, 4, 8, 11, 15] (guided-diffusion's even
    spacing of 16 timesteps), from x_T * sqrt(1 - alpha_bar[15])."""
    model = tiny_unet(seed=4)
    labels = torch.tensor([2, 0])
    fast = ddpm_fast.sample(model, steps="5", truncate=0.8, method=method, eta=eta, noise_until=3, seed=2,
                            class_labels=labels, batch_size=2, progress=False)
    process = model.diffusion.respace([0, 4, 8, 11, 15])
    scale = math.sqrt(1.0 - float(model.diffusion.alphas_cumprod[15]))
    ref = _independent_loop(model, process, sample_seeds(2, 0, 2), 3, labels, method, eta, scale)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-5)
    # a given x_T is used as it is
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    given = ddpm_fast.sample(model, steps="5", truncate=0.8, x_T=x_T, seed=2, class_labels=labels,
                             batch_size=2, progress=False, noise_until=0)
    scaled = ddpm_fast.sample(model, steps=[0, 4, 8, 11, 15], x_T=x_T, seed=2, class_labels=labels,
                              batch_size=2, progress=False, noise_until=0)
    torch.testing.assert_close(given, scaled, atol=0, rtol=0)


def test_restore_noise_until_equals_independent_loop():
    """restore(strength=0.5) of T = 20 starts at step index 9 from q(x_9 | image) (its own noise
    stream) and runs 9 .. 0; with noise_until=3 only steps 9, 8, 7 add noise."""
    model = tiny_unet(seed=5)
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = ddpm_fast.restore(model, image, None, steps=None, strength=0.5, noise_until=3, seed=4,
                            progress=False, backend="auto")
    seeds = sample_seeds(4, 0, 2)
    d = model.diffusion
    coef = d.coefficients(0.0).float()
    shape = (3, 8, 8)
    x = coef[9, SQRT_AB] * image + coef[9, SQRT_1M_AB] * philox.philox_normal(seeds, _START_STREAM + 9, shape)
    labels = torch.full((2,), model.null_label)
    for s in range(9, -1, -1):
        with torch.no_grad():
            o = model(x, d.timestep_map[s].expand(2), labels)
        z = philox.philox_normal(seeds, s, shape) if s > 9 - 3 else None
        x, _ = reference.diffusion_step(x, o, coef[s].expand(2, -1), z, variance=d.variance)
    torch.testing.assert_close(out, x, atol=2e-5, rtol=1e-5)
    plain = ddpm_fast.restore(model, image, None, steps=None, strength=0.5, seed=4, progress=False)
    assert (plain - out).abs().max() > 1e-3


def test_cli_noise_until_and_truncate(tmp_path):
    from ddpm_fast import cli
    from ddpm_fast.images import to_images

    out = tmp_path / "s.npz"
    assert cli.main(["sample", "--num-samples", "2", "--batch-size", "2", "--steps", "quad6",
                     "--noise-until", "2", "--truncate", "0.8", "--seed", "3", "--out", str(out),
                     "--grid", "", "--no-progress", "--device", "cpu"]) == 0
    got = np.load(out)["arr_0"]
    model = ddpm_fast.load_pretrained("digits")
    want = ddpm_fast.sample(model, steps="quad6", noise_until=2, truncate=0.8, seed=3,
                            class_labels=torch.tensor([0, 1]), batch_size=2, progress=False)
    assert np.array_equal(got, to_images(want))
    other = ddpm_fast.sample(model, steps="quad6", truncate=0.8, seed=3, class_labels=torch.tensor([0, 1]),
                             batch_size=2, progress=False)
    assert not np.array_equal(got, to_images(other))


# ---- the captured loop ------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("gpu_backend", ["auto", "cuda"])
def test_seed_options_inside_the_cuda_graph(gpu_backend):
    """noise_until, truncate and quadN through the whole-loop CUDA graph equal the eager loop and
    the independent CPU loop; a different noise_until is a different graph, not a stale replay."""
    model = tiny_unet(seed=6).cuda()
    labels = torch.tensor([1, 2, 3, 0])
    kw = dict(steps="quad7", truncate=0.9, class_labels=labels, batch_size=4, seed=5, progress=False,
              backend=gpu_backend)
    graphs.clear_cache()
    eager = ddpm_fast.sample(model, noise_until=2, cuda_graph=False, **kw)
    first = ddpm_fast.sample(model, noise_until=2, cuda_graph=True, **kw)
    replay = ddpm_fast.sample(model, noise_until=2, cuda_graph=True, **kw)
    other = ddpm_fast.sample(model, noise_until=5, cuda_graph=True, **kw)
    other_eager = ddpm_fast.sample(model, noise_until=5, cuda_graph=False, **kw)
    assert graphs.cache_size() == 2
    torch.testing.assert_close(first, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(replay, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other, other_eager, atol=1e-5, rtol=1e-5)
    assert (other - first).abs().max() > 1e-3
    process = reverse_process(model.diffusion, "quad7", truncate=0.9)
    scale = math.sqrt(1.0 - float(model.diffusion.alphas_cumprod[process.timestep_map[-1]]))
    ref = _independent_loop(model, process, sample_seeds(5, 0, 4), 2, labels, x_T_scale=scale)
    torch.testing.assert_close(first.cpu(), ref, atol=1e-4, rtol=1e-4)
